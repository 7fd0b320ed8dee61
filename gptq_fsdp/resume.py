"""Per-rank state after each finished layer, so a crashed run continues where it stopped.

After layer L each rank writes one small file with the packed weights it owns in that layer (the
checkpoint tensors: 1/8 of fp32 at 4 bits, and only the owner's). On resume, the last layer every
rank recorded is found, owners unpack their weights and scatter them into every rank's shards
(exactly as after GPTQ), and the calibration inputs are recomputed by running the finished layers
forward once: the state stays small, and the result is the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from torch import nn

from gptq_fsdp.backends import Backend


def fingerprint(config, calibration, world_size: int, quantized: list[str]) -> str:
    """What must not change between the crashed run and its resumption."""
    digest = hashlib.sha256()
    digest.update(repr((config.scheme.model_dump_json(), config.dampening_frac, config.block_size)).encode())
    digest.update(repr((config.batch_size, config.matmul_precision, config.true_sequential, world_size)).encode())
    digest.update(repr(quantized).encode())
    digest.update(calibration.input_ids.numpy().tobytes() + calibration.attention_mask.numpy().tobytes())
    return digest.hexdigest()


class LayerState:
    def __init__(self, directory: str | Path, backend: Backend, fingerprint: str) -> None:
        self.directory, self.backend, self.fingerprint = Path(directory), backend, fingerprint
        self.prefix = f"rank{backend.rank:05d}-layer"

    def _file(self, layer: int) -> Path:
        return self.directory / f"{self.prefix}{layer:05d}.pt"

    def save(self, layer: int, records: dict) -> None:
        """This rank has finished `layer`: record the packed weights it owns there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._file(layer).with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, "records": records}, tmp)
        os.replace(tmp, self._file(layer))

    def load(self) -> tuple[int, dict]:
        """The last layer every rank recorded (-1 if none) and this rank's records up to it."""
        pattern = re.compile(re.escape(self.prefix) + r"(\d{5})\.pt$")
        states = {}
        if self.directory.exists():
            for path in self.directory.iterdir():
                if match := pattern.match(path.name):
                    state = torch.load(path, weights_only=False)
                    if state["fingerprint"] == self.fingerprint:
                        states[int(match.group(1))] = state["records"]
        newest = -1
        while newest + 1 in states:  # only an unbroken run of layers from the first counts
            newest += 1
        common = min(self.backend.gather_all(newest))
        records = {}
        for layer in range(common + 1):
            records.update(states[layer])
        return common, records

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
        if self.directory.exists():
            for path in self.directory.iterdir():
                if path.name.startswith(self.prefix):
                    path.unlink()
        self.backend.barrier()
        if self.backend.rank == 0 and self.directory.exists() and not any(self.directory.iterdir()):
            self.directory.rmdir()
