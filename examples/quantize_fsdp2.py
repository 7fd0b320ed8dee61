"""Quantize a model that stays sharded under FSDP2, from a plain torch script.

torchrun --nproc_per_node 2 examples/quantize_fsdp2.py --model MODEL_DIR --text calib.txt --output OUT
"""

from __future__ import annotations

import argparse

import torch.distributed as dist
from transformers import AutoTokenizer

import gptq_fsdp
from gptq_fsdp.distributed.launch import init_distributed
from gptq_fsdp.distributed.loading import load_sharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True, help="calibration text file or datasets name")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()

    init_distributed()  # gloo on CPU, NCCL on GPU
    model = load_sharded(args.model)  # meta device + fully_shard per layer; each rank reads its own rows
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = gptq_fsdp.GPTQConfig.from_options(
        bits=4, group_size=args.group_size, num_samples=args.num_samples, max_seq_length=args.max_seq_length
    )
    gptq_fsdp.quantize(model, args.text, config, tokenizer=tokenizer)
    gptq_fsdp.save_quantized(model, args.output, tokenizer=tokenizer)
    if dist.get_rank() == 0:
        print(f"saved {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
