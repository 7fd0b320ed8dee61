"""Helpers shared by the FSDP2 and ZeRO-3 tests: launching ranks, a one-process reference run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, load_texts, quantize_model, save_quantized

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def torchrun(world: int, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    done = subprocess.run([*command, *(["-m"] if module else []), *args], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def single_process(
    model_dir: Path, output: Path, text: Path, samples: int, matmul_precision: str = "highest", **options
) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = build_calibration(load_texts(str(text)), tokenizer, num_samples=samples, max_seq_length=32)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = GPTQConfig.from_options(
        **{"group_size": 32, "batch_size": 2, "matmul_precision": matmul_precision, **options}
    )
    result = quantize_model(model, calibration, config)
    return save_quantized(model, output, result, tokenizer=tokenizer)


def dequantized(checkpoint: Path) -> tuple[AutoModelForCausalLM, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model(torch.zeros(1, 1, dtype=torch.long))  # the first forward decompresses
    return model, {k: v for k, v in model.state_dict().items() if k.endswith("proj.weight")}
