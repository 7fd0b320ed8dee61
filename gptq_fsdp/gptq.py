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

# Columns per run inside a block (quantize_columns): on this project's CPU 16 was fastest for 288..3072
# rows (3072 rows: 34 instead of 48 µs per column).
SUB_BLOCK = 16


class GPTQError(RuntimeError):
    """GPTQ cannot quantize a module (invalid shape, non-finite or non-PD Hessian)."""


@dataclass
class GPTQResult:
    weight: torch.Tensor  # dequantized weight, input dtype
    levels: torch.Tensor  # [rows, cols] int8 integer levels: weight = (levels - zero_point)·scale, see dequantize
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


def dequantize(
    levels: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, g_idx: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(levels - zero_point)·scale with each column's group (`g_idx`, else contiguous groups), in fp32,
    then `dtype`: bit for bit the `weight` of the GPTQResult these came from."""
    rows, cols = levels.shape
    if g_idx is None:  # contiguous groups: broadcast instead of gathering a [rows, cols] scale
        values = levels.float().view(rows, scale.shape[1], -1)
        values.sub_(zero_point.float()[..., None]).mul_(scale.float()[..., None])
        return values.view(rows, cols).to(dtype)
    group = g_idx.long()
    return levels.float().sub_(zero_point.float()[:, group]).mul_(scale.float()[:, group]).to(dtype)


def reversed_hessian_factor(reversed_hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor L of J·(H + λI)·J, given J·H·J (J reverses the order of the columns),
    λ = damping · mean(diag H).

    Raises LinAlgError. With V = J·L·J, an upper triangle, H + λI = V·Vᵀ and V = U⁻¹ for GPTQ's
    usual factor U = chol_upper((H + λI)⁻¹), so GPTQ runs on this one Cholesky (cols³/3 flops)
    instead of Cholesky, inverse and Cholesky again (4·cols³/3). The Hessian is damped in place and
    restored (so a retry can use more damping); besides it, one [cols, cols] result.
    """
    diagonal = reversed_hessian.diagonal().clone()
    reversed_hessian.diagonal().add_(damping * torch.mean(diagonal))
    try:
        return cholesky(reversed_hessian)
    finally:
        reversed_hessian.diagonal().copy_(diagonal)


# Above this many columns the CPU factorization goes by diagonal blocks of CHOLESKY_BLOCK columns.
BLOCKED_CHOLESKY_FROM = 1024
CHOLESKY_BLOCK = 384


def cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite matrix (raises LinAlgError).

    On the CPU, torch.linalg.cholesky zeroes the upper triangle of LAPACK's column-major result in
    a slow strided pass (one thread, 1536 columns: 26 of its 34 ms). Large matrices are therefore
    factored a block of columns at a time (right-looking: the diagonal block's Cholesky, the panel
    below it by a triangular solve, the trailing update by one product): 1536 columns in 18 ms.
    """
    columns = matrix.shape[-1]
    if matrix.device.type != "cpu" or columns < BLOCKED_CHOLESKY_FROM:
        return torch.linalg.cholesky(matrix)
    factor = matrix.clone()
    for start in range(0, columns, CHOLESKY_BLOCK):
        end = min(start + CHOLESKY_BLOCK, columns)
        diagonal = torch.linalg.cholesky(factor[start:end, start:end])
        factor[start:end, start:end] = diagonal
        if end < columns:
            panel = torch.linalg.solve_triangular(diagonal.mT, factor[end:, start:end], upper=True, left=False)
            factor[end:, start:end] = panel
            factor[end:, end:].addmm_(panel, panel.mT, alpha=-1)
    return factor.tril_()


def quantize_columns(
    W1: torch.Tensor,
    source1: torch.Tensor,
    Q1: torch.Tensor,
    D1: torch.Tensor,
    feedback1: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    qmin: float,
    qmax: float,
    columns: range,
) -> None:
    """GPTQ's column loop inside one block (Wᵀ layout: W1[i] is column i, for all rows).

    Column i of `W1`, with the feedback of all earlier columns added, is quantized with its row of
    `scales`/`zero_points` (None: symmetric, all zero): `Q1[i]` gets its levels less the zero points
    (integers; the caller multiplies by the scales), `D1[i]` = `source1[i]` - its dequantized values,
    which go into the block's later columns j through `feedback1[i, j]`. Two forms give the same
    columns (W1[i] as reached, and so Q1):
    - GPTQ's usual one, with U = chol_upper(H⁻¹): source = W1 (as reached), feedback = -U[i, j] / U[i, i];
    - with V = U⁻¹ (H = V·Vᵀ, from one Cholesky; Chen et al., 2025, GPTQ as Babai's nearest plane):
      source = the original weight, feedback = V[i, j] / V[j, j].
    Rows are independent.
    """
    # Per-column views made in one call each (indexing one at a time costs more than the math here):
    # each column is 5 small ops (6 with zero points), so on a CPU the loop is bound by their overhead.
    w, source, q, d, scale = (t.unbind(0) for t in (W1, source1, Q1, D1, scales))
    zero_point = zero_points.unbind(0) if zero_points is not None else None
    # The feedback goes column by column only inside runs of SUB_BLOCK columns, and to the rest of the
    # block as one product per run: the per-column update stays small however many rows there are.
    for j1 in range(columns.start, columns.stop, SUB_BLOCK):
        j2 = min(j1 + SUB_BLOCK, columns.stop)
        # Each column updates the whole run with its feedback row zeroed on and before the diagonal:
        # columns already quantized get x + 0 = x, and no per-column slices are needed.
        run, feedback = W1[j1:j2], feedback1[j1:j2, j1:j2].triu(1).unbind(0)
        for i in range(j1, j2):
            if zero_point is None:
                torch.div(w[i], scale[i], out=q[i]).round_().clamp_(qmin, qmax)
            else:
                torch.addcdiv(zero_point[i], w[i], scale[i], out=q[i]).round_().clamp_(qmin, qmax)
                q[i].sub_(zero_point[i])
            torch.addcmul(source[i], q[i], scale[i], value=-1, out=d[i])  # source - level·scale, one rounding
            if i + 1 < j2:
                run.addr_(feedback[i - j1], d[i])
        W1[j2:].addmm_(feedback1[j1:j2, j2:].T, D1[j1:j2])


class _ColumnLoopGraph:
    """`quantize_columns` over one whole block, captured once as a CUDA graph and replayed per block.

    The loop is a handful of tiny kernels per column, so on a GPU it is bound by kernel launches (an
    H200 took 110-150 µs per column eagerly). The graph reads and writes fixed buffers: each block's
    inputs are copied in and its results read out.
    """

    def __init__(self, block: int, rows: int, device: torch.device, qmin: float, qmax: float, symmetric: bool) -> None:
        self.W1, self.source1, self.Q1, self.D1, self.scales = (
            torch.zeros(block, rows, device=device) for _ in range(5)
        )
        self.zero_points = None if symmetric else torch.zeros(block, rows, device=device)
        self.feedback1 = torch.zeros(block, block, device=device)
        self.qmin, self.qmax = qmin, qmax
        self.graph: torch.cuda.CUDAGraph | None = None

    def _loop(self) -> None:
        quantize_columns(
            self.W1, self.source1, self.Q1, self.D1, self.feedback1, self.scales, self.zero_points,
            self.qmin, self.qmax, range(len(self.W1)),
        )  # fmt: skip

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

    def run(
        self, W1: torch.Tensor, source1: torch.Tensor, feedback1: torch.Tensor, scales: torch.Tensor,
        zero_points: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """`quantize_columns` on the block: updates `W1` in place and returns its levels less the zero
        points and its differences (Q1, D1), valid until the next run."""
        if self.graph is None:
            with torch.cuda.device(self.W1.device):
                self._capture()
        for buffer, value in (
            (self.W1, W1), (self.source1, source1), (self.feedback1, feedback1), (self.scales, scales),
            (self.zero_points, zero_points),
        ):  # fmt: skip
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        W1.copy_(self.W1)
        return self.Q1, self.D1


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
    result, without the per-kernel launch cost). `weight` itself is read, never written.
    """
    rows, cols = weight.shape
    validate_args(args, cols, name)
    if hessian.shape != (cols, cols):
        raise GPTQError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match {cols} input columns")
    out_dtype = weight.dtype
    W = weight.detach().to(torch.float32).clone()
    # The working copy is permuted and damped in place.
    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=not overwrite_hessian)
    # A sum is one cheap pass (isfinite() is three); it is also inf when the values overflow fp32.
    if not torch.isfinite(H.sum()):
        raise GPTQError(f"{name}: the Hessian has non-finite values (inf/NaN in the calibration activations)")
    if not torch.isfinite(W.sum()):
        raise GPTQError(f"{name}: the weight has non-finite values")

    qmin, qmax = (float(v) for v in calculate_range(args, W.device))
    group = args.group_size if args.strategy == QuantizationStrategy.GROUP else cols
    num_groups = cols // group
    order = resolve_actorder(args, actorder)

    # Columns no calibration token touched: their weights cannot affect outputs; quantize them to 0.
    dead = torch.diag(H) == 0
    W.masked_fill_(dead, 0)

    scale = torch.zeros(rows, num_groups, device=W.device)
    zero_point = torch.zeros(rows, num_groups, device=W.device)
    # Static scales come from the original weight in column order, before any permutation.
    static_scales = args.strategy == QuantizationStrategy.CHANNEL or order == "weight"
    if static_scales:
        s, z = qparams(W.reshape(rows, num_groups, group), args, out_dtype)
        scale[:], zero_point[:] = s, z

    diagonal = torch.diag(H).masked_fill(dead, 1)
    perm = torch.argsort(diagonal, descending=True) if order is not None else torch.arange(cols, device=W.device)
    reverse = perm.flip(0)  # the factorization wants the Hessian in reversed processing order
    rows_permuted = H[reverse]
    torch.index_select(rows_permuted, 1, reverse, out=H)  # H[reverse][:, reverse] into the working copy
    del rows_permuted
    H.diagonal().masked_fill_(dead[reverse], 1)
    # Group of each column in processing order.
    column_group = (perm if static_scales else torch.arange(cols, device=W.device)) // group

    damping = dampening_frac
    for factor in (1.0, *DAMPING_RETRY_FACTORS):
        damping = dampening_frac * factor
        try:
            reversed_factor = reversed_hessian_factor(H, damping)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise GPTQError(
            f"{name}: the Hessian is not positive definite even with dampening_frac={damping:g}; "
            "use more or more varied calibration samples, or a larger dampening fraction"
        )
    del H
    # Both factors are stored reversed: V[i, j] = T[cols-1-i, cols-1-j] with T = L (V) or L⁻¹ (U = V⁻¹),
    # and read a block of rows at a time.
    v_diagonal = reversed_factor.diagonal().flip(0)  # = 1 / U[i, i]
    if not static_scales:
        # A group's scale is taken from its columns as GPTQ's update for all earlier columns left them;
        # the V form holds that only for each column as it is reached, so these run in the U form.
        identity = torch.eye(cols, device=reversed_factor.device)
        reversed_factor = torch.linalg.solve_triangular(reversed_factor, identity, upper=False)
        del identity
    # Work on Wᵀ so that a weight column (the unit GPTQ steps over) is one contiguous vector.
    Wt = W.T.contiguous()
    del W
    Wt = Wt.index_select(0, perm)
    # The V form feeds back (original - quantized) columns: keep the originals, in the weight's own
    # dtype (exact: W was converted from it), read one block at a time.
    original_t = Wt.to(out_dtype, copy=True) if static_scales else None
    scale_t, zero_point_t = scale.T.contiguous(), zero_point.T.contiguous()
    # Blocks must not cut through a group whose scale is computed on entry.
    block = block_size if static_scales else max(group, block_size - block_size % group)
    graphed = cuda_graph and static_scales and Wt.is_cuda
    graph = _ColumnLoopGraph(block, rows, Wt.device, qmin, qmax, args.symmetric) if graphed else None
    losses = torch.zeros(rows, device=Wt.device)
    levels_t = torch.empty(cols, rows, dtype=torch.int8, device=Wt.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2]  # a view: updated in place, ends up holding the quantized columns
        rows1 = reversed_factor[cols - i2 : cols - i1, : cols - i1].flip(0, 1)  # V or U [i1:i2, i1:]
        if static_scales:  # V form: the feedback carries (original - quantized) columns
            source1 = original_t[i1:i2].to(torch.float32)
            feedback = rows1.div_(v_diagonal[i1:])  # V[i, j] / V[j, j]
        else:  # U form: the feedback carries (current - quantized) columns
            source1 = W1
            feedback = rows1.mul_(-v_diagonal[i1:i2, None])  # -U[i, j] / U[i, i]
        feedback1 = feedback[:, : i2 - i1]
        if static_scales:  # each column's scale row, gathered on the device (no host sync)
            groups = column_group[i1:i2]
            scales = scale_t.index_select(0, groups)
            zero_points = None if args.symmetric else zero_point_t.index_select(0, groups)
            if graph is not None and i2 - i1 == block:
                Q1, D1 = graph.run(W1, source1, feedback1, scales, zero_points)
            else:
                Q1, D1 = torch.empty_like(W1), torch.empty_like(W1)
                quantize_columns(W1, source1, Q1, D1, feedback1, scales, zero_points, qmin, qmax, range(i2 - i1))
        else:  # a group's scale comes from its error-updated columns when GPTQ reaches it
            Q1, D1 = torch.empty_like(W1), torch.empty_like(W1)
            for start in range(0, i2 - i1, group):
                g = (i1 + start) // group
                scale_t[g], zero_point_t[g] = qparams(W1[start : start + group].T, args, out_dtype)
                scales = scale_t[g].expand_as(W1)
                zero_points = None if args.symmetric else zero_point_t[g].expand_as(W1)
                columns = range(start, start + group)
                quantize_columns(W1, source1, Q1, D1, feedback1, scales, zero_points, qmin, qmax, columns)
        if not static_scales:  # the block's groups all have their scales now
            scales = scale_t.index_select(0, column_group[i1:i2])
            zero_points = None if args.symmetric else zero_point_t.index_select(0, column_group[i1:i2])
        # Q1 holds the levels less the zero points: keep the levels, then dequantize as compressed-tensors does.
        levels_t[i1:i2] = Q1 if zero_points is None else Q1 + zero_points
        Q1.mul_(scales)
        # GPTQ's objective per column: ((w - q) / U[i, i])², w as the column was reached.
        losses += (W1.sub_(Q1).mul_(v_diagonal[i1:i2, None])).square().sum(dim=0) / 2
        W1.copy_(Q1)
        Wt[i2:].addmm_(feedback[:, i2 - i1 :].T, D1)

    unpermute = torch.argsort(perm)
    W = Wt.index_select(0, unpermute).T
    levels = levels_t.index_select(0, unpermute).T
    scale, zero_point = scale_t.T, zero_point_t.T
    g_idx = None
    if order == "group" and args.strategy == QuantizationStrategy.GROUP:
        g_idx = column_group[unpermute].to(torch.int32)
    return GPTQResult(
        weight=W.to(out_dtype).contiguous(),
        levels=levels.contiguous(),
        scale=scale.to(out_dtype).contiguous(),
        zero_point=zero_point.to(torch.int8).contiguous(),
        g_idx=g_idx,
        row_losses=losses,
        damping=damping,
    )
