"""compressed-tensors `pack-quantized` checkpoints, written atomically.

Packing is compressed-tensors' own `PackedQuantizationCompressor` (run by each module's owner right
after GPTQ); the config block is its own `QuantizationConfig` written by `ModelCompressor.update_config`;
tensors go through safetensors' `save_file`, one file per rank plus transformers' index format.
The checkpoint goes to a temporary directory beside the target and is renamed into place only once
complete, so a crash never leaves a half-written checkpoint at `output_dir`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
from compressed_tensors.utils import match_named_modules
from safetensors.torch import save_file
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from gptq_fsdp import faults
from gptq_fsdp.backends import unwrap_engine
from gptq_fsdp.gptq import GPTQError
from gptq_fsdp.pipeline import QuantizationResult

LOG_NAME = "gptq_fsdp_log.txt"
logger = logging.getLogger("gptq_fsdp")


class OutputDirError(FileExistsError):
    """The output directory exists and is not empty."""


def check_output_dir(output_dir: str | Path, overwrite: bool = False, inputs: dict[str, Path] | None = None) -> Path:
    """Fail before any work if `output_dir` holds something and `overwrite` is off, if its parent
    cannot be written, or if it is, holds or lies inside one of the run's `inputs` (what -> path),
    which an overwrite would destroy. Returns the absolute path."""
    path = Path(output_dir).expanduser().absolute()
    for what, source in (inputs or {}).items():
        source = Path(source).expanduser().resolve()
        resolved = path.resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            relation = "is" if resolved == source else "holds" if source.is_relative_to(resolved) else "lies inside"
            raise OutputDirError(f"the output {path} {relation} the {what} {source}: choose an output outside it")
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputDirError(f"output directory {path} exists and is not empty (pass overwrite / --overwrite)")
    if not path.parent.exists():
        raise FileNotFoundError(f"parent directory of the output {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {path.parent} (the output's parent directory)")
    return path


class OutputLock:
    """An exclusive lock on an output path for one run: a file `.NAME.lock` beside it, held with
    flock (the OS releases it if the process dies). Taking it also proves the parent writable, and
    tidies what a killed earlier run left beside the output: a half-written `.NAME.tmp-*` is removed,
    a checkpoint moved aside as `.NAME.old-*` goes back in place if nothing is at the output."""

    def __init__(self, output_dir: str | Path) -> None:
        self.target = Path(output_dir).expanduser().absolute()
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            raise PermissionError(f"cannot write beside the output {self.target}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputDirError(
                f"another run ({holder}) is writing {self.target}; wait for it or pick another output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        self._tidy()

    def _tidy(self) -> None:
        parent, name = self.target.parent, self.target.name
        for old in sorted(parent.glob(f".{name}.old-*")):
            if not self.target.exists():
                old.rename(self.target)
                logger.warning("%s: put back the checkpoint an interrupted save had moved aside (%s)", self.target, old)
            else:
                _remove(old)
                logger.warning("removed %s, a checkpoint an interrupted save had already replaced", old)
        for tmp in sorted(parent.glob(f".{name}.tmp-*")):
            _remove(tmp)
            logger.warning("removed %s, left half-written by an interrupted run", tmp)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block take effect right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        s: signal.signal(s, lambda number, frame: caught.append(number)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def quantization_config(model: nn.Module, result: QuantizationResult) -> QuantizationConfig:
    """The `quantization_config` block: our scheme, and every target we did not quantize by name."""
    scheme = result.config.scheme.model_copy(deep=True)
    scheme.format = CompressionFormat.pack_quantized.value
    done = set(result.quantized)
    skipped = [name for name, _ in match_named_modules(model, scheme.targets) if name not in done]
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=skipped,
    )


def _unquantized_tensors(model: nn.Module, result: QuantizationResult) -> dict[str, torch.Tensor]:
    """Whole copies, on rank 0, of every parameter/buffer GPTQ did not replace (tied ones once)."""
    backend = result.backend
    quantized = {f"{name}.weight" for name in result.quantized}
    tensors, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key in quantized or id(value) in seen:
            continue
        seen.add(id(value))
        full = backend.full_tensor(value, dst=0)  # collective: every rank walks the same keys
        if full is not None:
            tensors[key] = full.detach().cpu().contiguous()
    return tensors


def in_file_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under the names the model's own files give them, as save_pretrained writes
    them: transformers 5 renames some while loading (gpt_neox's `embed_out` is `lm_head` in memory).

    Models whose loading also fuses per-expert MoE weights into 3-D parameters keep the in-memory
    names: their experts are not quantized here, and transformers 5.24 loads a compressed-tensors
    checkpoint's per-expert weights only when they are quantized.
    """
    conversions = weight_conversions(model)
    if any(isinstance(c, WeightConverter) for c in conversions):
        return dict(tensors)
    renamings = [c.reverse_transform() for c in reversed(conversions) if isinstance(c, WeightRenaming)]
    return {apply_renamings(name, renamings): tensor for name, tensor in tensors.items()}


def weight_conversions(model: nn.Module) -> list:
    """What transformers 5 does to this model's tensors while loading: renamings and converters
    (a converter fuses per-expert MoE weights into 3-D parameters)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        # The model's class, not FSDP2's subclass of it: transformers takes that for custom code and
        # finds no conversions for it (so revert_weight_conversion would rename nothing there).
        cls = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers."))
        found = get_checkpoint_conversion_mapping(cls.__name__)
        conversions = found or get_checkpoint_conversion_mapping(model.config.model_type) or []
    return list(conversions)


def _shared_tmp_dir(target: Path, backend) -> Path:
    """A fresh directory beside `target`, made by rank 0 and named to all ranks (shared filesystem)."""
    path = str(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)) if backend.rank == 0 else None
    return Path(backend.broadcast_object(path))


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
    error = backend.broadcast_object(error)
    if error is not None:
        raise error
    tmp = _shared_tmp_dir(target, backend)
    try:
        tensors = _unquantized_tensors(model, result)
        for record in result.modules.values():
            if record.owner == rank:
                tensors.update({f"{record.name}.{k}": v for k, v in record.packed.items()})
        tensors = in_file_layout(model, tensors)
        broken = sorted(n for r in backend.gather_all(_non_finite(tensors)) for n in r)
        if broken:
            raise GPTQError(
                f"not saving {target}: NaN or inf in {len(broken)} tensor(s): {', '.join(broken[:5])}"
                f"{', ...' if len(broken) > 5 else ''}"
            )
        file = "model.safetensors" if world == 1 else f"model-{rank + 1:05d}-of-{world:05d}.safetensors"
        faults.before_write(tmp / file)
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
        weight_maps = backend.gather_objects(({k: file for k in tensors}, sum(sizes.values())))
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
        backend.barrier()
        if rank == 0:
            _move_into_place(tmp, target)
        backend.barrier()
        if result.state is not None:
            result.state.clear()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _move_into_place(tmp: Path, target: Path) -> None:
    """Two renames with no signal between them: the old checkpoint or the new one is at `target`
    at every moment (a kill -9 between them leaves `.NAME.old-*`, which OutputLock puts back)."""
    os.chmod(tmp, 0o755)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    with _signals_deferred():
        if not target.exists():
            tmp.rename(target)
            return
        target.rename(old)
        faults.between_renames()
        try:
            tmp.rename(target)
        except OSError:
            old.rename(target)  # keep the previous checkpoint rather than nothing
            raise
        _remove(old)
