"""Asynchronous point-to-owner collectives on equal-sized pieces (gather, scatter, reduce), and a
row all-gather.

Every rank must post the same collectives in the same order; each call returns at once with a
`Pending` whose `wait()` gives the result, so the next transfer is in flight while an owner runs GPTQ.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


class Pending:
    """An in-flight collective and what to do with its buffers once it is done."""

    def __init__(self, work, finish: Callable[[], torch.Tensor | None]) -> None:
        self._work, self._finish = work, finish
        self.waited = 0.0  # seconds spent blocked in wait()

    def wait(self) -> torch.Tensor | None:
        if self._work is not None:
            start = time.perf_counter()
            self._work.wait()
            self.waited = time.perf_counter() - start
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
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return done(piece.unsqueeze(0))
    piece = piece.contiguous()
    out = torch.empty((world, *piece.shape), dtype=piece.dtype, device=piece.device) if rank == owner else None
    work = dist.gather(piece, list(out.unbind(0)) if out is not None else None, dst=owner, async_op=True)
    return Pending(work, lambda: out)


def scatter_pieces(pieces: torch.Tensor | None, out: torch.Tensor, owner: int) -> Pending:
    """Each rank receives its row of `pieces` [world, *out.shape] (given on the owner) into `out`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        out.copy_(pieces[0])
        return done(out)
    scatter_list = list(pieces.contiguous().unbind(0)) if rank == owner else None
    work = dist.scatter(out, scatter_list, src=owner, async_op=True)
    return Pending(work, lambda: out)


def reduce_to(tensor: torch.Tensor, owner: int) -> Pending:
    """Sum `tensor` over ranks into the owner's copy (others' copies become undefined)."""
    if dist.get_world_size() == 1:
        return done(tensor)
    work = dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM, async_op=True)
    return Pending(work, lambda: tensor if dist.get_rank() == owner else None)


def all_gather_rows(piece: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's `piece` (`counts[r]` rows on rank r), concatenated in rank order, on every rank."""
    padded = torch.zeros((max(counts), *piece.shape[1:]), dtype=piece.dtype, device=piece.device)
    padded[: piece.shape[0]] = piece
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:n] for p, n in zip(pieces, counts, strict=True)])
