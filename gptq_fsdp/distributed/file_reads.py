"""What each rank reads from a model's safetensors files to fill its FSDP2 shards.

Most parameters are stored under one name (transformers' renamings aside) and are read slice by slice
by torch.distributed.checkpoint. transformers 5 builds fused MoE experts while loading: the files hold
per-expert 2-D tensors (Mixtral `block_sparse_moe.experts.{E}.w1/w3/w2`, Qwen3-MoE
`mlp.experts.{E}.gate_proj/up_proj/down_proj`) that its converters stack into `gate_up_proj`
[E, 2I, H] (each expert's gate rows, then its up rows) and `down_proj` [E, H, I]. Where each file
tensor's rows go is found by running the model's own save conversion on a probe, [E, rows, 1]
holding each row's index: a file tensor whose probe holds rows r..r+n of one expert fills exactly
those rows. FSDP2 shards dim 0, the experts, so a rank reads the file tensors of its own experts and
no others.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from gptq_fsdp import compat
from gptq_fsdp.distributed.fsdp2 import FSDP2Backend, row_counts
from gptq_fsdp.distributed.launch import LaunchError


@dataclass(frozen=True)
class ExpertPiece:
    """File tensor `key` is rows [row, row + rows) of expert `expert`'s slice of a fused parameter."""

    key: str
    expert: int
    row: int
    rows: int


@dataclass
class FileReads:
    direct: dict[str, torch.Tensor] = field(default_factory=dict)  # file name -> parameter or buffer
    experts: dict[str, list[ExpertPiece]] = field(default_factory=dict)  # parameter name -> its file tensors


def _listing(names: list[str], limit: int = 5) -> str:
    return f"{len(names)} tensor(s): {', '.join(names[:limit])}{', ...' if len(names) > limit else ''}"


def plan_reads(model: nn.Module, stored: dict[str, torch.Size]) -> FileReads:
    """Where each of the model's parameters (and the buffers the files hold) is in files holding
    `stored` (file name -> shape); raise LaunchError naming the tensors the files lack, or the
    loading conversions this cannot read per rank."""
    names = compat.FileNames(model)
    loads = {key: names.loaded_as(key) for key in sorted(stored)}
    as_is = {name: key for key, (name, converter) in reversed(loads.items()) if converter is None}
    tensors = dict(model.named_parameters())
    tensors.update((name, buffer) for name, buffer in model.named_buffers() if name in as_is)
    reads, missing, unreadable = FileReads(), [], []
    for name, tensor in tensors.items():
        if name in as_is:  # in the files as in memory, renamings aside (fused experts saved fused too)
            reads.direct[as_is[name]] = tensor
            continue
        shape = compat.whole_shape(tensor)
        probe = torch.arange(shape[:2].numel()).view(*shape[:2], 1) if len(shape) == 3 else tensor.to("meta")
        pieces = names.saved_as(name, probe)
        back = {loads[key] if key in loads else names.loaded_as(key) for key in pieces}
        converters = sorted({converter for _, converter in back if converter is not None})
        if not converters:  # only renamed, and not in the files
            missing += [key for key in pieces if key not in stored]
            continue
        layout = _expert_pieces(pieces, shape, stored) if back == {(name, c) for c in converters} else None
        if layout is None:
            unreadable.append(f"{name} ({'; '.join(converters)})")
        else:
            missing += [piece.key for piece in layout if piece.key not in stored]
            reads.experts[name] = layout
    if missing:
        raise LaunchError(f"the model files lack {_listing(missing)}")
    if unreadable:
        raise LaunchError(
            f"transformers builds {_listing(unreadable, 3)} out of other file tensors while loading, in a way "
            "that reading each rank's slices cannot reproduce. Use --load rank0 (rank 0 loads the model "
            "through transformers and sends each rank its slices) or --backend zero3"
        )
    return reads


def _expert_pieces(
    pieces: dict[str, torch.Tensor], shape: torch.Size, stored: dict[str, torch.Size]
) -> list[ExpertPiece] | None:
    """Each file tensor's rows in the fused [experts, rows, columns] parameter, from the probe the
    save conversion split into `pieces`; None unless every piece is whole rows of one expert, in
    order, as 2-D [rows, columns] in the files, and together they cover each row once."""
    experts, rows, columns = shape
    layout = []
    for key, probe in pieces.items():
        if probe.dim() != 2 or probe.shape[1] != 1 or probe.shape[0] == 0:
            return None
        first, n = int(probe[0, 0]), probe.shape[0]
        if first // rows != (first + n - 1) // rows or (key in stored and tuple(stored[key]) != (n, columns)):
            return None
        layout.append(ExpertPiece(key, first // rows, first % rows, n))
    counts = torch.tensor([piece.rows for piece in layout])
    starts = torch.tensor([piece.expert * rows + piece.row for piece in layout])
    found = torch.cat([probe[:, 0] for probe in pieces.values()])
    within = torch.arange(found.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    if not torch.equal(found, torch.repeat_interleave(starts, counts) + within):
        return None  # some piece's rows are not consecutive (interleaved, permuted)
    ends = sorted((int(start), int(start + n)) for start, n in zip(starts, counts, strict=True))
    if [a for a, _ in ends] != [0] + [b for _, b in ends[:-1]] or ends[-1][1] != experts * rows:
        return None  # rows held twice or not at all
    return layout


def _files_holding(model_dir: Path, keys: set[str]) -> dict[str, Path]:
    where = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:  # the header only
            where.update((key, path) for key in handle.keys() if key in keys)
    return where


def read_expert_rows(model: nn.Module, experts: dict[str, list[ExpertPiece]], model_dir: str | Path) -> None:
    """Fill this rank's rows of each fused expert parameter from the file tensors of its own experts."""
    backend = FSDP2Backend()
    where = _files_holding(Path(model_dir), {p.key for pieces in experts.values() for p in pieces})
    with ExitStack() as files, torch.no_grad():
        handles = {}
        for name, pieces in experts.items():
            param = model.get_parameter(name)
            local, first = backend.local_part(param), 0
            if isinstance(param, DTensor):  # dim 0, the experts, cut as FSDP2 cuts it
                counts = row_counts(param.shape[0], backend.world_size)
                first = sum(counts[: backend.rank])
                assert local.shape[0] == counts[backend.rank], (name, local.shape, counts)
            for piece in pieces:
                if not first <= piece.expert < first + local.shape[0]:
                    continue  # another rank's expert
                path = where[piece.key]
                if path not in handles:
                    handles[path] = files.enter_context(safe_open(str(path), "pt"))
                rows = local[piece.expert - first, piece.row : piece.row + piece.rows]
                rows.copy_(handles[path].get_slice(piece.key)[:])
