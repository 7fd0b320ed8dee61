"""Loading a model folder: whole on one process, through `deepspeed.zero.Init`, or straight into
FSDP2 shards (each rank reads only its rows)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from transformers import AutoConfig, AutoModelForCausalLM

from gptq_fsdp.distributed import collectives
from gptq_fsdp.distributed.file_reads import FileReads, plan_reads, read_expert_rows
from gptq_fsdp.distributed.fsdp2 import FSDP2Backend
from gptq_fsdp.distributed.launch import FSDPSettings, LaunchError, apply_fully_shard, device_for_rank, zero3_config


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


def _empty_sharded_model(model_dir: str | Path, dtype: torch.dtype | str, settings: FSDPSettings | None) -> nn.Module:
    """The model's FSDP2 skeleton with uninitialised local shards; buffers (rotary tables) real."""
    settings = settings or FSDPSettings()
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
    model = _empty_sharded_model(model_dir, dtype, settings)
    reader = HuggingFaceStorageReader(str(model_dir))
    reads = tensors_in_files(model, reader)
    # torch.distributed.checkpoint reads each rank's DTensor slices straight from the HF safetensors;
    # tied parameters appear once (named_parameters dedups them), as in the files.
    dcp.load(reads.direct, storage_reader=reader)
    read_expert_rows(model, reads.experts, model_dir)  # per-expert file tensors: this rank's experts only
    return model


def tensors_in_files(model: nn.Module, reader: HuggingFaceStorageReader) -> FileReads:
    """Where the files hold each of the model's parameters (under their own names, renamed, or as
    per-expert tensors of a fused MoE parameter); raise LaunchError if the files do not hold them all."""
    stored = reader.read_metadata().state_dict_metadata
    return plan_reads(model, {name: meta.size for name, meta in stored.items()})


def load_rank0_broadcast(
    model_dir: str | Path, dtype: torch.dtype | str = torch.float32, settings: FSDPSettings | None = None
) -> nn.Module:
    """Simpler path: rank 0 reads the whole checkpoint and sends each rank its rows."""
    model = _empty_sharded_model(model_dir, dtype, settings)
    backend = FSDP2Backend()
    full, error = None, None
    if backend.rank == 0:
        try:
            full = load_pretrained(model_dir, dtype)
        except LaunchError as exc:
            error = exc
    error = collectives.broadcast_object(error)
    if error is not None:
        raise error
    full_params = dict(full.named_parameters()) if full is not None else {}
    for name, param in model.named_parameters():
        source = full_params[name].detach() if full is not None else None
        backend.scatter_weight(param, source, owner=0).wait()
    # Buffers the files hold (DeepSeek-V3's router bias), whole on every rank; the rest are computed.
    buffers = None
    if full is not None:
        stored = full.state_dict()
        buffers = {name: buffer for name, buffer in full.named_buffers() if name in stored}
    buffers = collectives.broadcast_object(buffers)
    with torch.no_grad():
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
    return model
