"""GPTQ core against a plain column-by-column reference, and against round-to-nearest."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from bounds import FP32_U, assert_within, cholesky_backward_bound, gamma
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

from gptq_fsdp.core.gptq import gptq_quantize
from gptq_fsdp.core.linalg import BLOCKED_CHOLESKY_FROM, CHOLESKY_BLOCK, cholesky, float32_matmul_precision
from gptq_fsdp.core.reference import ReferenceGPTQ
from gptq_fsdp.core.reference import reference_gptq as float64_gptq
from gptq_fsdp.core.scheme import GPTQError, ScaleSearch, scale_search
from gptq_fsdp.core.scheme import dequantize as gptq_dequantize


def args_for(bits: int, symmetric: bool, group_size: int | None) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy="group" if group_size else "channel", group_size=group_size
    )


def reference_gptq(*args, **kwargs) -> Reference:
    return Reference(**vars(float64_gptq(*args, **kwargs)))


class Reference(ReferenceGPTQ):
    """The float64 reference run, with the fp32 error bounds the fast GPTQ is held to."""

    @property
    def feedback_rtol(self) -> float:
        """fp32 GPTQ's updated weights against this float64 run's: the error feedback solves with the
        Cholesky factor of the damped H, forward error ≤ 3·n·u·κ(H) relative (Higham §10.1, eq. 10.8)."""
        return 3 * self.order.numel() * FP32_U * self.condition

    def tie_margin(self, bits: int) -> float:
        """How close to a rounding boundary (in steps) fp32 GPTQ may be and still round otherwise than
        this float64 run: `feedback_rtol` of levels up to 2^(b-1)."""
        return self.feedback_rtol * 2 ** (bits - 1)

    def assert_agrees(
        self, weight: torch.Tensor, other: torch.Tensor, step: torch.Tensor, bits: int, skip: torch.Tensor | None = None
    ) -> None:
        """`weight` and `other` (two fp32 runs) agree level for level, except that a row may take
        another level where this run's unrounded value lies within `tie_margin` of a rounding
        boundary; after that a row follows other error feedback, so only each row's first difference
        (in GPTQ's column order) can be held to it. Rows in `skip` are not compared."""
        differs = ((weight - other).abs() / step > 0.5)[:, self.order]
        near_tie = ((self.unrounded - self.unrounded.floor() - 0.5).abs() <= self.tie_margin(bits))[:, self.order]
        if skip is not None:
            differs[skip] = False
        for row in differs.any(dim=1).nonzero().flatten().tolist():
            first = int(differs[row].nonzero()[0])
            assert near_tie[row, first], f"row {row} differs at its column {int(self.order[first])}, not a tie"
        # Rows that agree throughout hold equal levels; a scale taken on entry to a group from updated
        # columns carries their feedback error, plus 4u (its rounding and the level times it).
        same = ~differs.any(dim=1) if skip is None else ~differs.any(dim=1) & ~skip
        torch.testing.assert_close(weight[same], other[same], rtol=self.feedback_rtol + 4 * FP32_U, atol=0)

    def search_tolerance(self, search: ScaleSearch, bits: int, dynamic: bool) -> torch.Tensor:
        """[rows, groups, candidates]: how far fp32 GPTQ's error of each candidate may lie from this
        run's, so the fast search may pick another candidate only where this run's errors of the two
        lie within their tolerances of each other.

        In steps of a candidate's scale s (p times the min-max range), |w/s + z| ≤ M = 2^b/p + 2^b.
        fp32 division, zero-point addition and subtracting the level move d = w/s + z − level by at most
        3u·M; a scale taken on entry to a group from updated columns (`dynamic`) adds their feedback
        error and its own (relative `feedback_rtol` and ρ = `feedback_rtol` + 4u): δ = M·(3u + [2·feedback_rtol
        + 4u]). t ↦ t^n moves by n·(t + δ)^(n-1)·δ, and Σ c·(|d| + δ)^(n-1) ≤ (L^(1/n) + δ·I^(1/n))^(n-1)·I^(1/n)
        (Hölder, Minkowski) for L = Σ c·|d|^n = E / s^n and I = Σ c over the group. The products, the
        weights' normalization and the pairwise sum add γ_k relative (k = ⌈log₂ g⌉ + 2⌈n⌉ + 4), and s^n
        n·ρ + γ_(⌈n⌉+2)."""
        n = search.norm
        p = torch.tensor(search.shrinks, dtype=torch.float64)
        steps = 2**bits / p + 2**bits
        rho = self.feedback_rtol + 4 * FP32_U if dynamic else 0.0
        delta = steps * (3 * FP32_U + (self.feedback_rtol + rho if dynamic else 0.0))
        scale_n = self.search_scales.double() ** n
        in_steps = self.search_errors / scale_n
        weights = self.group_importance[None, :, None]
        group = self.order.numel() // self.search_errors.shape[1]
        k = math.ceil(math.log2(group)) + 2 * math.ceil(n) + 4
        moved = n * delta * (in_steps ** (1 / n) + delta * weights ** (1 / n)) ** (n - 1) * weights ** (1 / n)
        return scale_n * (moved + gamma(k) * in_steps) + self.search_errors * (n * rho + gamma(math.ceil(n) + 2))

    def assert_search_agrees(self, scale: torch.Tensor, search: ScaleSearch, bits: int, dynamic: bool) -> torch.Tensor:
        """fp32 GPTQ's scales `scale` [rows, groups] are this run's candidates (the nearest one: they are
        1/grid apart, the runs' scales of one candidate far closer), the same as this run picked except
        where the two candidates' errors lie within `search_tolerance`; returns the rows that picked otherwise."""
        picked = (self.search_scales - scale[..., None].float()).abs().argmin(dim=-1, keepdim=True)
        best = self.search_errors.argmin(dim=-1, keepdim=True)
        tolerance = self.search_tolerance(search, bits, dynamic)
        errors = self.search_errors
        gap = errors.gather(-1, picked) - errors.gather(-1, best)
        allowed = tolerance.gather(-1, picked) + tolerance.gather(-1, best)
        other = (picked != best)[..., 0]
        assert (gap[other] <= allowed[other]).all(), (gap[other], allowed[other])
        return other.any(dim=1)


def correlated_problem(rows: int, cols: int, tokens: int = 512, seed: int = 0, dead: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=gen) @ mixing * (torch.rand(cols, generator=gen) * 2 + 0.1)
    if dead:
        X[:, torch.randperm(cols, generator=gen)[:dead]] = 0
    W = torch.randn(rows, cols, generator=gen) * 0.05
    return W, X, X.T @ X


OPTIONS = list(
    itertools.product(
        [2, 3, 4, 8],  # bits
        [True, False],  # symmetric
        [None, 16],  # channel / group 16
        [None, "weight", "group"],  # act-order
    )
)


@pytest.mark.parametrize("bits,symmetric,group_size,actorder", OPTIONS)
def test_matches_reference(bits, symmetric, group_size, actorder):
    W, _, H = correlated_problem(rows=24, cols=64, dead=3, seed=bits)
    result = gptq_quantize(W, H, args_for(bits, symmetric, group_size), actorder=actorder, block_size=16)
    expected = reference_gptq(W, H, bits, symmetric, group_size, actorder)
    step = result.scale.repeat_interleave(group_size or 64, dim=1)
    if result.g_idx is not None:
        step = torch.gather(result.scale, 1, result.g_idx.long().expand(W.shape[0], -1))
    # Levels, not bits: a scale computed on entry to a group from fp32 vs float64 columns differs in
    # its last bits (4u relative: the scale's own rounding plus the level times it).
    expected.assert_agrees(result.weight, expected.weight, step, bits)


@pytest.mark.parametrize(
    "bits,observer,symmetric,group_size,actorder",
    [
        (*b, *o)
        for b in [(3, "imatrix_mse"), (4, "mse")]
        for o in itertools.product([True, False], [None, 16], [None, "weight", "group"])
    ],
)
def test_scale_search_matches_reference(bits, observer, symmetric, group_size, actorder):
    """Searched scales, on the original weight (static) or on each group's updated columns (dynamic),
    against the float64 reference's plain search: the same candidates unless two lie within rounding."""
    W, _, H = correlated_problem(rows=24, cols=64, dead=3, seed=bits)
    args = args_for(bits, symmetric, group_size).model_copy(update={"observer": observer})
    search = scale_search(args)
    result = gptq_quantize(W, H, args, actorder=actorder, block_size=16)
    expected = reference_gptq(W, H, bits, symmetric, group_size, actorder, search=search)
    dynamic = group_size is not None and actorder != "weight"
    picked_otherwise = expected.assert_search_agrees(result.scale, search, bits, dynamic)
    assert (expected.search_errors.argmin(dim=-1) > 0).float().mean() > 0.1, "the search should move scales"
    step = result.scale.repeat_interleave(group_size or 64, dim=1)
    if result.g_idx is not None:
        step = torch.gather(result.scale, 1, result.g_idx.long().expand(W.shape[0], -1))
    expected.assert_agrees(result.weight, expected.weight, step, bits, skip=picked_otherwise)


@pytest.mark.parametrize("block_size", [1, 7, 64, 128])
def test_block_size_does_not_change_the_result(block_size):
    W, _, H = correlated_problem(rows=16, cols=96, seed=1)
    args = args_for(4, True, 32)
    base = gptq_quantize(W, H, args, block_size=32)
    other = gptq_quantize(W, H, args, block_size=block_size)
    # Other blocks sum the error feedback in another order: levels may differ only at ties.
    reference_gptq(W, H, 4, True, 32, None).assert_agrees(
        other.weight, base.weight, base.scale.repeat_interleave(32, dim=1), bits=4
    )


@pytest.mark.parametrize("actorder", [None, "weight"])
def test_hessian_left_alone_unless_handed_over(actorder):
    W, _, H = correlated_problem(rows=16, cols=96, dead=2, seed=5)
    args = args_for(4, True, 32)
    original = H.clone()
    kept = gptq_quantize(W, H, args, actorder=actorder)
    assert torch.equal(H, original), "the caller's Hessian must not change"
    handed_over = gptq_quantize(W, H, args, actorder=actorder, overwrite_hessian=True)
    assert torch.equal(handed_over.weight, kept.weight) and torch.equal(handed_over.scale, kept.scale)
    if actorder is not None:
        assert not torch.equal(H, original), "with overwrite_hessian GPTQ works in the caller's tensor"


def test_ieee_fp32_whatever_the_callers_matmul_precision():
    """A caller running its forwards with bf16/TF32 matmuls must not change GPTQ's error feedback."""
    W, _, H = correlated_problem(rows=64, cols=256, seed=3)
    args = args_for(4, True, 32)
    exact = gptq_quantize(W, H, args, block_size=32)
    with float32_matmul_precision("medium"):
        fast_caller = gptq_quantize(W, H, args, block_size=32)
        assert torch.get_float32_matmul_precision() == "medium", "the caller's setting is restored"
    assert torch.equal(fast_caller.weight, exact.weight) and torch.equal(fast_caller.scale, exact.scale)


@pytest.mark.parametrize("group_size,actorder", [(None, None), (32, None), (32, "weight"), (32, "group")])
def test_beats_round_to_nearest(group_size, actorder):
    W, X, H = correlated_problem(rows=64, cols=128, tokens=1024, seed=3)
    args = args_for(4, True, group_size)
    gptq = gptq_quantize(W, H, args, actorder=actorder)
    rtn = reference_gptq(W, torch.eye(128), 4, True, group_size, None, damp=0.0).weight  # identity H: rounding
    gptq_error = ((W - gptq.weight) @ X.T).square().sum()
    rtn_error = ((W - rtn) @ X.T).square().sum()
    # Not a rounding tolerance: GPTQ's gain on correlated inputs (about half of RTN's error here)
    # is far beyond any fp32 effect, which would move these sums by ~1e-6 relative.
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_outputs_are_consistent_qparams():
    W, _, H = correlated_problem(rows=8, cols=64, seed=4)
    result = gptq_quantize(W, H, args_for(4, False, 16), actorder="group")
    assert result.scale.shape == (8, 4) and result.zero_point.shape == (8, 4)
    assert result.zero_point.dtype == torch.int8
    assert sorted(torch.bincount(result.g_idx).tolist()) == [16, 16, 16, 16]
    scale = torch.gather(result.scale, 1, result.g_idx.long().expand(8, -1))
    zero = torch.gather(result.zero_point.float(), 1, result.g_idx.long().expand(8, -1))
    q = result.weight / scale + zero
    # weight = fl((q - z)·s), |q - z| ≤ 15: dividing it back by s and adding z is off by ≤ 3u·16 from q.
    torch.testing.assert_close(q, q.round(), atol=3 * FP32_U * 16, rtol=0)
    assert q.round().min() >= -8 and q.round().max() <= 7
    assert result.row_losses.shape == (8,) and result.loss > 0


@pytest.mark.parametrize("bits,symmetric,group_size,actorder", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_levels_dequantize_to_the_weight_bit_for_bit(bits, symmetric, group_size, actorder, dtype):
    """A sharded run sends the int8 levels instead of the weight: they must give it back exactly."""
    W, _, H = correlated_problem(rows=24, cols=64, dead=3, seed=bits)
    result = gptq_quantize(W.to(dtype), H, args_for(bits, symmetric, group_size), actorder=actorder, block_size=16)
    assert result.levels.dtype == torch.int8 and result.levels.shape == W.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert result.levels.min() >= qmin and result.levels.max() <= qmax
    back = gptq_dequantize(result.levels, result.scale, result.zero_point, result.g_idx, dtype)
    assert back.dtype == dtype and torch.equal(back, result.weight)


def test_bf16_weight_is_what_compressed_tensors_dequantizes():
    W, _, H = correlated_problem(rows=8, cols=64, seed=5)
    args = args_for(4, True, 32)
    result = gptq_quantize(W.bfloat16(), H, args)
    assert result.weight.dtype == torch.bfloat16 and result.scale.dtype == torch.bfloat16
    # Packing re-quantizes our weight with our scale; unpacking must give our weight back bit for bit.
    q = quantize(result.weight, result.scale, result.zero_point, args, dtype=torch.int8)
    torch.testing.assert_close(dequantize(q, result.scale, result.zero_point, args), result.weight, atol=0, rtol=0)


def test_dead_columns_quantize_to_zero():
    W, _, H = correlated_problem(rows=8, cols=32, seed=6)
    H[:, 5] = H[5, :] = 0
    result = gptq_quantize(W, H, args_for(4, True, None))
    assert torch.all(result.weight[:, 5] == 0)


@pytest.mark.parametrize("columns", [BLOCKED_CHOLESKY_FROM, BLOCKED_CHOLESKY_FROM + CHOLESKY_BLOCK // 2 + 5])
def test_blocked_cpu_cholesky_matches_lapack(columns):
    """Large CPU matrices go by diagonal blocks (the last one partial here): same factor to fp32 rounding."""
    g = torch.Generator().manual_seed(columns)
    X = torch.randn(2 * columns, columns, generator=g)
    H = X.T @ X / (2 * columns) + 0.01 * torch.eye(columns)
    factor = cholesky(H)
    assert torch.equal(factor, factor.tril()), "the upper triangle must be zero"
    for name, computed in (("blocked", factor), ("LAPACK", torch.linalg.cholesky(H))):
        assert_within(computed.double() @ computed.double().T, H, cholesky_backward_bound(computed), name)
    # The bound is tight enough to tell a wrong factor: one block's update left out moves L·Lᵀ far more.
    assert (cholesky_backward_bound(factor) < 1e-3 * H.abs().max()).all()


def test_blocked_cpu_cholesky_raises_like_lapack():
    H = torch.eye(BLOCKED_CHOLESKY_FROM)
    H[-1, -1] = -1  # only the last diagonal block fails
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(H)


def test_cholesky_failure_retries_with_more_damping():
    cols = 32
    u = torch.ones(cols) / cols**0.5
    H = torch.eye(cols) - 1.05 * torch.outer(u, u)  # one eigenvalue of -0.05: fails at 1% damping, not at 10%
    result = gptq_quantize(torch.randn(4, cols), H, args_for(4, True, None), name="layers.0.mlp.up_proj")
    assert result.damping == pytest.approx(0.1)


def test_not_positive_definite_names_the_module():
    with pytest.raises(GPTQError, match="layers.3.self_attn.q_proj.*not positive definite"):
        gptq_quantize(torch.randn(4, 16), -torch.eye(16), args_for(4, True, None), name="layers.3.self_attn.q_proj")


@pytest.mark.parametrize(
    "args,columns,message",
    [
        (dict(num_bits=4, strategy="group", group_size=48), 64, "group_size 48 does not divide its 64"),
        (dict(num_bits=1, strategy="channel"), 64, "num_bits must be in 2..8"),
        (dict(num_bits=4, strategy="tensor"), 64, "strategy must be 'channel' or 'group'"),
        (dict(num_bits=8, type="float", strategy="channel"), 64, "only integer"),
    ],
)
def test_invalid_settings_are_clear_errors(args, columns, message):
    with pytest.raises(GPTQError, match=message):
        gptq_quantize(torch.randn(4, columns), torch.eye(columns), QuantizationArgs(**args))


def test_non_finite_hessian_is_an_error():
    H = torch.eye(16)
    H[2, 2] = float("nan")
    with pytest.raises(GPTQError, match="non-finite"):
        gptq_quantize(torch.randn(4, 16), H, args_for(4, True, None), name="m")


@pytest.mark.parametrize("actorder,observer", [(None, None), ("static", None), ("weight", None), (None, "imatrix_mse")])
def test_host_syncs_do_not_grow_with_columns(actorder, observer):
    """No per-column or per-group `.item()`-like op: on a GPU each would stall the host."""
    from host_syncs import HostSyncs

    quant = QuantizationArgs(num_bits=4, strategy="group", group_size=32, actorder=actorder, observer=observer)
    counts = []
    for cols in (128, 512):
        x = torch.randn(1024, cols)
        weight, hessian = torch.randn(32, cols), x.T @ x / 1024
        with HostSyncs() as syncs:
            gptq_quantize(weight, hessian, quant, block_size=64)
        counts.append(syncs.ops)
    assert counts[0] == counts[1], counts
    assert counts[0].total() <= 4, counts[0]
