"""GPTQ on one weight matrix given its Hessian (Frantar et al., 2022, arXiv:2210.17323).

Pure tensor math: no torch.distributed, no modules. Everything runs in fp32 whatever the model
dtype; the scales are rounded to the model dtype *before* they are used, so the dequantized weight
returned here is bit-for-bit what compressed-tensors reconstructs from the packed checkpoint.

Scale semantics (per strategy / act-order), chosen so the result does not depend on block size:
- channel: one scale per row, from the original weight.
- group, act-order none or "group": a group's scale is computed when GPTQ reaches the group, from
  the error-updated columns (as in the original GPTQ); with "group" act-order the groups are
  contiguous in activation order and `g_idx` maps columns to groups.
- group, act-order "static"/"weight": scales from the original weight in column order, computed up
  front, then columns are processed in activation order (no `g_idx` needed at inference).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

# torch.set_float32_matmul_precision's values: "highest" is IEEE fp32; "high" allows TF32 (GPU);
# "medium" also allows bf16 products with fp32 accumulation (GPU, and CPUs with AMX/AVX512-BF16).
MATMUL_PRECISIONS = ("highest", "high", "medium")

# Damping fractions tried in turn after the configured one when Cholesky fails.
DAMPING_RETRY_FACTORS = (10.0, 100.0)


class GPTQError(RuntimeError):
    """GPTQ cannot quantize a module (invalid shape, non-finite or non-PD Hessian)."""


@dataclass
class GPTQResult:
    weight: torch.Tensor  # dequantized weight, input dtype
    scale: torch.Tensor  # [rows, groups] (groups = 1 for channel), input dtype
    zero_point: torch.Tensor  # [rows, groups], int8 (all zero when symmetric)
    g_idx: torch.Tensor | None  # [cols] int32 column -> group, only for act-order "group"
    row_losses: torch.Tensor  # [rows] GPTQ objective 1/2 sum_j (w - q)^2 / [H^-1]_jj per row
    damping: float  # dampening fraction actually used

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())


@contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """`torch.set_float32_matmul_precision(precision)` inside the block, the previous value after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def validate_args(args: QuantizationArgs, columns: int, name: str = "weight") -> None:
    """Raise a clear error for settings this GPTQ implementation does not support."""
    if args.type != QuantizationType.INT:
        raise GPTQError(f"{name}: only integer weight quantization is supported, got type={args.type}")
    if not 2 <= args.num_bits <= 8:
        raise GPTQError(f"{name}: num_bits must be in 2..8, got {args.num_bits}")
    if args.dynamic:
        raise GPTQError(f"{name}: dynamic weight quantization is not a GPTQ scheme")
    if args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        raise GPTQError(f"{name}: strategy must be 'channel' or 'group', got {args.strategy}")
    if args.strategy == QuantizationStrategy.GROUP:
        if not args.group_size or args.group_size <= 0:
            raise GPTQError(f"{name}: group strategy needs a positive group_size")
        if columns % args.group_size != 0:
            raise GPTQError(
                f"{name}: group_size {args.group_size} does not divide its {columns} input columns; "
                f"pick a divisor of {columns} (e.g. {_divisor_hint(columns)})"
            )


def _divisor_hint(columns: int) -> str:
    divisors = [g for g in (32, 64, 128, 192, 256) if columns % g == 0]
    return ", ".join(map(str, divisors)) if divisors else "a divisor"


def resolve_actorder(args: QuantizationArgs, override: str | None = None) -> str | None:
    """Act-order as None, "weight" or "group".

    compressed-tensors 0.20 only accepts None/"static"/"weight" in QuantizationArgs (it dropped
    "group" and checkpoints with g_idx), so "group" can only be asked for through `override`.
    """
    value = override if override is not None else args.actorder
    if value in (None, False, "none"):
        return None
    value = str(getattr(value, "value", value)).lower()
    if value in ("static", "weight"):
        return "weight"
    if value == "group":
        return "group"
    raise GPTQError(f"unknown act-order {value!r}: use none, static/weight or group")


def qparams(w: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point for each row of `w` (compressed-tensors' own formula).

    The scale is rounded to `dtype` (what the checkpoint stores) and returned as fp32.
    """
    scale, zero_point = calculate_qparams(w.amin(dim=-1), w.amax(dim=-1), args)
    return scale.to(dtype).float(), zero_point.round()


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: float, qmax: float
) -> torch.Tensor:
    """Quantize-dequantize, as compressed-tensors does it: clamp(round(w/s + z)), then (q - z)·s."""
    q = torch.clamp(torch.round(w / scale + zero_point), qmin, qmax)
    return (q - zero_point) * scale


def inverse_hessian_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1, λ = damping · mean(diag H). Raises LinAlgError.

    `hessian` is damped in place and restored (so a retry can use more damping); besides it, one
    [cols, cols] result plus one temporary inside cholesky_inverse: for a 53248-column down_proj
    each is 11 GiB.
    """
    diagonal = hessian.diagonal().clone()
    hessian.diagonal().add_(damping * torch.mean(diagonal))
    try:
        factor = torch.linalg.cholesky(hessian)
    finally:
        hessian.diagonal().copy_(diagonal)
    torch.cholesky_inverse(factor, out=factor)
    return torch.linalg.cholesky(factor, upper=True, out=factor)


def quantize_columns(
    W1: torch.Tensor,
    Err1: torch.Tensor,
    h_inv1: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    qmin: float,
    qmax: float,
    columns: range,
) -> None:
    """GPTQ's column loop inside one block (Wᵀ layout: W1[i] is column i, for all rows).

    Each column is quantized with its row of `scales`/`zero_points`, and its error, scaled by the
    inverse Hessian's diagonal, is fed back into the block's later columns. Rows are independent.
    """
    for i in columns:
        w = W1[i]
        q = fake_quantize(w, scales[i], zero_points[i], qmin, qmax)
        torch.sub(w, q, out=Err1[i]).div_(h_inv1[i, i])
        W1[i + 1 :].addr_(h_inv1[i, i + 1 :], Err1[i], alpha=-1)
        w.copy_(q)


class _ColumnLoopGraph:
    """`quantize_columns` over one whole block, captured once as a CUDA graph and replayed per block.

    The loop is ~10 tiny kernels per column, so on a GPU it is bound by kernel launches (an H200 took
    110-150 µs per column eagerly). The graph reads and writes fixed buffers: each block's inputs are
    copied in and its results out.
    """

    def __init__(self, block: int, rows: int, device: torch.device, qmin: float, qmax: float) -> None:
        self.W1, self.Err1, self.scales, self.zero_points = (torch.zeros(block, rows, device=device) for _ in range(4))
        self.h_inv1 = torch.zeros(block, block, device=device)
        self.qmin, self.qmax = qmin, qmax
        self.graph: torch.cuda.CUDAGraph | None = None

    def _loop(self) -> None:
        quantize_columns(
            self.W1, self.Err1, self.h_inv1, self.scales, self.zero_points, self.qmin, self.qmax, range(len(self.W1))
        )

    def _capture(self) -> None:
        # Warm up on a side stream first (kernel loading must not happen during capture); the real
        # inputs are copied in again afterwards.
        side = torch.cuda.Stream(self.W1.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._loop()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: collectives of a sharded run may be in flight, polled by other threads.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._loop()

    def run(self, W1: torch.Tensor, h_inv1: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor):
        """Quantize the block `W1` in place; returns its scaled errors (valid until the next run)."""
        if self.graph is None:
            with torch.cuda.device(self.W1.device):
                self._capture()
        self.W1.copy_(W1)
        self.h_inv1.copy_(h_inv1)
        self.scales.copy_(scales)
        self.zero_points.copy_(zero_points)
        self.graph.replay()
        W1.copy_(self.W1)
        return self.Err1


@float32_matmul_precision("highest")  # the error feedback needs full fp32, whatever the caller set
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    *,
    dampening_frac: float = 0.01,
    block_size: int = 128,
    actorder: str | None = None,
    name: str = "weight",
    overwrite_hessian: bool = False,
    cuda_graph: bool = True,
) -> GPTQResult:
    """Quantize `weight` [rows, cols] with GPTQ given the Hessian `hessian` [cols, cols] of its inputs.

    The Hessian's scale does not matter (damping is relative to its mean diagonal). `actorder`
    overrides `args.actorder` (needed for "group", see `resolve_actorder`). With
    `overwrite_hessian`, an fp32 `hessian` is used as GPTQ's own working copy (permuted in place;
    the caller must not use it afterwards), which saves one [cols, cols] copy. With `cuda_graph`, a
    CUDA weight with static scales has its column loop replayed as a CUDA graph (same kernels, same
    result, without the per-kernel launch cost).
    """
    rows, cols = weight.shape
    validate_args(args, cols, name)
    if hessian.shape != (cols, cols):
        raise GPTQError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match {cols} input columns")
    out_dtype = weight.dtype
    W = weight.detach().to(torch.float32).clone()
    # The working copy is permuted and damped in place.
    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=not overwrite_hessian)
    if not torch.isfinite(H).all():
        raise GPTQError(f"{name}: the Hessian has non-finite values (inf/NaN in the calibration activations)")
    if not torch.isfinite(W).all():
        raise GPTQError(f"{name}: the weight has non-finite values")

    qmin, qmax = (float(v) for v in calculate_range(args, W.device))
    group = args.group_size if args.strategy == QuantizationStrategy.GROUP else cols
    num_groups = cols // group
    order = resolve_actorder(args, actorder)

    # Columns no calibration token touched: their weights cannot affect outputs; quantize them to 0.
    dead = torch.diag(H) == 0
    W[:, dead] = 0

    scale = torch.zeros(rows, num_groups, device=W.device)
    zero_point = torch.zeros(rows, num_groups, device=W.device)
    # Static scales come from the original weight in column order, before any permutation.
    static_scales = args.strategy == QuantizationStrategy.CHANNEL or order == "weight"
    if static_scales:
        s, z = qparams(W.reshape(rows, num_groups, group), args, out_dtype)
        scale[:], zero_point[:] = s, z

    diagonal = torch.diag(H).masked_fill(dead, 1)
    perm = torch.argsort(diagonal, descending=True) if order is not None else torch.arange(cols, device=W.device)
    W = W[:, perm]
    rows_permuted = H[perm]
    torch.index_select(rows_permuted, 1, perm, out=H)  # H[perm][:, perm] into the working copy
    del rows_permuted
    H[dead[perm], dead[perm]] = 1
    # Group of each column in processing order.
    column_group = (perm if static_scales else torch.arange(cols, device=W.device)) // group

    damping = dampening_frac
    for factor in (1.0, *DAMPING_RETRY_FACTORS):
        damping = dampening_frac * factor
        try:
            h_inv = inverse_hessian_cholesky(H, damping)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise GPTQError(
            f"{name}: the Hessian is not positive definite even with dampening_frac={damping:g}; "
            "use more or more varied calibration samples, or a larger dampening fraction"
        )
    del H

    # Work on Wᵀ so that a weight column (the unit GPTQ steps over) is one contiguous vector.
    Wt = W.T.contiguous()
    del W
    scale_t, zero_point_t = scale.T.contiguous(), zero_point.T.contiguous()
    # Blocks must not cut through a group whose scale is computed on entry.
    block = block_size if static_scales else max(group, block_size - block_size % group)
    graphed = cuda_graph and static_scales and Wt.is_cuda
    graph = _ColumnLoopGraph(block, rows, Wt.device, qmin, qmax) if graphed else None
    losses = torch.zeros(rows, device=Wt.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2]  # a view: updated in place, ends up holding the quantized columns
        h_inv1 = h_inv[i1:i2, i1:i2]
        if static_scales:  # each column's scale row, gathered on the device (no host sync)
            groups = column_group[i1:i2]
            scales, zero_points = scale_t.index_select(0, groups), zero_point_t.index_select(0, groups)
            if graph is not None and i2 - i1 == block:
                Err1 = graph.run(W1, h_inv1, scales, zero_points)
            else:
                Err1 = torch.empty_like(W1)
                quantize_columns(W1, Err1, h_inv1, scales, zero_points, qmin, qmax, range(i2 - i1))
        else:  # a group's scale comes from its error-updated columns when GPTQ reaches it
            Err1 = torch.empty_like(W1)
            for start in range(0, i2 - i1, group):
                g = (i1 + start) // group
                scale_t[g], zero_point_t[g] = qparams(W1[start : start + group].T, args, out_dtype)
                scales, zero_points = scale_t[g].expand_as(W1), zero_point_t[g].expand_as(W1)
                quantize_columns(W1, Err1, h_inv1, scales, zero_points, qmin, qmax, range(start, start + group))
        losses += Err1.square().sum(dim=0) / 2
        Wt[i2:].addmm_(h_inv[i1:i2, i2:].T, Err1, alpha=-1)

    W = Wt.T[:, torch.argsort(perm)]
    scale, zero_point = scale_t.T, zero_point_t.T
    g_idx = None
    if order == "group" and args.strategy == QuantizationStrategy.GROUP:
        g_idx = column_group[torch.argsort(perm)].to(torch.int32)
    return GPTQResult(
        weight=W.to(out_dtype).contiguous(),
        scale=scale.to(out_dtype).contiguous(),
        zero_point=zero_point.to(torch.int8).contiguous(),
        g_idx=g_idx,
        row_losses=losses,
        damping=damping,
    )
