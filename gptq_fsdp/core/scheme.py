"""The weight-quantization scheme as GPTQ uses it: checks, act-order, min-max scales (compressed-tensors'
own formula) and dequantization, bit for bit as compressed-tensors reconstructs a packed weight."""

from __future__ import annotations

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_qparams


class GPTQError(RuntimeError):
    """GPTQ cannot quantize a module (invalid shape, non-finite or non-PD Hessian)."""


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
