"""Run by tests/test_api.py on 2 ranks: the one-call API on each model form a training script may hold.

torchrun --nproc_per_node 2 tests/api_worker.py FORM MODEL_DIR OUTPUT_DIR TEXT
(FORM accelerate-*: under `accelerate launch --config_file ...` instead of torchrun)
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gptq_fsdp


def main() -> None:
    form, model_dir, output, text = sys.argv[1:5]
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if form == "fully_shard":  # what an FSDP2 training script has
        from torch.distributed.fsdp import fully_shard

        from gptq_fsdp.distributed.launch import init_distributed

        init_distributed()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif form == "deepspeed":  # a deepspeed.initialize engine
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo")
        ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (held for zero.Init during loading)
        model, *_ = deepspeed.initialize(model=AutoModelForCausalLM.from_pretrained(model_dir), config=ds_config)
    elif form == "accelerate-deepspeed":  # Accelerator.prepare under a ZeRO-3 config
        from accelerate import Accelerator

        accelerator = Accelerator()
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = 1  # DeepSpeed wants batch sizes even with no training
        ds_config["train_batch_size"] = int(os.environ["WORLD_SIZE"])  # accelerate says 1 process on CPU
        model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
    elif form == "accelerate-fsdp-cpu":  # Accelerator() on CPU exports FSDP settings but does not shard
        from accelerate import Accelerator

        accelerator = Accelerator()
        model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
    else:
        raise SystemExit(f"unknown form {form}")
    config = gptq_fsdp.GPTQConfig.from_options(group_size=32, batch_size=2, num_samples=12, max_seq_length=32)
    result = gptq_fsdp.quantize(model, text, config, tokenizer=tokenizer)
    gptq_fsdp.save_quantized(model, output, tokenizer=tokenizer)
    if result.backend.rank == 0:
        print(f"backend={result.backend.name} world={result.backend.world_size}")


if __name__ == "__main__":
    main()
