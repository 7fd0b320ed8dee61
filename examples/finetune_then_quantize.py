"""Fine-tune with the HF Trainer, then GPTQ the trained model in the same job and save a W4A16 checkpoint.

    accelerate launch --config_file accelerate_configs/fsdp2_cpu.yaml examples/finetune_then_quantize.py \\
        --model MODEL_DIR --train-text emma.txt --eval-text persuasion.txt --output OUT

The integration is the callback line. On GPUs accelerate trains under FSDP2 (or ZeRO-3 with a DeepSpeed
config) and the callback quantizes the shards in place; on a CPU-only machine accelerate does not apply
FSDP, so training runs on identical replicas and gptq_fsdp shards the trained model itself.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import gptq_fsdp
from gptq_fsdp.evaluate import perplexity, text_tokens
from gptq_fsdp.integrations import GPTQCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-text", required=True)
    parser.add_argument("--eval-text", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    eval_ids = text_tokens(tokenizer, args.eval_text, args.eval_tokens)
    before = perplexity(model.eval(), eval_ids, window=min(1024, args.eval_tokens))

    texts = gptq_fsdp.load_texts(args.train_text)
    train = gptq_fsdp.build_calibration(texts, tokenizer, num_samples=args.steps * 4, max_seq_length=args.seq_len)
    dataset = Dataset.from_dict({"input_ids": train.input_ids.tolist(), "labels": train.input_ids.tolist()})
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    config = gptq_fsdp.GPTQConfig.from_options(
        bits=4, group_size=args.group_size, num_samples=args.calibration_samples, max_seq_length=args.seq_len
    )
    # The integration: quantize and save when training ends.
    callback = GPTQCallback(texts, args.output, config, tokenizer=tokenizer, overwrite=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[callback])
    trainer.train()

    rank, world = callback.result.backend.rank, callback.result.backend.world_size
    if dist.is_initialized():  # compressed-tensors loads collectively while a process group exists
        dist.destroy_process_group()
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()
        after = perplexity(reloaded, eval_ids, window=min(1024, args.eval_tokens))
        print(
            f"perplexity before fine-tuning {before:.3f}; fine-tuned + W4A16, reloaded from {args.output}: {after:.3f}"
        )
        print(f"GPTQ wall time {callback.result.seconds:.1f} s on {world} rank(s)")


if __name__ == "__main__":
    main()
