"""Helpers shared by the FSDP2 and ZeRO-3 tests: launching ranks, a one-process reference run.

A sharded run equals its one-process reference bit for bit: the forward calls are the same batches
at every world size (`data.rank_batches`), so every forward and XᵀX has the same shapes; the ranks
and the reference run at RANK_THREADS (a GEMM's summation order may depend on the thread count). What
is left is the order in which float64 sums of the same fp32 products are added (per rank, then
all-reduced): such sums round to the same fp32 Hessian unless one lands within ~2^-53 of an fp32
rounding boundary, about 2^-28 per entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, load_texts, quantize_model, save_quantized

REPO = Path(__file__).resolve().parents[1]
RANK_THREADS = 1
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(RANK_THREADS), "TQDM_DISABLE": "1"}


def run_workers(world: int, jobs: list[list[str]], directory: Path) -> None:
    """tests/fsdp_worker.py's `jobs` (each its argument list) one after another in one launch of
    `world` ranks: starting them (imports, process group: 10-17 s on 2 cores) costs more than a tiny
    model's run."""
    jobs_file = directory / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    torchrun(world, str(REPO / "tests" / "fsdp_worker.py"), "--jobs", str(jobs_file))


def torchrun(world: int, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    done = subprocess.run([*command, *(["-m"] if module else []), *args], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@contextmanager
def rank_threads() -> Iterator[None]:
    """This process at the ranks' thread count for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_process(
    model_dir: Path,
    output: Path,
    text: Path,
    samples: int,
    matmul_precision: str = "highest",
    pack: bool = True,
    **options,
) -> Path:
    """The one-process run of `model_dir` at the ranks' thread count (see the module doc)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = load_texts(str(text))
    calibration = build_calibration(texts, tokenizer, num_samples=samples, max_seq_length=32, pack=pack)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = GPTQConfig.from_options(
        **{"group_size": 32, "batch_size": 2, "matmul_precision": matmul_precision, **options}
    )
    with rank_threads():
        result = quantize_model(model, calibration, config)
    return save_quantized(model, output, result, tokenizer=tokenizer)


def dequantized(checkpoint: Path) -> tuple[AutoModelForCausalLM, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model(torch.zeros(1, 1, dtype=torch.long))  # the first forward decompresses
    quantized = ("proj.weight", "experts.gate_up_proj", "experts.down_proj")  # Linears, fused MoE experts
    return model, {k: v for k, v in model.state_dict().items() if k.endswith(quantized)}


def logits_at_rank_threads(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits computed as a rank computes them (same thread count)."""
    with rank_threads(), torch.no_grad():
        return model(ids).logits
