"""Process group set-up and loading a model straight into FSDP2 shards.

`torchrun` and `accelerate launch` export RANK/WORLD_SIZE; `accelerate launch` with an FSDP config
also exports FSDP_* settings, which we apply ourselves: on a CPU-only machine accelerate's own
`Accelerator()` does not apply FSDP (it reports DistributedType.NO).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import WeightConverter

from gptq_fsdp.backends.fsdp2 import FSDP2Backend
from gptq_fsdp.checkpoint import in_file_layout, weight_conversions
from gptq_fsdp.pipeline import find_decoder_layers

logger = logging.getLogger(__name__)


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


def load_pretrained(model_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """`from_pretrained`, except that tensors missing from the files (which transformers would
    initialize at random, saying so only in its log) or present but unknown to the model are an error
    that names them."""
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    problems = [
        f"{what} {len(names)} tensor(s): {', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''}"
        for what, names in (
            ("the files lack", info.get("missing_keys", [])),
            ("the model has no parameter for", info.get("unexpected_keys", [])),
            ("the files hold other shapes for", [k for k, *_ in info.get("mismatched_keys", [])]),
        )
        if names
    ]
    if problems:
        raise LaunchError(f"{model_dir} does not match its config: {'; '.join(problems)}")
    return model


def load_zero3(model_dir: str | Path, dtype: torch.dtype | str = torch.float32, config: dict | None = None):
    """Load through `deepspeed.zero.Init` (no rank materialises the model) and wrap with `deepspeed.initialize`."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = config or zero3_config()
    hf_config = HfDeepSpeedConfig(config)  # transformers holds it weakly: while alive, loading uses zero.Init
    model = load_pretrained(model_dir, dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.hf_deepspeed_config = hf_config
    return engine


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

    @classmethod
    def from_env(cls) -> FSDPSettings:
        classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        return cls(
            layer_classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
            reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "1"),
            offload_params=os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("true", "1"),
        )


def apply_fully_shard(model: nn.Module, settings: FSDPSettings) -> nn.Module:
    """`fully_shard` every wrap-class module (default: each decoder layer), then the root."""
    kwargs = {"reshard_after_forward": settings.reshard_after_forward}
    if settings.offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if settings.layer_classes:
        wrapped = [m for m in model.modules() if type(m).__name__ in settings.layer_classes]  # before wrapping
        if not wrapped:
            raise ValueError(f"no module of class {settings.layer_classes} to wrap in {type(model).__name__}")
    else:
        wrapped = list(find_decoder_layers(model)[1])
    for module in wrapped:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _empty_sharded_model(model_dir: Path, dtype: torch.dtype | str, settings: FSDPSettings) -> nn.Module:
    """The model's FSDP2 skeleton with uninitialised local shards; buffers (rotary tables) real."""
    config = AutoConfig.from_pretrained(model_dir)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings must be one parameter before sharding
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    apply_fully_shard(model, settings)
    model.to_empty(device=device_for_rank())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return model


def load_sharded(
    model_dir: str | Path, dtype: torch.dtype | str = torch.float32, settings: FSDPSettings | None = None
) -> nn.Module:
    """Build the model on the meta device, `fully_shard` it, and read only this rank's rows from disk."""
    model_dir = Path(model_dir)
    model = _empty_sharded_model(model_dir, dtype, settings or FSDPSettings())
    # torch.distributed.checkpoint reads each rank's DTensor slices straight from the HF safetensors;
    # tied parameters appear once (named_parameters dedups them), as in the files.
    reader = HuggingFaceStorageReader(str(model_dir))
    dcp.load(parameters_in_files(model, reader), storage_reader=reader)
    return model


def parameters_in_files(model: nn.Module, reader: HuggingFaceStorageReader) -> dict[str, nn.Parameter]:
    """The model's parameters under their names in the safetensors files (renamed ones too); raise
    LaunchError if the files do not hold them all.

    transformers 5 also fuses per-expert MoE weights into 3-D parameters while loading, which reading
    each rank's slices straight from the files cannot do.
    """
    stored = reader.read_metadata().state_dict_metadata
    in_files = in_file_layout(model, dict(model.named_parameters()))
    missing = [name for name in in_files if name not in stored]
    if missing and not any(isinstance(c, WeightConverter) for c in weight_conversions(model)):
        raise LaunchError(  # nothing would have made them out of other tensors: they are not there
            f"the model files lack {len(missing)} tensor(s): {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}"
        )
    if missing:
        raise LaunchError(
            f"the model files do not store {len(missing)} parameter(s) under their names "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): transformers converts them "
            "while loading, which reading each rank's slices from the files cannot do. Use --load rank0 "
            "(rank 0 loads the model through transformers and sends each rank its slices) or --backend zero3"
        )
    return in_files


def load_rank0_broadcast(
    model_dir: str | Path, dtype: torch.dtype | str = torch.float32, settings: FSDPSettings | None = None
) -> nn.Module:
    """Simpler path: rank 0 reads the whole checkpoint and sends each rank its rows."""
    model_dir = Path(model_dir)
    model = _empty_sharded_model(model_dir, dtype, settings or FSDPSettings())
    backend = FSDP2Backend()
    full, error = None, None
    if backend.rank == 0:
        try:
            full = load_pretrained(model_dir, dtype)
        except LaunchError as exc:
            error = exc
    error = backend.broadcast_object(error)
    if error is not None:
        raise error
    full_params = dict(full.named_parameters()) if full is not None else {}
    for name, param in model.named_parameters():
        source = full_params[name].detach() if full is not None else None
        backend.scatter_weight(param, source, owner=0).wait()
    return model
