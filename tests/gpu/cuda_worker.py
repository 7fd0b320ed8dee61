"""Run under `torchrun --nproc_per_node 1` by tests/gpu/test_cuda.py: FSDP2 over NCCL on one GPU.

cuda_worker.py MODEL_DIR TEXT OUTPUT_DIR [true-sequential]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, quantize_model, save_quantized
from gptq_fsdp.distributed.loading import load_sharded


def main() -> None:
    model_dir, text, output = (Path(a) for a in sys.argv[1:4])
    dist.init_process_group("nccl")  # init_distributed() joins no group at world size 1; FSDP2 needs one
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = build_calibration([text.read_text()], tokenizer, num_samples=8, max_seq_length=64)
    model = load_sharded(model_dir, dtype="bfloat16")
    true_sequential = sys.argv[4:] == ["true-sequential"]
    config = GPTQConfig.from_options(group_size=64, batch_size=4, true_sequential=true_sequential)
    result = quantize_model(model, calibration, config)
    assert result.backend.name == "fsdp2", result.backend.name
    save_quantized(model, output, result, tokenizer=tokenizer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
