"""Where the model's parameters live and how ranks talk: the sharding backends behind one small
protocol (`backend.Backend`), the collectives, the owner choreography of GPTQ, launching and loading.
`compat` holds every private torch/DeepSpeed/transformers call."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from gptq_fsdp.compat import is_zero3_param
from gptq_fsdp.distributed.backend import Backend
from gptq_fsdp.distributed.fsdp2 import FSDP2Backend
from gptq_fsdp.distributed.zero3 import ZeRO3Backend


class UnsupportedModelError(TypeError):
    """The model is wrapped in a way gptq_fsdp cannot work with."""


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 or ZeRO-3 holds the model's parameters."""
    return any(isinstance(p, DTensor) or is_zero3_param(p) for p in model.parameters())


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


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The model inside a `deepspeed.initialize` engine (or the model itself)."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return model
    return model.module if isinstance(model, DeepSpeedEngine) else model


__all__ = [
    "Backend",
    "FSDP2Backend",
    "UnsupportedModelError",
    "ZeRO3Backend",
    "detect_backend",
    "is_sharded",
    "unwrap_engine",
]
