"""compressed-tensors `pack-quantized` checkpoints, written atomically.

Packing is compressed-tensors' own `PackedQuantizationCompressor` (run by each module's owner right
after GPTQ, io/packing.py); the config block is its own `QuantizationConfig` written by
`ModelCompressor.update_config`; tensors go through safetensors' `save_file`, one file per rank
plus transformers' index format. The checkpoint goes to a temporary directory beside the target and
is renamed into place only once complete (io/output.py), so a crash never leaves a half-written
checkpoint at `output_dir`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
from compressed_tensors.utils import match_named_modules
from safetensors.torch import save_file
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from gptq_fsdp import faults
from gptq_fsdp.compat import file_module_name, in_file_layout
from gptq_fsdp.core.scheme import GPTQError
from gptq_fsdp.distributed import collectives, unwrap_engine
from gptq_fsdp.io.output import check_output_dir, move_into_place, shared_tmp_dir
from gptq_fsdp.model.layers import routers
from gptq_fsdp.pipeline.results import QuantizationResult

LOG_NAME = "gptq_fsdp_log.txt"
logger = logging.getLogger("gptq_fsdp")


def quantization_config(model: nn.Module, result: QuantizationResult) -> QuantizationConfig:
    """The `quantization_config` block: our scheme, and by name every target we did not quantize and
    every MoE router (a Linear in the checkpoint's layout, left in full precision). Each is named as
    transformers matches it on reload (in memory) and, where the files spell it otherwise (Mixtral's
    `block_sparse_moe.gate`), also so: vLLM reads `ignore` as checkpoint names."""
    scheme = result.config.scheme.model_copy(deep=True)
    scheme.format = CompressionFormat.pack_quantized.value
    done = set(result.quantized)
    left = [name for name, _ in match_named_modules(model, scheme.targets) if name not in done]
    left += [name for name in routers(model) if name not in left]
    skipped = list(dict.fromkeys(n for name in left for n in (name, file_module_name(model, name))))
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=skipped,
    )


def unquantized_tensors(model: nn.Module, result: QuantizationResult) -> dict[str, torch.Tensor]:
    """Whole copies, on rank 0, of every parameter/buffer GPTQ did not replace (tied ones once)."""
    backend = result.backend
    quantized = {f"{name}.weight" for name in result.quantized} | set(result.fused)
    tensors, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key in quantized or id(value) in seen:
            continue
        seen.add(id(value))
        full = backend.full_tensor(value, dst=0)  # collective: every rank walks the same keys
        if full is not None:
            tensors[key] = full.detach().cpu().contiguous()
    return tensors


def save_quantized(
    model: nn.Module,
    output_dir: str | Path,
    result: QuantizationResult,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (quantized in memory by `quantize_model`) as a compressed-tensors checkpoint.

    Collective under a sharded backend: each rank writes the packed weights it owns into its own
    safetensors file, rank 0 adds the unquantized tensors, the index, config and tokenizer, and
    moves the directory into place. Nothing is gathered whole except the unquantized tensors.
    """
    backend = result.backend
    model = unwrap_engine(model)
    rank, world = backend.rank, backend.world_size
    target = Path(output_dir).expanduser().absolute()  # "." has no name to put a sibling beside
    error = None
    if rank == 0:
        try:
            check_output_dir(target, overwrite)
        except (FileExistsError, FileNotFoundError, PermissionError) as exc:
            error = exc
    error = collectives.broadcast_object(error)
    if error is not None:
        raise error
    tmp = shared_tmp_dir(target)
    try:
        tensors = unquantized_tensors(model, result)
        for record in result.modules.values():
            if record.owner == rank:
                tensors.update({f"{record.name}.{k}": v for k, v in record.packed.items()})
        tensors = in_file_layout(model, tensors)
        broken = sorted(n for r in collectives.gather_all(_non_finite(tensors)) for n in r)
        if broken:
            raise GPTQError(
                f"not saving {target}: NaN or inf in {len(broken)} tensor(s): {', '.join(broken[:5])}"
                f"{', ...' if len(broken) > 5 else ''}"
            )
        file = "model.safetensors" if world == 1 else f"model-{rank + 1:05d}-of-{world:05d}.safetensors"
        faults.before_write(tmp / file)
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
        weight_maps = collectives.gather_objects(({k: file for k in tensors}, sum(sizes.values())))
        if rank == 0:
            if world > 1:
                index = {
                    "metadata": {"total_size": sum(size for _, size in weight_maps)},
                    "weight_map": dict(sorted({k: f for m, _ in weight_maps for k, f in m.items()}.items())),
                }
                (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            ModelCompressor(quantization_config=quantization_config(model, result)).update_config(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / LOG_NAME).write_text(result.table() + "\n")
        collectives.barrier()
        if rank == 0:
            move_into_place(tmp, target)
        collectives.barrier()
        if result.state is not None:
            result.state.clear()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
