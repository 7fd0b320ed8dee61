"""Collectives over the default process group, all no-ops in one process.

Point-to-owner transfers of equal-sized pieces (gather, scatter, reduce) are asynchronous: each call
returns at once with a `Pending` whose `wait()` gives the result, so the next transfer is in flight
while an owner runs GPTQ. Every rank must post the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Where collective buffers live: NCCL needs device tensors, even for CPU-offloaded shards."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Pending:
    """An in-flight collective and what to do with its buffers once it is done."""

    def __init__(self, work, finish: Callable[[], torch.Tensor | None]) -> None:
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor | None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._finish()

    def then(self, step: Callable[[torch.Tensor | None], torch.Tensor | None]) -> Pending:
        """The same collective, with `step` applied to its result."""
        finish = self._finish
        return Pending(self._work, lambda: step(finish()))


def done(value: torch.Tensor | None) -> Pending:
    return Pending(None, lambda: value)


def gather_pieces(piece: torch.Tensor, owner: int) -> Pending:
    """Owner receives every rank's `piece` (all the same shape), stacked as [world, *piece.shape]."""
    if world_size() == 1:
        return done(piece.unsqueeze(0))
    piece = piece.contiguous()
    out = torch.empty((world_size(), *piece.shape), dtype=piece.dtype, device=piece.device) if rank() == owner else None
    work = dist.gather(piece, list(out.unbind(0)) if out is not None else None, dst=owner, async_op=True)
    return Pending(work, lambda: out)


def scatter_pieces(pieces: torch.Tensor | None, out: torch.Tensor, owner: int) -> Pending:
    """Each rank receives its row of `pieces` [world, *out.shape] (given on the owner) into `out`."""
    if world_size() == 1:
        out.copy_(pieces[0])
        return done(out)
    scatter_list = list(pieces.contiguous().unbind(0)) if rank() == owner else None
    work = dist.scatter(out, scatter_list, src=owner, async_op=True)
    return Pending(work, lambda: out)


def reduce_to(tensor: torch.Tensor, owner: int) -> Pending:
    """Sum `tensor` over ranks into the owner's copy (others' copies become undefined)."""
    if world_size() == 1:
        return done(tensor)
    work = dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM, async_op=True)
    return Pending(work, lambda: tensor if rank() == owner else None)


def all_reduce(tensor: torch.Tensor) -> None:
    """The sum over ranks into every rank's `tensor`, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)


def all_gather_rows(piece: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's `piece` (`counts[r]` rows on rank r), concatenated in rank order, on every rank."""
    if world_size() == 1:
        return piece
    padded = torch.zeros((max(counts), *piece.shape[1:]), dtype=piece.dtype, device=piece.device)
    padded[: piece.shape[0]] = piece
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:n] for p, n in zip(pieces, counts, strict=True)])


def all_to_all_rows(rows: torch.Tensor, send_counts: list[int], receive_counts: list[int]) -> torch.Tensor:
    """Rows of `rows` to every rank (the first `send_counts[0]` to rank 0, and so on); returns the
    rows every rank sent here (`receive_counts[r]` from rank r), in rank order."""
    if world_size() == 1:
        return rows
    out = rows.new_empty((sum(receive_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), receive_counts, send_counts)
    return out


def all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (the same shape everywhere), stacked as [world, *tensor.shape], on every rank."""
    if world_size() == 1:
        return tensor.unsqueeze(0)
    out = tensor.new_empty((world_size(), *tensor.shape))
    dist.all_gather(list(out.unbind(0)), tensor.contiguous())
    return out


def sum_ints(values: list[int]) -> list[int]:
    """Element-wise sums over ranks, in one collective."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's `obj` on `dst`, None elsewhere."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def gather_all(obj) -> list:
    """Every rank's `obj`, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
