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

The two kinds of scales run two forms of the same column loop (`quantize_columns`): static scales
the one-Cholesky V form (`_quantize_static_scales`), scales taken on entry to a group the usual U
form (`_quantize_dynamic_scales`). Either kind is min-max, or searched (`scales.ScaleSearcher`) where
`args.observer` is mse or imatrix_mse: on the original weight, or on the group's updated columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.utils import calculate_range

from gptq_fsdp.core.linalg import ColumnLoopGraph, float32_matmul_precision, quantize_columns, reversed_hessian_factor
from gptq_fsdp.core.scales import ScaleSearcher
from gptq_fsdp.core.scheme import GPTQError, qparams, resolve_actorder, scale_search, validate_args

# Damping fractions tried in turn after the configured one when Cholesky fails.
DAMPING_RETRY_FACTORS = (10.0, 100.0)


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


@dataclass
class _Columns:
    """A weight in GPTQ's processing order, as both forms of the column loop work on it.

    `Wt` is Wᵀ with its rows (the weight's columns) permuted into processing order; `factor` is the
    reversed Cholesky factor (V, or U = V⁻¹ once the U form has inverted it), read a block of rows
    at a time by `rows_of`; `scale_t`/`zero_point_t` are [groups, rows]. The loop writes `levels_t`
    and `losses`.
    """

    Wt: torch.Tensor
    factor: torch.Tensor
    v_diagonal: torch.Tensor  # diag(V) in processing order = 1 / diag(U)
    column_group: torch.Tensor  # group of each column in processing order
    scale_t: torch.Tensor
    zero_point_t: torch.Tensor
    qmin: float
    qmax: float
    symmetric: bool
    levels_t: torch.Tensor
    losses: torch.Tensor
    # The scale search (`args.observer` mse/imatrix_mse; None: min-max) and its error weight per column
    # in processing order (imatrix_mse: diag(H) over its mean; else None).
    searcher: ScaleSearcher | None = None
    importance: torch.Tensor | None = None

    def rows_of(self, i1: int, i2: int) -> torch.Tensor:
        """A copy of the factor's rows i1:i2 from column i1 on, in processing order (V or U [i1:i2, i1:])."""
        cols = len(self.Wt)
        return self.factor[cols - i2 : cols - i1, : cols - i1].flip(0, 1)

    def finish_block(
        self, i1: int, i2: int, Q1: torch.Tensor, D1: torch.Tensor, feedback: torch.Tensor,
        scales: torch.Tensor, zero_points: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """Store the block's levels and loss, its dequantized columns, and feed its differences `D1`
        to all later columns."""
        W1 = self.Wt[i1:i2]
        # Q1 holds the levels less the zero points: keep the levels, then dequantize as compressed-tensors does.
        self.levels_t[i1:i2] = Q1 if zero_points is None else Q1 + zero_points
        Q1.mul_(scales)
        # GPTQ's objective per column: ((w - q) / U[i, i])², w as the column was reached.
        self.losses += (W1.sub_(Q1).mul_(self.v_diagonal[i1:i2, None])).square().sum(dim=0) / 2
        W1.copy_(Q1)
        self.Wt[i2:].addmm_(feedback[:, i2 - i1 :].T, D1)


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
    order = resolve_actorder(args, actorder)
    group = args.group_size if args.strategy == QuantizationStrategy.GROUP else cols
    # Static scales come from the original weight in column order, before any permutation.
    static_scales = args.strategy == QuantizationStrategy.CHANNEL or order == "weight"
    columns, perm, damping = _prepare(
        weight, hessian, args, order, group, static_scales, dampening_frac, overwrite_hessian, name
    )
    if static_scales:
        graph = None
        if cuda_graph and columns.Wt.is_cuda:
            graph = ColumnLoopGraph(block_size, rows, columns.Wt.device, columns.qmin, columns.qmax, args.symmetric)
        _quantize_static_scales(columns, out_dtype, block_size, graph)
    else:
        _quantize_dynamic_scales(columns, args, out_dtype, group, block_size)

    unpermute = torch.argsort(perm)
    W = columns.Wt.index_select(0, unpermute).T
    levels = columns.levels_t.index_select(0, unpermute).T
    g_idx = None
    if order == "group" and args.strategy == QuantizationStrategy.GROUP:
        g_idx = columns.column_group[unpermute].to(torch.int32)
    return GPTQResult(
        weight=W.to(out_dtype).contiguous(),
        levels=levels.contiguous(),
        scale=columns.scale_t.T.to(out_dtype).contiguous(),
        zero_point=columns.zero_point_t.T.to(torch.int8).contiguous(),
        g_idx=g_idx,
        row_losses=columns.losses,
        damping=damping,
    )


def _prepare(
    weight: torch.Tensor, hessian: torch.Tensor, args: QuantizationArgs, order: str | None, group: int,
    static_scales: bool, dampening_frac: float, overwrite_hessian: bool, name: str,
) -> tuple[_Columns, torch.Tensor, float]:  # fmt: skip
    """Checks, static scales, the processing order, the damped Hessian's one Cholesky factor: the
    weight's `_Columns`, the order (`perm`) and the dampening fraction used. Searched static scales
    come from Wᵀ, after the factorization, when the Hessian's working copy is gone."""
    rows, cols = weight.shape
    W = weight.detach().to(torch.float32).clone()
    # The working copy is permuted and damped in place.
    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=not overwrite_hessian)
    # A sum is one cheap pass (isfinite() is three); it is also inf when the values overflow fp32.
    if not torch.isfinite(H.sum()):
        raise GPTQError(f"{name}: the Hessian has non-finite values (inf/NaN in the calibration activations)")
    if not torch.isfinite(W.sum()):
        raise GPTQError(f"{name}: the weight has non-finite values")
    qmin, qmax = (float(v) for v in calculate_range(args, W.device))
    num_groups = cols // group

    # Columns no calibration token touched: their weights cannot affect outputs; quantize them to 0.
    dead = torch.diag(H) == 0
    W.masked_fill_(dead, 0)
    search = scale_search(args, name)
    searcher = importance = None
    if search is not None:
        searcher = ScaleSearcher(search, args, weight.dtype, W.device, qmin, qmax)
        if search.weighted:  # each column's mean squared input, up to a factor (imatrix); dead ones 0
            importance = torch.diag(H).clone()
            importance /= importance.mean().clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.zeros(rows, num_groups, device=W.device)
    zero_point = torch.zeros(rows, num_groups, device=W.device)
    if static_scales and searcher is None:
        s, z = qparams(W.reshape(rows, num_groups, group), args, weight.dtype)
        scale[:], zero_point[:] = s, z

    diagonal = torch.diag(H).masked_fill(dead, 1)
    perm = torch.argsort(diagonal, descending=True) if order is not None else torch.arange(cols, device=W.device)
    reverse = perm.flip(0)  # the factorization wants the Hessian in reversed processing order
    rows_permuted = H[reverse]
    torch.index_select(rows_permuted, 1, reverse, out=H)  # H[reverse][:, reverse] into the working copy
    del rows_permuted
    H.diagonal().masked_fill_(dead[reverse], 1)
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
    # Work on Wᵀ so that a weight column (the unit GPTQ steps over) is one contiguous vector.
    Wt = W.T.contiguous()
    del W
    device = Wt.device
    if static_scales and searcher is not None:  # searched on the original weight, by groups of Wᵀ's rows
        by_group = Wt.view(num_groups, group, rows).transpose(0, 1)  # [group, groups, rows]
        weights = None if importance is None else importance.view(num_groups, group).T[..., None]
        s, z = searcher(by_group, weights)
        scale[:], zero_point[:] = s.T, z.T
    columns = _Columns(
        Wt=Wt.index_select(0, perm),
        # Stored reversed: V[i, j] = T[cols-1-i, cols-1-j] with T = L (V) or L⁻¹ (U = V⁻¹).
        factor=reversed_factor,
        v_diagonal=reversed_factor.diagonal().flip(0),
        column_group=column_group,
        scale_t=scale.T.contiguous(),
        zero_point_t=zero_point.T.contiguous(),
        qmin=qmin,
        qmax=qmax,
        symmetric=args.symmetric,
        levels_t=torch.empty(cols, rows, dtype=torch.int8, device=device),
        losses=torch.zeros(rows, device=device),
        searcher=searcher,
        importance=None if importance is None else importance[perm],
    )
    return columns, perm, damping


def _quantize_static_scales(
    columns: _Columns, out_dtype: torch.dtype, block: int, graph: ColumnLoopGraph | None
) -> None:
    """The V form (V = U⁻¹, H = V·Vᵀ from one Cholesky; Chen et al., 2025, GPTQ as Babai's nearest
    plane): the feedback carries (original - quantized) columns, with every column's scale known."""
    # The originals in the weight's own dtype (exact: W was converted from it), read a block at a time.
    original_t = columns.Wt.to(out_dtype, copy=True)
    cols = len(columns.Wt)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = columns.Wt[i1:i2]  # a view: updated in place, ends up holding the quantized columns
        source1 = original_t[i1:i2].to(torch.float32)
        feedback = columns.rows_of(i1, i2).div_(columns.v_diagonal[i1:])  # V[i, j] / V[j, j]
        feedback1 = feedback[:, : i2 - i1]
        groups = columns.column_group[i1:i2]  # each column's scale row, gathered on the device (no host sync)
        scales = columns.scale_t.index_select(0, groups)
        zero_points = None if columns.symmetric else columns.zero_point_t.index_select(0, groups)
        if graph is not None and i2 - i1 == block:
            Q1, D1 = graph.run(W1, source1, feedback1, scales, zero_points)
        else:
            Q1, D1 = torch.empty_like(W1), torch.empty_like(W1)
            quantize_columns(
                W1, source1, Q1, D1, feedback1, scales, zero_points, columns.qmin, columns.qmax, range(i2 - i1)
            )
        columns.finish_block(i1, i2, Q1, D1, feedback, scales, zero_points)


def _quantize_dynamic_scales(
    columns: _Columns, args: QuantizationArgs, out_dtype: torch.dtype, group: int, block_size: int
) -> None:
    """GPTQ's usual U form (U = chol_upper(H⁻¹)): a group's scale is taken from its columns as the
    updates for all earlier columns left them, which the V form holds only for each column as it is
    reached. The feedback carries (current - quantized) columns."""
    identity = torch.eye(len(columns.Wt), device=columns.factor.device)
    columns.factor = torch.linalg.solve_triangular(columns.factor, identity, upper=False)
    del identity
    cols = len(columns.Wt)
    block = max(group, block_size - block_size % group)  # blocks must not cut through a group
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = columns.Wt[i1:i2]  # a view: updated in place, ends up holding the quantized columns
        feedback = columns.rows_of(i1, i2).mul_(-columns.v_diagonal[i1:i2, None])  # -U[i, j] / U[i, i]
        feedback1 = feedback[:, : i2 - i1]
        Q1, D1 = torch.empty_like(W1), torch.empty_like(W1)
        for start in range(0, i2 - i1, group):
            g = (i1 + start) // group
            current = W1[start : start + group]  # the group's columns as GPTQ's updates left them
            if columns.searcher is None:
                columns.scale_t[g], columns.zero_point_t[g] = qparams(current.T, args, out_dtype)
            else:
                weights = columns.importance
                weights = None if weights is None else weights[i1 + start : i1 + start + group, None]
                columns.scale_t[g], columns.zero_point_t[g] = columns.searcher(current, weights)
            scales = columns.scale_t[g].expand_as(W1)
            zero_points = None if columns.symmetric else columns.zero_point_t[g].expand_as(W1)
            quantize_columns(
                W1, W1, Q1, D1, feedback1, scales, zero_points, columns.qmin, columns.qmax, range(start, start + group)
            )
        scales = columns.scale_t.index_select(0, columns.column_group[i1:i2])
        zero_points = None if columns.symmetric else columns.zero_point_t.index_select(0, columns.column_group[i1:i2])
        columns.finish_block(i1, i2, Q1, D1, feedback, scales, zero_points)
