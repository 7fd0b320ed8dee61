"""Per-rank state after each finished layer, so a crashed run continues where it stopped.

After layer L each rank writes one small file with the packed weights it owns in that layer (the
checkpoint tensors: 1/8 of fp32 at 4 bits, and only the owner's). On resume, the last layer every
rank recorded is found, owners unpack their weights and scatter them into every rank's shards
(exactly as after GPTQ), and the calibration inputs are recomputed by running the finished layers
forward once: the state stays small, and the result is the uninterrupted run's, bit for bit.

Every file records the identity of its run (`run_identity`: the code version, the model's weights,
scheme, settings, calibration data and world size). Resuming refuses a state of another run and
names what differs; a run that does not resume removes any earlier state first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from gptq_fsdp.distributed import Backend, collectives
from gptq_fsdp.io.packing import unpack_weight

logger = logging.getLogger("gptq_fsdp")
STATE_FILE = re.compile(r"rank(\d{5})-layer(\d{5})\.(pt|tmp)$")
IDENTITY_FILE = "run.json"  # the identity of the run the layer files belong to


class ResumeError(ValueError):
    """The state cannot be resumed: another run's, or unreadable."""


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def run_identity(config, calibration, world_size: int, quantized: list[str], weights: str) -> dict[str, str]:
    """What must not change between a crashed run and its resumption, by what a user would name it.
    `weights` identifies the model's weights and dtypes (`pipeline.loop.check_weights`)."""
    return {
        "gptq_fsdp version": version("gptq_fsdp"),
        "model weights": weights,
        "quantization scheme": config.scheme.model_dump_json(),
        "GPTQ settings": (
            f"dampening {config.dampening_frac}, block size {config.block_size}, batch size {config.batch_size}, "
            f"matmul precision {config.matmul_precision}, true-sequential {config.true_sequential}"
        ),
        "quantized modules": _digest(repr(quantized).encode()),
        "calibration data": _digest(
            calibration.input_ids.numpy().tobytes(), calibration.attention_mask.numpy().tobytes()
        ),
        "world size": str(world_size),
    }


def _differences(found: dict, expected: dict) -> str:
    """'world size (2 -> 3), model weights' for the fields that differ; short values are shown."""
    named = []
    for key in expected:
        old, new = found.get(key), expected[key]
        if key == "model weights" and found.get("world size") != expected["world size"]:
            continue  # its digest is taken over each rank's shards: another world size gives another one
        if old != new:
            shown = f" ({old} -> {new})" if max(len(str(old)), len(new)) <= 40 else ""
            named.append(f"{key}{shown}")
    return ", ".join(named)


class LayerState:
    def __init__(self, directory: str | Path, backend: Backend, identity: dict[str, str]) -> None:
        self.directory, self.backend, self.identity = Path(directory), backend, identity
        self.prefix = f"rank{backend.rank:05d}-layer"

    def _file(self, layer: int) -> Path:
        return self.directory / f"{self.prefix}{layer:05d}.pt"

    def save(self, layer: int, records: dict) -> None:
        """This rank has finished `layer`: record the packed weights it owns there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._file(layer).with_suffix(".tmp")
        torch.save({"identity": self.identity, "records": records}, tmp)
        os.replace(tmp, self._file(layer))

    def _read(self, path: Path) -> dict:
        try:
            state = torch.load(path, weights_only=False)
            return {"identity": state["identity"], "records": state["records"]}
        except Exception as error:  # truncated, garbled, or written by an older version
            raise ResumeError(self._unreadable(path, error)) from error

    def _unreadable(self, path: Path, error: Exception) -> str:
        return (
            f"the resume state {path} is unreadable ({type(error).__name__}: {error}); delete "
            f"{self.directory} or run without --resume to start over"
        )

    def _agree(self, problem: str | None) -> None:
        """Every rank raises the first rank's problem, if any rank has one (collective)."""
        problems = [p for p in collectives.gather_all(problem) if p is not None]
        if problems:
            raise ResumeError(problems[0])

    def start_over(self) -> None:
        """Before a run that does not resume: remove earlier state files of any rank, record this
        run's identity (collective)."""
        stale = sorted(p.name for p in self.directory.iterdir()) if self.directory.exists() else []
        if self.backend.rank == 0 and any(STATE_FILE.match(name) for name in stale):
            logger.warning("%s holds the state of an earlier run: starting from layer 0 and replacing it "
                           "(--resume continues such a run)", self.directory)  # fmt: skip
        collectives.barrier()
        for name in stale:
            match = STATE_FILE.match(name)
            mine = match is not None and int(match.group(1)) == self.backend.rank
            if mine or (self.backend.rank == 0 and (match is None or int(match.group(1)) >= self.backend.world_size)):
                (self.directory / name).unlink(missing_ok=True)
        if self.backend.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f"{IDENTITY_FILE}.tmp"
            tmp.write_text(json.dumps(self.identity, indent=1) + "\n")
            os.replace(tmp, self.directory / IDENTITY_FILE)
        collectives.barrier()

    def check(self) -> None:
        """Before any work of a resumed run: the state here is this run's, or a clear error names
        what differs (collective: every rank raises the same error). Reads only the small identity
        file; each rank's layer files are checked against it as they are loaded."""
        problem = None
        path = self.directory / IDENTITY_FILE
        if self.backend.rank == 0 and path.exists():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                problem = self._unreadable(path, error)
            else:
                if found != self.identity:
                    problem = (
                        f"--resume: {self.directory} holds the state of another run (it differs in "
                        f"{_differences(found, self.identity)}); delete it or run without --resume to start over"
                    )
        self._agree(problem)

    def load(self) -> tuple[int, dict]:
        """The last layer every rank recorded (-1 if none) and this rank's records up to it."""
        pattern = re.compile(re.escape(self.prefix) + r"(\d{5})\.pt$")
        states, problem = {}, None
        if self.directory.exists():
            for path in sorted(self.directory.iterdir()):
                if match := pattern.match(path.name):
                    try:
                        state = self._read(path)
                    except ResumeError as error:
                        problem = str(error)
                        break
                    if state["identity"] != self.identity:
                        problem = f"--resume: {path} belongs to another run; delete {self.directory} to start over"
                        break
                    states[int(match.group(1))] = state["records"]
        self._agree(problem)
        newest = -1
        while newest + 1 in states:  # only an unbroken run of layers from the first counts
            newest += 1
        common = min(collectives.gather_all(newest))
        records = {}
        for layer in range(common + 1):
            records.update(states[layer])
        return common, records

    def restore_weights(self, records: dict, modules: dict[str, nn.Linear], scheme) -> None:
        """Owners unpack their weights; every rank's shards receive them (collective, global order)."""
        owners = {}
        for rank, names in enumerate(collectives.gather_all(sorted(records))):
            owners.update(dict.fromkeys(names, rank))
        for name in sorted(owners):
            full = None
            if owners[name] == self.backend.rank:
                full = unpack_weight(records[name].packed, scheme)
            self.backend.scatter_weight(modules[name].weight, full, owners[name]).wait()

    def clear(self) -> None:
        if self.directory.exists():
            for path in self.directory.iterdir():
                if path.name.startswith(self.prefix):
                    path.unlink()
        collectives.barrier()
        if self.backend.rank == 0 and self.directory.exists():
            (self.directory / IDENTITY_FILE).unlink(missing_ok=True)
            if not any(self.directory.iterdir()):
                self.directory.rmdir()
