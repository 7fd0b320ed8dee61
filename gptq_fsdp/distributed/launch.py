"""Joining the process group a launcher describes, and the sharding settings it exports.

`torchrun` and `accelerate launch` export RANK/WORLD_SIZE; `accelerate launch` with an FSDP config
also exports FSDP_* settings, which we apply ourselves: on a CPU-only machine accelerate's own
`Accelerator()` does not apply FSDP (it reports DistributedType.NO).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from gptq_fsdp.model.experts import expert_params
from gptq_fsdp.model.layers import find_decoder_layers


class LaunchError(RuntimeError):
    """The environment does not describe a consistent multi-process launch."""


def init_distributed(deepspeed_comm: bool = False, timeout_s: float | None = None) -> int:
    """Join the process group the launcher describes (gloo on CPU, nccl on GPU); return the world size.

    `deepspeed_comm` initialises through `deepspeed.init_distributed`, which ZeRO-3 needs. A collective
    that waits longer than `timeout_s` (default: GPTQ_FSDP_TIMEOUT or 30 min) for a dead or hung rank
    fails, so every rank exits instead of hanging.
    """
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("GPTQ_FSDP_TIMEOUT", 1800)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if world > 1 and missing and not dist.is_initialized():
        raise LaunchError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start every rank with a launcher "
            "(torchrun, accelerate launch, deepspeed), or unset WORLD_SIZE for one process"
        )
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if deepspeed_comm:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return world


def use_zero3() -> bool:
    """Launched by `accelerate launch` with a DeepSpeed ZeRO-3 config."""
    return (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3") == "3"
    )


def zero3_config(config_file: str | Path | None = None, offload_param: bool | None = None) -> dict:
    """A ZeRO-3 config: the given file, else what `accelerate launch` exported, else the defaults.

    Every parameter is partitioned (persistence threshold 0), and the batch size that DeepSpeed
    insists on is set, since nothing trains.
    """
    config_file = config_file or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    config = json.loads(Path(config_file).read_text()) if config_file else {}
    zero = config.setdefault("zero_optimization", {})
    if zero.setdefault("stage", 3) != 3:
        raise ValueError(f"the DeepSpeed config asks for ZeRO stage {zero['stage']}; only stage 3 shards parameters")
    if offload_param is None:
        offload_param = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu"
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    zero.setdefault("stage3_param_persistence_threshold", 0)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key) in (None, "auto"):
            config[key] = 1
    config.pop("train_batch_size", None)
    return config


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class FSDPSettings:
    """What `fully_shard` is applied with; `from_env` reads what `accelerate launch` exports."""

    layer_classes: list[str] | None = None  # default: the model's decoder-layer class
    reshard_after_forward: bool = True
    offload_params: bool = False
    # Each MoE experts module its own FSDP2 module (expert-parallel calibration keeps it sharded).
    expert_parallel: bool = False

    @classmethod
    def from_env(cls) -> FSDPSettings:
        classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        return cls(
            layer_classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
            reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "1"),
            offload_params=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("true", "1"),
        )


def apply_fully_shard(model: nn.Module, settings: FSDPSettings) -> nn.Module:
    """`fully_shard` every wrap-class module (default: each decoder layer), then the root; with
    `expert_parallel`, each fused MoE experts module first."""
    kwargs = {"reshard_after_forward": settings.reshard_after_forward}
    if settings.offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if settings.layer_classes:
        wrapped = [m for m in model.modules() if type(m).__name__ in settings.layer_classes]  # before wrapping
        if not wrapped:
            raise ValueError(f"no module of class {settings.layer_classes} to wrap in {type(model).__name__}")
    else:
        wrapped = list(find_decoder_layers(model)[1])
    if settings.expert_parallel:  # before their layers: a module's parameters join its innermost fully_shard
        layers_name, layers = find_decoder_layers(model)
        params = [p for i, layer in enumerate(layers) for p in expert_params(model, layer, f"{layers_name}.{i}.")]
        for module in dict.fromkeys(p.module for p in params):
            fully_shard(module, **kwargs)
    for module in wrapped:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model
