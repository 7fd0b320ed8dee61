"""Rounding-error bounds that the tests' tolerances come from (N. Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed.: §3.1 for sums and products, Thm 10.3 for Cholesky).

They hold for any summation order, blocking or vector width, so on any CPU (AVX2, AVX-512, AMX)
and thread count: a test that stays inside one of them passes wherever IEEE fp32 arithmetic runs.
"""

from __future__ import annotations

import torch

FP32_U = 2.0**-24  # unit roundoff of IEEE fp32 (round to nearest)
FP64_U = 2.0**-53


def gamma(n: int, u: float = FP32_U) -> float:
    """γ_n = n·u / (1 - n·u): the relative error bound of n rounded operations in a row."""
    assert n * u < 1
    return n * u / (1 - n * u)


def xtx_bound(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Componentwise bound on |computed ΣXᵀX − exact ΣXᵀX| when each input's XᵀX is an fp32 matmul
    (products of exactly representable values, n-term fp32 sums: γ_n·|X|ᵀ|X|) and the products are
    summed in float64; the float64 reference it is compared with adds its own n + k roundings."""
    absolute = [x.double().abs().T @ x.double().abs() for x in inputs]
    k = len(inputs)
    return sum((gamma(x.shape[0]) + gamma(x.shape[0] + k, FP64_U)) * a for x, a in zip(inputs, absolute, strict=True))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str = "") -> None:
    """|actual − expected| ≤ bound, elementwise (the comparison itself in float64)."""
    excess = (actual.double() - expected.double()).abs() - torch.as_tensor(bound, dtype=torch.float64)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{what}: {excess.max().item():.3g} beyond the bound at flat index {worst} "
        f"(actual {actual.flatten()[worst].item():.9g}, expected {expected.flatten()[worst].item():.9g})"
    )


def cholesky_backward_bound(factor: torch.Tensor) -> torch.Tensor:
    """Thm 10.3: a Cholesky factor L̂ computed in fp32 satisfies L̂L̂ᵀ = H + ΔH with
    |ΔH| ≤ γ_{n+1}·|L̂||L̂|ᵀ, whatever the order of its inner products (so blocked or not)."""
    absolute = factor.double().abs()
    return gamma(factor.shape[0] + 1) * (absolute @ absolute.T)
