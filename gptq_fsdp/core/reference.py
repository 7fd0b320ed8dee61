"""A plain GPTQ to hold the fast one against: Optimal Brain Quantization one column at a time,
with the explicit inverse Hessian, in float64 (no blocks, no Cholesky, no permuted layouts), and a
plain scale search (one group and one candidate at a time, its errors in float64)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_fsdp.core.scheme import ScaleSearch


@dataclass
class ReferenceGPTQ:
    weight: torch.Tensor  # the quantized-dequantized weight, fp32
    unrounded: torch.Tensor  # w / scale + zero at each column's turn, before rounding (float64)
    order: torch.Tensor  # the columns in the order GPTQ quantizes them
    condition: float  # κ₂ of the damped Hessian
    # With a scale search, for each row, group and candidate: the error (float64) and the scale.
    search_errors: torch.Tensor | None = None  # [rows, groups, candidates]
    search_scales: torch.Tensor | None = None  # [rows, groups, candidates], fp32
    group_importance: torch.Tensor | None = None  # [groups]: the sum of the error weights of its columns


def reference_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, shrink: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max scale/zero point in fp32 of the range times `shrink` (a tensor [n, 1]: n
    ranges for each row); 0 always representable (compressed-tensors' convention)."""
    w = w.float()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.clamp(w.min(dim=1).values, max=0) * shrink
    hi = torch.clamp(w.max(dim=1).values, min=0) * shrink
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.clamp(qmin - lo / scale, qmin, qmax).round()
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return scale, zero


def reference_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` [rows, cols] quantized and dequantized with each row's scale/zero point (any leading dims
    before the rows), rounding in fp32 as compressed-tensors does (float64 out)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zero = scale[..., None], zero[..., None]
    return ((torch.clamp(torch.round(w.float() / scale + zero), qmin, qmax) - zero) * scale).double()


def reference_search(
    w: torch.Tensor, bits: int, symmetric: bool, search: ScaleSearch, importance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's scale/zero point from the candidates of `search`: the first with the least
    Σ importance·|w − q(w)|^norm (float64). Also each row's errors and scales of all candidates
    ([rows, candidates])."""
    shrinks = torch.tensor(search.shrinks, dtype=torch.float32)[:, None]
    scales, zeros = reference_qparams(w, bits, symmetric, shrinks)  # [candidates, rows]
    errors = (importance * (w.double() - reference_quantize(w, scales, zeros, bits)).abs() ** search.norm).sum(dim=-1)
    best = errors.argmin(dim=0)  # the first of equal errors
    rows = torch.arange(len(w))
    return scales[best, rows], zeros[best, rows], errors.T, scales.T


def reference_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    actorder: str | None,
    damp=0.01,
    search: ScaleSearch | None = None,
) -> ReferenceGPTQ:
    """Optimal Brain Quantization, one column at a time, with the explicit inverse Hessian (float64).

    After quantizing column j, the remaining columns absorb the error through H^-1, and H^-1 is
    downdated by eliminating j (Frantar & Alistarh 2022, eqs. 2-3). No blocks, no Cholesky. With
    `search`, each group's scale comes from `reference_search` (weighted by diag(H) if it says so)
    on the columns its min-max scale would come from.
    """
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dead = torch.diag(H) == 0
    weighted = search is not None and search.weighted
    importance = torch.diag(H).clone() if weighted else torch.ones(cols, dtype=torch.float64)  # dead columns: 0
    H[dead, dead] = 1
    W[:, dead] = 0
    group = group_size or cols
    static = group_size is None or actorder == "weight"
    scale = torch.zeros(rows, cols // group)
    zero = torch.zeros_like(scale)
    found: tuple[list, list] = ([], [])  # the searches' errors and candidate scales, group by group

    def qparams_of(g: int, w: torch.Tensor, weights: torch.Tensor) -> None:
        if search is None:
            scale[:, g], zero[:, g] = reference_qparams(w, bits, symmetric)
            return
        scale[:, g], zero[:, g], errors, scales = reference_search(w, bits, symmetric, search, weights)
        found[0].append(errors)
        found[1].append(scales)

    if static:
        for g in range(cols // group):
            qparams_of(g, W[:, g * group : (g + 1) * group], importance[g * group : (g + 1) * group])
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    if not static:  # groups are contiguous in processing order
        importance = importance[perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    condition = torch.linalg.cond(H).item()
    Hinv = torch.linalg.inv(H)
    unrounded = torch.zeros(rows, cols, dtype=torch.float64)
    for j in range(cols):
        g = int(perm[j]) // group if static else j // group
        if not static and j % group == 0:
            qparams_of(g, W[:, j : j + group], importance[j : j + group])
        w = W[:, j].clone()
        unrounded[:, j] = w / scale[:, g].double() + zero[:, g]
        # Rounding in fp32, as compressed-tensors quantizes; error feedback in float64.
        q = (
            (torch.clamp(torch.round(w.float() / scale[:, g] + zero[:, g]), qmin, qmax) - zero[:, g]) * scale[:, g]
        ).double()
        W[:, j:] -= torch.outer((w - q) / Hinv[j, j], Hinv[j, j:])
        W[:, j] = q
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    back = torch.argsort(perm)
    result = ReferenceGPTQ(W[:, back].float(), unrounded[:, back], perm, condition)
    if search is not None:
        result.search_errors, result.search_scales = torch.stack(found[0], dim=1), torch.stack(found[1], dim=1)
        result.group_importance = importance.view(-1, group).sum(dim=1)
    return result
