from gptq_fsdp.cli import main

main()
