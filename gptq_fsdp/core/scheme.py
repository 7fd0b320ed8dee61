"""The weight-quantization scheme as GPTQ uses it: checks, act-order, the scale search a scheme's
`observer` asks for, min-max scales (compressed-tensors' own formula) and dequantization, bit for bit
as compressed-tensors reconstructs a packed weight."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_qparams


class GPTQError(RuntimeError):
    """GPTQ cannot quantize a module (invalid shape, non-finite or non-PD Hessian)."""


# The weight observers GPTQ takes scales from, by the names llm-compressor gives them (its
# src/llmcompressor/observers/): min-max, or a search over shrunk min-max ranges for the least error
# Σ|w − q(w)|^norm per group, weighted by each column's mean squared input for imatrix_mse.
OBSERVERS = ("minmax", "mse", "imatrix_mse")
# llm-compressor's defaults for those observers' `observer_kwargs`, except mse's norm (2.4 there): the
# norm must be a multiple of 1/2 (`scales.power`). The checkpoint records the ones used.
OBSERVER_DEFAULTS = {
    "mse": {"maxshrink": 0.2, "grid": 100, "norm": 2.5},
    "imatrix_mse": {"maxshrink": 0.95, "grid": 20, "norm": 3.0},
}


@dataclass(frozen=True)
class ScaleSearch:
    """Candidate ranges p·[min, max] for each p in `shrinks` (1 first, then falling), the error's
    exponent `norm`, and whether each column's error counts by its Hessian diagonal (`weighted`)."""

    observer: str
    shrinks: tuple[float, ...]
    norm: float
    weighted: bool


def scale_search(args: QuantizationArgs, name: str = "scheme") -> ScaleSearch | None:
    """The search `args.observer` asks for (None: min-max scales), with its `observer_kwargs`
    (`maxshrink`, `grid`, `norm`; llm-compressor's defaults where absent). The candidates are those
    llm-compressor's observer of that name tries: p = 1 - i/grid, i = 0, 1, ... while i < maxshrink·grid
    (`mse`) or ≤ it (`imatrix_mse`). Every candidate is tried for every group: an early stop (llm-compressor's
    `patience`, which stops when no group of the tensor improved) would make a row's scales depend on
    the rows searched with it."""
    observer = args.observer or "minmax"
    kwargs = dict(args.observer_kwargs or {})
    if observer not in OBSERVERS:
        raise GPTQError(f"{name}: observer must be one of {OBSERVERS} (the scale search), got {observer!r}")
    if observer == "minmax":
        if kwargs:
            raise GPTQError(f"{name}: the minmax observer takes no observer_kwargs, got {sorted(kwargs)}")
        return None
    unknown = sorted(set(kwargs) - set(OBSERVER_DEFAULTS[observer]))
    if unknown:
        raise GPTQError(
            f"{name}: observer_kwargs {unknown} not supported (only maxshrink, grid and norm; every candidate "
            "is tried, with no early stop)"
        )
    settings = {**OBSERVER_DEFAULTS[observer], **kwargs}
    maxshrink, grid, norm = (settings[k] for k in ("maxshrink", "grid", "norm"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in settings.values()):
        raise GPTQError(f"{name}: observer_kwargs maxshrink, grid and norm must be finite numbers, got {settings}")
    if not (0 <= maxshrink < 1 and grid >= 1 and 1 <= norm <= 8 and float(2 * norm).is_integer()):
        raise GPTQError(
            f"{name}: the {observer} search needs 0 <= maxshrink < 1, grid >= 1 and a norm in 1, 1.5, 2, ..., 8 "
            f"(the error is raised to it by exact products and square roots), got maxshrink {maxshrink}, "
            f"grid {grid}, norm {norm}"
        )
    steps = max(1, int(maxshrink * grid)) + (observer == "imatrix_mse")
    shrinks = tuple(1 - i / grid for i in range(steps))
    if shrinks[-1] <= 0:
        raise GPTQError(f"{name}: a {observer} search with grid {grid} would try an empty range: use a finer grid")
    return ScaleSearch(observer, shrinks, float(norm), weighted=observer == "imatrix_mse")


def validate_args(args: QuantizationArgs, columns: int, name: str = "weight") -> None:
    """Raise a clear error for settings this GPTQ implementation does not support."""
    if args.type != QuantizationType.INT:
        raise GPTQError(f"{name}: only integer weight quantization is supported, got type={args.type}")
    if not 2 <= args.num_bits <= 8:
        raise GPTQError(f"{name}: num_bits must be in 2..8, got {args.num_bits}")
    if args.dynamic:
        raise GPTQError(f"{name}: dynamic weight quantization is not a GPTQ scheme")
    scale_search(args, name)
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
