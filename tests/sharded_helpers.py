"""Helpers shared by the FSDP2 and ZeRO-3 tests: launching ranks, a one-process reference run.

A sharded run and its one-process reference compare bit for bit only when every matmul has the same
shapes and thread count in both (a GEMM's summation order may depend on either). So the ranks run
at RANK_THREADS, the reference runs at RANK_THREADS too, and `as_if_on_ranks` makes the one process
run the very batches (and, in true-sequential order, the very row shares) that the ranks run. What is
then left is the order in which float64 sums of the same fp32 products are added (per rank, then
all-reduced): such sums round to the same fp32 Hessian unless one lands within ~2^-53 of an fp32
rounding boundary, about 2^-28 per entry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, load_texts, quantize_model, save_quantized
from gptq_fsdp.core.gptq import GPTQResult
from gptq_fsdp.data import near_equal_shares, rank_batches
from gptq_fsdp.pipeline import loop, owners

REPO = Path(__file__).resolve().parents[1]
RANK_THREADS = 1
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(RANK_THREADS), "TQDM_DISABLE": "1"}


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


@contextmanager
def as_if_on_ranks(world: int, row_shares: bool) -> Iterator[None]:
    """One process runs the batches of all `world` ranks (rank 0's, then rank 1's, ...) and, with
    `row_shares` (true-sequential order), quantizes each unit's rows in the shares the ranks would."""
    quantize_rows = owners.gptq_quantize

    def batches(num_samples: int, rank: int, _world: int, batch_size: int) -> list[list[int]]:
        return [b for r in range(world) for b in rank_batches(num_samples, r, world, batch_size)]

    def in_row_shares(weight: torch.Tensor, hessian: torch.Tensor, args, **options) -> GPTQResult:
        if weight.shape[0] < world:  # as on the ranks: too few rows to split, each rank does all
            return quantize_rows(weight, hessian, args, **options)
        shares = weight.split(near_equal_shares(weight.shape[0], world))
        parts = [quantize_rows(rows, hessian.clone(), args, **options) for rows in shares]  # a Hessian each
        cat = lambda field: torch.cat([getattr(p, field) for p in parts])  # noqa: E731
        return GPTQResult(cat("weight"), cat("levels"), cat("scale"), cat("zero_point"), parts[0].g_idx,
                          cat("row_losses"), parts[0].damping)  # fmt: skip

    with mock.patch.object(loop, "rank_batches", batches):
        if not row_shares:
            yield
            return
        with mock.patch.object(owners, "gptq_quantize", in_row_shares):
            yield


def single_process(
    model_dir: Path,
    output: Path,
    text: Path,
    samples: int,
    matmul_precision: str = "highest",
    as_ranks: int = 1,
    **options,
) -> Path:
    """The one-process run of `model_dir`, as `as_ranks` ranks would compute it (see the module doc)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = build_calibration(load_texts(str(text)), tokenizer, num_samples=samples, max_seq_length=32)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = GPTQConfig.from_options(
        **{"group_size": 32, "batch_size": 2, "matmul_precision": matmul_precision, **options}
    )
    with rank_threads(), as_if_on_ranks(as_ranks, row_shares=config.true_sequential and as_ranks > 1):
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
