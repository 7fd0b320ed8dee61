"""The example scripts, run as a user would (short settings)."""

from __future__ import annotations

import re
import subprocess
import sys

import torch
from sharded_helpers import ENV, REPO, torchrun
from transformers import AutoModelForCausalLM


def loads_and_runs(checkpoint) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
    assert len(list(checkpoint.glob("model-*-of-00002.safetensors"))) == 2


def test_quantize_fsdp2_example(tiny_llama_dir, austen, tmp_path):
    done = torchrun(
        2, str(REPO / "examples" / "quantize_fsdp2.py"), "--model", str(tiny_llama_dir),
        "--text", str(austen / "emma.txt"), "--output", str(tmp_path / "ckpt"),
        "--num-samples", "4", "--max-seq-length", "32", "--group-size", "32",
    )  # fmt: skip
    assert "saved" in done.stdout
    loads_and_runs(tmp_path / "ckpt")


def test_quantize_deepspeed_example(tiny_llama_dir, austen, tmp_path):
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29733",
        str(REPO / "examples" / "quantize_deepspeed.py"), "--model", str(tiny_llama_dir),
        "--text", str(austen / "emma.txt"), "--output", str(tmp_path / "ckpt"),
        "--num-samples", "4", "--max-seq-length", "32", "--group-size", "32",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loads_and_runs(tmp_path / "ckpt")


def test_finetune_then_quantize_example_on_smollm2(smollm2_dir, austen, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu.yaml"),
        str(REPO / "examples" / "finetune_then_quantize.py"), "--model", str(smollm2_dir),
        "--train-text", str(austen / "emma.txt"), "--eval-text", str(austen / "persuasion.txt"),
        "--output", str(tmp_path / "ckpt"), "--steps", "2", "--seq-len", "64", "--calibration-samples", "4",
        "--eval-tokens", "1024",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    match = re.search(r"perplexity before fine-tuning ([\d.]+); .*: ([\d.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    before, after = map(float, match.groups())
    assert 5 < before < 200 and 5 < after < 2 * before  # a real model stays a real model after W4A16
    assert "on 2 rank(s)" in done.stdout
    loads_and_runs(tmp_path / "ckpt")
