"""GPTQ core against a plain column-by-column reference, and against round-to-nearest."""

from __future__ import annotations

import itertools

import pytest
import torch
from bounds import FP32_U, assert_within, cholesky_backward_bound
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

from gptq_fsdp.core.gptq import gptq_quantize
from gptq_fsdp.core.linalg import BLOCKED_CHOLESKY_FROM, CHOLESKY_BLOCK, cholesky, float32_matmul_precision
from gptq_fsdp.core.reference import ReferenceGPTQ
from gptq_fsdp.core.reference import reference_gptq as float64_gptq
from gptq_fsdp.core.scheme import GPTQError
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

    def assert_agrees(self, weight: torch.Tensor, other: torch.Tensor, step: torch.Tensor, bits: int) -> None:
        """`weight` and `other` (two fp32 runs) agree level for level, except that a row may take
        another level where this run's unrounded value lies within `tie_margin` of a rounding
        boundary; after that a row follows other error feedback, so only each row's first difference
        (in GPTQ's column order) can be held to it."""
        differs = ((weight - other).abs() / step > 0.5)[:, self.order]
        near_tie = ((self.unrounded - self.unrounded.floor() - 0.5).abs() <= self.tie_margin(bits))[:, self.order]
        for row in differs.any(dim=1).nonzero().flatten().tolist():
            first = int(differs[row].nonzero()[0])
            assert near_tie[row, first], f"row {row} differs at its column {int(self.order[first])}, not a tie"
        # Rows that agree throughout hold equal levels; a scale taken on entry to a group from updated
        # columns carries their feedback error, plus 4u (its rounding and the level times it).
        same = ~differs.any(dim=1)
        torch.testing.assert_close(weight[same], other[same], rtol=self.feedback_rtol + 4 * FP32_U, atol=0)


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


@pytest.mark.parametrize("actorder", [None, "static", "weight"])
def test_host_syncs_do_not_grow_with_columns(actorder):
    """No per-column or per-group `.item()`-like op: on a GPU each would stall the host."""
    from host_syncs import HostSyncs

    quant = QuantizationArgs(num_bits=4, strategy="group", group_size=32, actorder=actorder)
    counts = []
    for cols in (128, 512):
        x = torch.randn(1024, cols)
        weight, hessian = torch.randn(32, cols), x.T @ x / 1024
        with HostSyncs() as syncs:
            gptq_quantize(weight, hessian, quant, block_size=64)
        counts.append(syncs.ops)
    assert counts[0] == counts[1], counts
    assert counts[0].total() <= 4, counts[0]
