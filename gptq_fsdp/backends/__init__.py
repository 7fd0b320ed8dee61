"""Sharding backends behind one interface (see base.py), chosen from how the model's parameters look."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from gptq_fsdp.backends.base import Backend
from gptq_fsdp.backends.fsdp2 import FSDP2Backend
from gptq_fsdp.backends.zero3 import ZeRO3Backend, is_zero3_param, unwrap_engine


class UnsupportedModelError(TypeError):
    """The model is wrapped in a way gptq_fsdp cannot work with."""


def detect_backend(model: nn.Module) -> Backend:
    """FSDP2 when parameters are DTensors, ZeRO-3 when they are DeepSpeed partitions, else one process."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return FSDP2Backend()
    if any(is_zero3_param(p) for p in model.parameters()):
        return ZeRO3Backend()
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} has whole (unsharded) parameters in a {dist.get_world_size()}-rank job; "
            "wrap it with FSDP2 fully_shard or DeepSpeed ZeRO-3 (or use one process)"
        )
    return Backend()


__all__ = ["Backend", "FSDP2Backend", "UnsupportedModelError", "ZeRO3Backend", "detect_backend", "unwrap_engine"]
