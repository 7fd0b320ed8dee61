"""The scale search (observer mse / imatrix_mse) on its own: its objective, a hand-checked case,
bit-for-bit independence of the rows searched together and of the thread count, validation, the
config option. Against the float64 reference: tests/test_gptq.py; a checkpoint: tests/test_models.py."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.gptq import gptq_quantize
from gptq_fsdp.core.scales import ScaleSearcher, pairwise_sum, power
from gptq_fsdp.core.scheme import OBSERVER_DEFAULTS, GPTQError, dequantize, qparams, scale_search


def searcher_for(bits: int, symmetric: bool, group_size: int | None, observer: str, **kwargs) -> ScaleSearcher:
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy="group" if group_size else "channel", group_size=group_size,
        observer=observer, observer_kwargs=kwargs,
    )  # fmt: skip
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return ScaleSearcher(scale_search(args), args, torch.float32, torch.device("cpu"), qmin, qmax)


def by_group(weight: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, cols] -> [group, groups, rows], as GPTQ hands Wᵀ's groups to the searcher."""
    rows, cols = weight.shape
    return weight.T.contiguous().view(cols // group, group, rows).transpose(0, 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("observer,kwargs", [("mse", {}), ("imatrix_mse", {}), ("mse", {"norm": 1.5, "grid": 37})])
def test_never_worse_than_minmax(bits, symmetric, observer, kwargs):
    """Min-max is the first candidate and a later one wins only if strictly better: per group, the
    objective of the searched scales is at most that of the min-max ones, exactly (same arithmetic)."""
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(40, 96, generator=gen) * torch.rand(40, 1, generator=gen)
    weight[:, 5] = 0  # a dead column
    weight[3] = 0  # a row of zeros: every candidate's error is 0, min-max is kept
    importance = torch.rand(96, generator=gen).view(3, 32).T[..., None] if observer == "imatrix_mse" else None
    searcher = searcher_for(bits, symmetric, 32, observer, **kwargs)
    w = by_group(weight, 32)
    scale, zero_point = searcher(w, importance)
    minmax = qparams(weight.view(40, 3, 32), searcher.args, torch.float32)
    searched_error = searcher.errors(w, scale, zero_point, importance)
    minmax_error = searcher.errors(w, minmax[0].T, minmax[1].T, importance)
    assert (searched_error <= minmax_error).all()
    if bits <= 4:  # at 8 bits clipping costs more than finer steps save: min-max mostly stays
        assert (searched_error < minmax_error).float().mean() > 0.25, "the search should improve many groups"
    assert torch.equal(scale[:, 3], minmax[0][3]) and torch.equal(zero_point[:, 3], minmax[1][3])
    # Each scale is one of the candidates, i.e. a shrink of the group's own min-max range.
    candidates, _ = searcher.candidates(w)
    assert ((candidates == scale).sum(dim=0) >= 1).all()


def test_hand_checked_group():
    """w = [-1, -0.5, 0.25, 0.75], 4 bits symmetric: min-max gives s = 1/7.5 and levels -7.5 → -8, -3.75 → -4,
    1.875 → 2, 5.625 → 6, errors 1/15, 1/30, 1/60, 1/20, Σ e² = 1/120; shrinking the range to 15/16
    gives s = 1/8, where every weight is a level (error 0); 14/16 clips -1 (error > 0)."""
    searcher = searcher_for(4, True, 4, "mse", grid=16, maxshrink=0.2, norm=2)
    assert searcher.search.shrinks == (1.0, 15 / 16, 14 / 16)
    w = torch.tensor([[-1.0, -0.5, 0.25, 0.75]]).T  # [group, rows]
    scale, zero_point = searcher(w)
    assert scale.tolist() == [0.125] and zero_point.tolist() == [0.0]
    candidates, zeros = searcher.candidates(w)
    errors = torch.stack([searcher.errors(w, s, z) for s, z in zip(candidates, zeros, strict=True)])[:, 0]
    assert errors[0].item() == pytest.approx(1 / 120, rel=1e-6) and errors[1].item() == 0 and errors[2].item() > 0


@pytest.mark.parametrize("observer", ["mse", "imatrix_mse"])
def test_rows_and_threads_do_not_change_the_bits(observer):
    """Ranks that search shares of a weight's rows, at any thread count, get one process's scales."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(300, 128, generator=gen)
    importance = torch.rand(128, generator=gen).view(2, 64).T[..., None] if observer == "imatrix_mse" else None
    searcher = searcher_for(4, False, 64, observer)
    searcher.chunk = 2**12  # many chunks of rows
    whole = searcher(by_group(weight, 64), importance)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        shares = [searcher(by_group(weight[a:b], 64), importance) for a, b in [(0, 7), (7, 250), (250, 300)]]
    finally:
        torch.set_num_threads(threads)
    for i in range(2):
        assert torch.equal(torch.cat([share[i] for share in shares], dim=-1), whole[i])


def test_power_and_pairwise_sum():
    x = torch.rand(1000, dtype=torch.float64) * 3
    for norm in (1, 1.5, 2, 2.5, 3, 4, 7.5):
        torch.testing.assert_close(power(x.float(), norm).double(), x.float().double() ** norm, rtol=1e-6, atol=0)
    for n in (1, 2, 3, 5, 64, 96):
        values = torch.rand(n, 3)
        torch.testing.assert_close(pairwise_sum(values.clone()).double(), values.double().sum(dim=0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("observer", ["mse", "imatrix_mse"])
@pytest.mark.parametrize("actorder", [None, "weight"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_levels_in_range_and_dequantize_bit_for_bit(observer, actorder, symmetric, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=gen) * torch.rand(64, generator=gen)
    weight = (torch.randn(24, 64, generator=gen) * 0.05).to(dtype)
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=16, observer=observer)
    result = gptq_quantize(weight, x.T @ x, args, actorder=actorder, block_size=16)
    assert result.levels.min() >= -8 and result.levels.max() <= 7
    back = dequantize(result.levels, result.scale, result.zero_point, result.g_idx, dtype)
    assert torch.equal(back, result.weight)
    plain = gptq_quantize(weight, x.T @ x, args.model_copy(update={"observer": "minmax"}), actorder=actorder)
    assert not torch.equal(result.scale, plain.scale), "the search should change some scales"


@pytest.mark.parametrize(
    "observer,kwargs,message",
    [
        ("memoryless_mse", {}, "observer must be one of"),
        ("minmax", {"grid": 10}, "takes no observer_kwargs"),
        ("mse", {"patience": 5}, "not supported"),
        ("mse", {"norm": 2.4}, "norm in 1, 1.5"),
        ("mse", {"norm": 0.5}, "norm in 1, 1.5"),
        ("mse", {"maxshrink": 1.0}, "maxshrink < 1"),
        ("mse", {"grid": "100"}, "finite numbers"),
        ("imatrix_mse", {"grid": 1, "maxshrink": 0.5}, "empty range"),
    ],
)
def test_invalid_observers_are_clear_errors(observer, kwargs, message):
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=16, observer=observer, observer_kwargs=kwargs)
    with pytest.raises(GPTQError, match=message):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), args, name="m")


def test_candidates_are_llm_compressors():
    """mse: p = 1 − i/grid for i < maxshrink·grid; imatrix_mse: for i ≤ it (llm-compressor's loops)."""
    mse = scale_search(QuantizationArgs(num_bits=4, observer="mse"))
    imatrix = scale_search(QuantizationArgs(num_bits=4, observer="imatrix_mse"))
    assert mse.shrinks == tuple(1 - i / 100 for i in range(20)) and mse.norm == 2.5 and not mse.weighted
    assert imatrix.shrinks == tuple(1 - i / 20 for i in range(20)) and imatrix.norm == 3 and imatrix.weighted
    assert scale_search(QuantizationArgs(num_bits=4, observer="minmax")) is None
    assert scale_search(QuantizationArgs(num_bits=4)) is None


def test_config_names_the_search_and_refuses_others_up_front():
    config = GPTQConfig.from_options(scale_search="imatrix_mse")
    assert config.scale_search == "imatrix_mse" and config.weights.observer_kwargs == OBSERVER_DEFAULTS["imatrix_mse"]
    assert GPTQConfig.from_options().scale_search == "imatrix_mse"  # the default: the draws benchmark's gain
    unset = QuantizationArgs(num_bits=4, strategy="group", group_size=32)  # a scheme of the caller's, no observer
    assert GPTQConfig(scheme=QuantizationScheme(targets=["Linear"], weights=unset)).scale_search == "minmax"
    with pytest.raises(GPTQError, match="scale_search must be one of"):
        GPTQConfig.from_options(scale_search="hessian_mse")
    weights = QuantizationArgs(
        num_bits=4, strategy="group", group_size=32, observer="mse", observer_kwargs={"norm": 2.4}
    )
    with pytest.raises(GPTQError, match="scheme: the mse search needs"):
        GPTQConfig(scheme=QuantizationScheme(targets=["Linear"], weights=weights))
