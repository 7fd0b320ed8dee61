"""Quantize a model that stays partitioned under DeepSpeed ZeRO-3 (`deepspeed.initialize` engine).

deepspeed --num_gpus 2 examples/quantize_deepspeed.py --model MODEL_DIR --text calib.txt --output OUT
DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/quantize_deepspeed.py ...      # CPU processes, gloo
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

import gptq_fsdp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True, help="calibration text file or datasets name")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # keep alive: from_pretrained then loads under zero.Init
    model = AutoModelForCausalLM.from_pretrained(args.model)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    config = gptq_fsdp.GPTQConfig.from_options(
        bits=4, group_size=args.group_size, num_samples=args.num_samples, max_seq_length=args.max_seq_length
    )
    gptq_fsdp.quantize(engine, args.text, config, tokenizer=tokenizer)
    gptq_fsdp.save_quantized(engine, args.output, tokenizer=tokenizer)
    if dist.get_rank() == 0:
        print(f"saved {args.output}")
    del hf_ds_config


if __name__ == "__main__":
    main()
