"""compressed-tensors `pack-quantized` checkpoints, written atomically.

Packing is compressed-tensors' own `PackedQuantizationCompressor`; the config block is its own
`QuantizationConfig` written by `ModelCompressor.update_config`; files are written by transformers'
`save_pretrained`. The checkpoint goes to a temporary directory beside the target and is renamed
into place only once complete, so a crash never leaves a half-written checkpoint at `output_dir`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
from compressed_tensors.utils import match_named_modules
from torch import nn

from gptq_fsdp.pipeline import QuantizationResult

LOG_NAME = "gptq_fsdp_log.txt"


class OutputDirError(FileExistsError):
    """The output directory exists and is not empty."""


def check_output_dir(output_dir: str | Path, overwrite: bool = False) -> Path:
    """Fail before any work if `output_dir` holds something and `overwrite` is off."""
    path = Path(output_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputDirError(f"output directory {path} exists and is not empty (pass overwrite / --overwrite)")
    if not path.parent.exists():
        raise FileNotFoundError(f"parent directory of the output {path.parent} does not exist")
    return path


def quantization_config(model: nn.Module, result: QuantizationResult) -> QuantizationConfig:
    """The `quantization_config` block: our scheme, and every target we did not quantize by name."""
    scheme = result.config.scheme.model_copy(deep=True)
    scheme.format = CompressionFormat.pack_quantized.value
    skipped = [name for name, _ in match_named_modules(model, scheme.targets) if name not in result.modules]
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=skipped,
    )


def compressed_state_dict(state_dict: dict[str, torch.Tensor], result: QuantizationResult) -> dict[str, torch.Tensor]:
    """Replace each quantized `weight` by `weight_packed`/`weight_scale`/`weight_shape` (+ zero point, g_idx)."""
    scheme = result.config.scheme
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module_name, _, param = key.rpartition(".")
        record = result.modules.get(module_name)
        if record is None or param != "weight":
            out[key] = tensor
            continue
        local = {"weight": tensor, "weight_scale": record.scale, "weight_zero_point": record.zero_point}
        for name, value in PackedQuantizationCompressor.compress(local, scheme).items():
            out[f"{module_name}.{name}"] = value
        if record.g_idx is not None:
            out[f"{module_name}.weight_g_idx"] = record.g_idx
    return out


def write_checkpoint(
    output_dir: str | Path,
    write_files,
    *,
    overwrite: bool = False,
) -> Path:
    """Run `write_files(tmp_dir)` into a fresh directory beside `output_dir`, then move it into place."""
    target = check_output_dir(output_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_files(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_quantized(
    model: nn.Module,
    output_dir: str | Path,
    result: QuantizationResult,
    *,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` (quantized in memory by `quantize_model`) as a compressed-tensors checkpoint."""

    def write_files(tmp: Path) -> None:
        state_dict = compressed_state_dict(model.state_dict(), result)
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        ModelCompressor(quantization_config=quantization_config(model, result)).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / LOG_NAME).write_text(result.table() + "\n")

    return write_checkpoint(output_dir, write_files, overwrite=overwrite)
