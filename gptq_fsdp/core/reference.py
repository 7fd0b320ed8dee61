"""A plain GPTQ to hold the fast one against: Optimal Brain Quantization one column at a time,
with the explicit inverse Hessian, in float64 (no blocks, no Cholesky, no permuted layouts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReferenceGPTQ:
    weight: torch.Tensor  # the quantized-dequantized weight, fp32
    unrounded: torch.Tensor  # w / scale + zero at each column's turn, before rounding (float64)
    order: torch.Tensor  # the columns in the order GPTQ quantizes them
    condition: float  # κ₂ of the damped Hessian


def reference_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max scale/zero point in fp32; 0 always representable (compressed-tensors' convention)."""
    w = w.float()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.clamp(qmin - lo / scale, qmin, qmax).round()
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return scale, zero


def reference_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    actorder: str | None,
    damp=0.01,
) -> ReferenceGPTQ:
    """Optimal Brain Quantization, one column at a time, with the explicit inverse Hessian (float64).

    After quantizing column j, the remaining columns absorb the error through H^-1, and H^-1 is
    downdated by eliminating j (Frantar & Alistarh 2022, eqs. 2-3). No blocks, no Cholesky.
    """
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    group = group_size or cols
    static = group_size is None or actorder == "weight"
    scale = torch.zeros(rows, cols // group)
    zero = torch.zeros_like(scale)
    if static:
        for g in range(cols // group):
            scale[:, g], zero[:, g] = reference_qparams(W[:, g * group : (g + 1) * group], bits, symmetric)
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    condition = torch.linalg.cond(H).item()
    Hinv = torch.linalg.inv(H)
    unrounded = torch.zeros(rows, cols, dtype=torch.float64)
    for j in range(cols):
        g = int(perm[j]) // group if static else j // group
        if not static and j % group == 0:
            scale[:, g], zero[:, g] = reference_qparams(W[:, j : j + group], bits, symmetric)
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
    return ReferenceGPTQ(W[:, back].float(), unrounded[:, back], perm, condition)
