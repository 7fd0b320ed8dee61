"""Packing a GPTQ result into the checkpoint's tensors, with compressed-tensors' own packer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme

from gptq_fsdp.core.gptq import GPTQResult
from gptq_fsdp.core.scheme import dequantize


@dataclass
class PackedModule:
    """One module's share of a group's GPTQ result."""

    name: str
    weight: torch.Tensor  # its rows of the dequantized weight (a view)
    loss: float
    packed: dict[str, torch.Tensor]  # weight_packed, weight_scale, ... on the CPU


def pack_modules(gptq: GPTQResult, names: list[str], rows: list[int], scheme: QuantizationScheme) -> list[PackedModule]:
    """Split a group's GPTQ result (its members' rows stacked in `names` order) into its modules
    and pack each for the checkpoint."""
    modules, row = [], 0
    for name, count in zip(names, rows, strict=True):
        part = slice(row, row + count)
        row += count
        weight, scale, zero_point = gptq.weight[part], gptq.scale[part], gptq.zero_point[part]
        # The packer re-quantizes the weight it is handed: give it fp32 values, from which every level
        # comes back exactly (in bf16, 8-bit levels times the scale do not all survive the rounding).
        exact = (
            weight
            if weight.dtype == torch.float32
            else dequantize(gptq.levels[part], scale, zero_point, gptq.g_idx, torch.float32)
        )
        state = {"weight": exact, "weight_scale": scale, "weight_zero_point": zero_point}
        packed = PackedQuantizationCompressor.compress(state, scheme)
        if gptq.g_idx is not None:
            packed["weight_g_idx"] = gptq.g_idx
        loss = float(gptq.row_losses[part].sum())
        modules.append(PackedModule(name, weight, loss, {k: v.cpu() for k, v in packed.items()}))
    return modules


def unpack_weight(packed: dict[str, torch.Tensor], scheme: QuantizationScheme) -> torch.Tensor:
    """The dequantized weight of a `pack_modules` result."""
    return PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
