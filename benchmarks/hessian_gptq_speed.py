"""Hessian accumulation and GPTQ for one Linear: gptq_fsdp against a straightforward fp32 implementation.

    python benchmarks/hessian_gptq_speed.py [--tokens 16384] [--threads 2] [--shapes 4096x4096 8192x8192 28672x8192]

Shapes are Linear weights [rows (out), cols (in)]: 4096² and 8192² (Llama-8B/70B attention), 28672x8192
(Llama-70B gate/up). Runs on CUDA when there is a GPU, else on the CPU; writes
benchmarks/results/hessian_gptq_speed_<device>.{json,md}.

- Hessian, one batch of `--tokens` bf16 activations [tokens, cols]:
  straightforward: `H += x.float().T @ x.float()` at IEEE fp32 (whole activation up-cast, full product);
  gptq_fsdp: `HessianGroup.add` (bf16 products, exact in fp32, with fp32 accumulation: on CUDA the bf16
  blocks go straight into the tensor cores with an fp32 result, on the CPU one column block is up-cast at
  a time; symmetric blocks; float64 running sum). Both errors against float64 are reported.
- GPTQ, W4 group 128 symmetric, no act-order, block 128, on the Hessian of those activations:
  straightforward: the original GPTQ loop (Frantar et al.'s gptq.py: W in column slices, rank-1 update of
  the block per column), fp32; gptq_fsdp: `gptq_quantize` (works on Wᵀ so a column is contiguous).
  Also timed: gptq_fsdp with act-order static (its default; scales up front), whose column loop runs as
  a CUDA graph on a GPU, and on a GPU the same without the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.gptq import gptq_quantize
from gptq_fsdp.core.hessian import HessianGroup, unpack_symmetric
from gptq_fsdp.core.linalg import float32_matmul_precision
from gptq_fsdp.core.scheme import qparams

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 128


def straightforward_hessian(x: torch.Tensor, total: torch.Tensor) -> None:
    with float32_matmul_precision("highest"):
        xf = x.float()
        total += xf.T @ xf


@float32_matmul_precision("highest")
def straightforward_gptq(weight: torch.Tensor, hessian: torch.Tensor, args, block: int = 128) -> torch.Tensor:
    """The original GPTQ `fasterquant` loop (group scales computed on entry to each group), fp32."""
    W = weight.float().clone()
    H = hessian.float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(0.01 * torch.mean(torch.diag(H)))
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    h_inv = torch.linalg.cholesky(H, upper=True)
    qmin, qmax = -8.0, 7.0
    scale = zero = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        h_inv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % GROUP == 0:
                scale, zero = qparams(W1[:, i : i + GROUP], args, weight.dtype)
            w, d = W1[:, i], h_inv1[i, i]
            q = (w / scale + zero).round().clamp(qmin, qmax).sub(zero).mul(scale)  # compressed-tensors' formula
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(h_inv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(h_inv[i1:i2, i2:])
    return W


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls (the device synchronised around each)."""
    sync = torch.accelerator.synchronize if device.type != "cpu" else lambda: None
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def timed_result(fn, device: torch.device, repeats: int):
    """(best wall time, the last call's result)."""
    out = []
    seconds = timed(lambda: out.append(fn()), device, repeats)
    return seconds, out[-1]


def measure(rows: int, cols: int, tokens: int, device: torch.device, repeats: int) -> dict:
    quant = GPTQConfig.from_options(group_size=GROUP, actorder="none").weights
    static = GPTQConfig.from_options(group_size=GROUP, actorder="static").weights  # the default
    gen = torch.Generator(device=device).manual_seed(0)
    mix = torch.randn(cols, cols, device=device, generator=gen) / cols**0.5  # correlated columns
    x = (torch.randn(tokens, cols, device=device, generator=gen) @ mix).bfloat16()
    weight = (torch.randn(rows, cols, device=device, generator=gen) * 0.02).bfloat16()

    plain_sum = torch.zeros(cols, cols, device=device)
    group = HessianGroup(["w"], cols, device)
    hessian_plain = timed(lambda: straightforward_hessian(x, plain_sum), device, repeats)
    hessian_ours = timed(lambda: group.add(x), device, repeats)
    exact = x.double().T @ x.double()

    def error(total: torch.Tensor) -> float:
        return ((total.double() / repeats - exact).abs().max() / exact.abs().max()).item()

    ours_sum = unpack_symmetric(group.sum, cols, torch.float64)  # `repeats` times XᵀX, in float64
    hessian = ours_sum.float()  # the scale does not matter to GPTQ

    gptq_ours, ours = timed_result(lambda: gptq_quantize(weight, hessian, quant, block_size=128), device, repeats)
    gptq_plain, plain = timed_result(lambda: straightforward_gptq(weight, hessian, quant), device, 1)
    gptq_static = timed(lambda: gptq_quantize(weight, hessian, static), device, repeats)
    if device.type == "cuda":
        gptq_static_eager = timed(lambda: gptq_quantize(weight, hessian, static, cuda_graph=False), device, repeats)
    return {
        "shape": f"{rows}x{cols}",
        "hessian_s": {"straightforward_fp32": hessian_plain, "gptq_fsdp": hessian_ours},
        "hessian_speedup": hessian_plain / hessian_ours,
        "hessian_max_rel_error_vs_float64": {"straightforward_fp32": error(plain_sum), "gptq_fsdp": error(ours_sum)},
        "gptq_s": {
            "straightforward_fp32": gptq_plain,
            "gptq_fsdp": gptq_ours,
            "gptq_fsdp_static_actorder": gptq_static,
            **({"gptq_fsdp_static_actorder_no_cuda_graph": gptq_static_eager} if device.type == "cuda" else {}),
        },
        "gptq_speedup": gptq_plain / gptq_ours,
        "gptq_same_levels": (ours.weight == plain.to(weight.dtype)).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="activation rows per Hessian batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "8192x8192", "28672x8192"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    rows_out = []
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        rows_out.append(measure(rows, cols, args.tokens, device, args.repeats))
        print(json.dumps(rows_out[-1]), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"hessian_gptq_speed_{device.type}"
    meta = {
        "device": name,
        "threads": args.threads if device.type == "cpu" else None,
        "tokens": args.tokens,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
    }
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": rows_out}, indent=2) + "\n")
    lines = [
        f"# Hessian and GPTQ per Linear on {name} ({meta['date']})",
        "",
        f"{args.tokens} bf16 activation rows per Hessian batch; GPTQ W4 group {GROUP} symmetric, block 128; "
        f"torch {torch.__version__}" + (f", {args.threads} threads" if device.type == "cpu" else "") + ".",
        "Straightforward = whole-activation fp32 up-cast + IEEE fp32 XᵀX, and the original GPTQ column loop in fp32.",
        "",
        "| weight (rows x cols) | XᵀX straightforward s | XᵀX gptq_fsdp s | speedup "
        "| max rel. error vs float64: straightforward / gptq_fsdp "
        "| GPTQ straightforward s | GPTQ gptq_fsdp s | speedup | same levels "
        "| GPTQ gptq_fsdp, act-order static s | same, without CUDA graph s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        h, g, e = r["hessian_s"], r["gptq_s"], r["hessian_max_rel_error_vs_float64"]
        lines.append(
            f"| {r['shape']} | {h['straightforward_fp32']:.3f} | {h['gptq_fsdp']:.3f} | {r['hessian_speedup']:.2f}x "
            f"| {e['straightforward_fp32']:.1e} / {e['gptq_fsdp']:.1e} "
            f"| {g['straightforward_fp32']:.2f} | {g['gptq_fsdp']:.2f} "
            f"| {r['gptq_speedup']:.2f}x | {r['gptq_same_levels']:.4f} | {g['gptq_fsdp_static_actorder']:.2f} "
            f"| {'—' if (eager := g.get('gptq_fsdp_static_actorder_no_cuda_graph')) is None else f'{eager:.2f}'} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
