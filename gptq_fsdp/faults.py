"""Fault injection for tests: `GPTQ_FSDP_FAULT` makes a run fail the way real runs fail.

    GPTQ_FSDP_FAULT="kill:rank=1,layer=2"   rank 1 dies (os._exit) when it reaches layer 2
    GPTQ_FSDP_FAULT="hang:rank=1,layer=2"   rank 1 stops answering at layer 2 (sleeps for an hour)
    GPTQ_FSDP_FAULT="nan:layer=2"           the calibration inputs of layer 2 get a NaN (every rank)
    GPTQ_FSDP_FAULT="disk_full"             writing a checkpoint file fails with ENOSPC
    GPTQ_FSDP_FAULT="signal:seconds=5"      an --overwrite save pauses 5 s between its two renames
                                            (the test sends a signal then; the save must not yield to it)

Unset (the normal case) every hook here is a no-op.
"""

from __future__ import annotations

import errno
import os
import time

import torch

ENV = "GPTQ_FSDP_FAULT"


def _fault() -> tuple[str, dict[str, int]] | None:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    kind, _, params = spec.partition(":")
    fields = dict(item.split("=", 1) for item in params.split(",") if item)
    return kind, {k: int(v) for k, v in fields.items()}


def at_layer(rank: int, layer: int, hidden: list[torch.Tensor]) -> None:
    """Called as every rank starts a decoder layer."""
    fault = _fault()
    if fault is None:
        return
    kind, where = fault
    if where.get("layer") != layer or where.get("rank", rank) != rank:
        return
    if kind == "kill":
        os._exit(17)
    if kind == "hang":
        print(f"gptq-fsdp: fault: rank {rank} hangs at layer {layer}", flush=True)  # tests signal it from here
        time.sleep(3600)
    if kind == "nan" and hidden:
        hidden[0].view(-1)[0] = float("nan")


def before_write(path: os.PathLike | str) -> None:
    """Called before each checkpoint file is written."""
    fault = _fault()
    if fault is not None and fault[0] == "disk_full":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))


def between_renames() -> None:
    """Called in an --overwrite save after the old checkpoint was moved aside, before the new one
    takes its place."""
    fault = _fault()
    if fault is not None and fault[0] == "signal":
        print("gptq-fsdp: fault: between the renames", flush=True)
        time.sleep(fault[1].get("seconds", 5))
