"""Per-rank state after each finished layer, so a crashed run continues where it stopped.

Each rank keeps one small file: the layer it finished, the packed weights it owns (the checkpoint
tensors, 1/8 of fp32 at 4 bits) and its slice of the next layer's inputs. The previous generation
is kept beside it, so ranks that crashed while writing different layers still agree on one. On
resume, owners unpack their weights and scatter them into every rank's shards, exactly as after GPTQ.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from torch import nn

from gptq_fsdp.backends import Backend


def fingerprint(config, calibration, world_size: int, quantized: list[str]) -> str:
    """What must not change between the crashed run and its resumption."""
    digest = hashlib.sha256()
    digest.update(repr((config.scheme.model_dump_json(), config.dampening_frac, config.block_size)).encode())
    digest.update(repr((config.batch_size, world_size, quantized)).encode())
    digest.update(calibration.input_ids.numpy().tobytes() + calibration.attention_mask.numpy().tobytes())
    return digest.hexdigest()


class LayerState:
    def __init__(self, directory: Path, backend: Backend, fingerprint: str) -> None:
        self.directory, self.backend, self.fingerprint = Path(directory), backend, fingerprint
        self.path = self.directory / f"rank{backend.rank:05d}.pt"
        self.previous = self.path.with_suffix(".prev.pt")

    def save(self, layer: int, hidden: list[torch.Tensor], records: dict) -> None:
        """After `layer` is finished everywhere: this rank's next inputs and owned packed weights."""
        self.backend.barrier()  # every rank has finished the layer before anyone records it
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, "layer": layer, "hidden": hidden, "records": records}, tmp)
        if self.path.exists():
            os.replace(self.path, self.previous)
        os.replace(tmp, self.path)

    def load(self) -> dict | None:
        """The newest layer every rank has recorded (None when there is nothing to resume)."""
        states = [torch.load(p, weights_only=False) for p in (self.path, self.previous) if p.exists()]
        states = [s for s in states if s["fingerprint"] == self.fingerprint]
        newest = max((s["layer"] for s in states), default=-1)
        common = min(self.backend.gather_all(newest))
        if common < 0:
            return None
        return next(s for s in states if s["layer"] == common)

    def restore_weights(self, records: dict, modules: dict[str, nn.Linear], scheme) -> None:
        """Owners unpack their weights; every rank's shards receive them (collective, global order)."""
        owners = {}
        for rank, names in enumerate(self.backend.gather_all(sorted(records))):
            owners.update(dict.fromkeys(names, rank))
        for name in sorted(owners):
            full = None
            if owners[name] == self.backend.rank:
                full = PackedQuantizationCompressor.decompress(dict(records[name].packed), scheme)["weight"]
            self.backend.scatter_weight(modules[name].weight, full, owners[name]).wait()

    def clear(self) -> None:
        for path in (self.path, self.previous):
            path.unlink(missing_ok=True)
        self.backend.barrier()
        if self.backend.rank == 0 and self.directory.exists() and not any(self.directory.iterdir()):
            self.directory.rmdir()
