"""One call on whatever model a training script holds: `quantize(model, calibration)`, then `save_quantized`.

Accepted: a plain model (one process), a model wrapped by FSDP2 `fully_shard`, what
`Accelerator.prepare` returns (FSDP2 or DeepSpeed), a `deepspeed.initialize` engine, and
`trainer.model` after `trainer.train()`. The model stays usable: its shards hold the
quantized-dequantized weights.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch.distributed as dist
from torch import nn

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.data import CalibrationSet, load_texts
from gptq_fsdp.distributed import UnsupportedModelError, is_sharded, unwrap_engine
from gptq_fsdp.distributed.launch import FSDPSettings, apply_fully_shard, init_distributed
from gptq_fsdp.io.checkpoint import save_quantized as _save
from gptq_fsdp.pipeline import QuantizationResult, quantize_model

# The result of each model `quantize` quantized, until the model is gone (save_quantized reads it).
_results: weakref.WeakKeyDictionary[nn.Module, QuantizationResult] = weakref.WeakKeyDictionary()

SUPPORTED = (
    "a plain model (one process), an FSDP2 fully_shard model, Accelerator.prepare output (FSDP2 or "
    "DeepSpeed ZeRO-3), a deepspeed.initialize engine, or trainer.model"
)


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters we work on; a clear error for wrappers we cannot work with."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        raise UnsupportedModelError(
            f"FSDP1 (FullyShardedDataParallel) is not supported; use FSDP2. Supported: {SUPPORTED}"
        )
    if isinstance(model, DistributedDataParallel | DataParallel):
        if dist.is_initialized() and dist.get_world_size() > 1 and _accelerate_wants_fsdp():
            return model.module  # accelerate on CPU wraps in DDP even with an FSDP config; we shard below
        raise UnsupportedModelError(
            f"{type(model).__name__} keeps a full copy on every rank, which is what gptq_fsdp avoids; "
            f"shard it with FSDP2 or DeepSpeed ZeRO-3 instead. Supported: {SUPPORTED}"
        )
    model = unwrap_engine(model)
    return getattr(model, "_orig_mod", model)  # torch.compile


def _accelerate_wants_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _shard_if_accelerate_asked(model: nn.Module, config: GPTQConfig) -> nn.Module:
    """accelerate on a CPU-only machine exports FSDP settings without applying FSDP: apply them here
    (each MoE experts module on its own too, for expert-parallel calibration)."""
    if not is_sharded(model) and dist.is_initialized() and dist.get_world_size() > 1 and _accelerate_wants_fsdp():
        settings = FSDPSettings.from_env()
        settings.expert_parallel = config.expert_parallel
        apply_fully_shard(model, settings)
    return model


def quantize(
    model: nn.Module,
    calibration: CalibrationSet | str | list[str],
    config: GPTQConfig | None = None,
    *,
    tokenizer=None,
) -> QuantizationResult:
    """GPTQ-quantize `model` in place (collective: every rank calls it with the same arguments).

    `calibration` is a ready `CalibrationSet`, or texts / a dataset path or name that `tokenizer`
    turns into samples as `config.calibration` says (default 128 packed samples of 2048 tokens).
    `config` defaults to W4A16, group 128, symmetric, act-order static, imatrix-mse scales.
    """
    config = config or GPTQConfig.from_options()
    init_distributed()  # a no-op unless launched on several ranks with no process group yet
    module = _shard_if_accelerate_asked(unwrap(model), config)
    if not isinstance(calibration, CalibrationSet):
        if tokenizer is None:
            raise ValueError("calibration text needs a tokenizer (pass tokenizer=...)")
        texts = load_texts(calibration, tokenizer=tokenizer) if isinstance(calibration, str) else calibration
        calibration = config.calibration.build(texts, tokenizer)
    result = quantize_model(module, calibration, config)
    _results[module] = result  # for save_quantized(model, ...) without passing the result
    return result


def save_quantized(
    model: nn.Module,
    output_dir: str | Path,
    result: QuantizationResult | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write the model `quantize` just quantized as a compressed-tensors checkpoint (collective)."""
    module = unwrap(model)
    result = result or _results.get(module)
    if result is None:
        raise ValueError("this model has not been quantized: call gptq_fsdp.quantize(model, ...) first")
    return _save(module, output_dir, result, tokenizer=tokenizer, overwrite=overwrite)
