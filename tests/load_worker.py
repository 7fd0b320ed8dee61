"""Run under torchrun by tests/test_moe.py: each rank's shards after `load_sharded` and after
`load_rank0_broadcast`, against the whole `load_pretrained` model cut as FSDP2 cuts it, and the file
tensors that load_sharded read outside torch.distributed.checkpoint (the per-expert ones), with
their bytes.

torchrun --nproc_per_node N tests/load_worker.py REPORT_DIR MODEL_DIR...  (REPORT_DIR/rank{R}.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.distributed.tensor import DTensor

from gptq_fsdp.distributed import file_reads
from gptq_fsdp.distributed.fsdp2 import row_counts
from gptq_fsdp.distributed.launch import init_distributed
from gptq_fsdp.distributed.loading import load_pretrained, load_rank0_broadcast, load_sharded

REAL_SAFE_OPEN = file_reads.safe_open


class CountingFile:
    """safetensors' safe_open, recording each tensor read through get_slice (name -> bytes)."""

    read: dict[str, int] = {}

    def __init__(self, *args, **kwargs) -> None:
        self._file = REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def keys(self):
        return self._file.keys()

    def get_slice(self, key: str):
        piece = self._file.get_slice(key)

        class Slice:
            def __getitem__(self, index):
                tensor = piece[index]
                CountingFile.read[key] = CountingFile.read.get(key, 0) + tensor.nbytes
                return tensor

        return Slice()


def mismatches(model, whole, rank: int, world: int) -> list[str]:
    """Names whose local shard (or buffer) is not the whole model's rows for this rank, bit for bit."""
    expected = {**dict(whole.named_parameters(remove_duplicate=False)), **dict(whole.named_buffers())}
    wrong = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        full = expected[name].detach()
        if isinstance(tensor, DTensor):
            local, full = tensor.to_local(), full.split(row_counts(full.shape[0], world))[rank]
        else:
            local = tensor
        if local.dtype != full.dtype or not torch.equal(local, full):
            wrong.append(name)
    return wrong


def main() -> None:
    report_dir, *model_dirs = sys.argv[1:]
    torch.set_num_threads(1)
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    report = {}
    for model_dir in model_dirs:
        whole = load_pretrained(model_dir)
        CountingFile.read = {}
        with mock.patch.object(file_reads, "safe_open", CountingFile):
            sharded = load_sharded(model_dir)
        report[model_dir] = {
            "sharded": mismatches(sharded, whole, rank, world),
            "rank0": mismatches(load_rank0_broadcast(model_dir), whole, rank, world),
            "read": CountingFile.read,
            "compared": len(list(whole.parameters())),
        }
    (Path(report_dir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
