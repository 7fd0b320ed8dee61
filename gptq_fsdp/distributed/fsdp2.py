"""FSDP2 (`fully_shard`): parameters are DTensors sharded by rows, `Shard(0)`, possibly unevenly.

FSDP2 cuts dim 0 like `torch.chunk`: ceil(rows / world) rows per rank, the last ranks get the rest
(7 rows on 3 ranks: 3, 3, 1; 4 rows on 3 ranks: 2, 2, 0). Pieces are padded to the largest for the
collectives and trimmed again.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from gptq_fsdp import compat
from gptq_fsdp.distributed.backend import Backend
from gptq_fsdp.distributed.collectives import Pending, comm_device, gather_pieces, scatter_pieces


def row_counts(rows: int, world: int) -> list[int]:
    """Rows of a dim-0 sharded tensor on each rank, as FSDP2 lays them out."""
    chunk = math.ceil(rows / world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


class FSDP2Backend(Backend):
    name = "fsdp2"
    copies_weights = True

    def prepare(self, model: nn.Module) -> None:
        compat.fsdp_lazy_init(model)  # our layer-by-layer calls need it before any forward
        self.reshard(model)

    def reshard(self, model: nn.Module) -> None:
        # The root keeps its parameters (embeddings) whole after forward by default; give them back.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextmanager
    def layer_unsharded(self, layer: nn.Module, keep_sharded: Collection[nn.Module] = ()) -> Iterator[None]:
        # The layer and every module fully_shard'ed inside it (an experts module on its own) once for all
        # the forwards: unsharded per call, they would all-gather in every forward, and ranks may make
        # different numbers of forward calls.
        kept = {id(m) for m in keep_sharded}
        states = []
        for module in (m for m in layer.modules() if isinstance(m, FSDPModule) and id(m) not in kept):
            groups = compat.fsdp_param_groups(module)
            states.append((module, groups, compat.fsdp_reshards_after_forward(groups)))
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield
        finally:
            for module, groups, reshards in states:
                compat.fsdp_mark_idle(groups)  # a forward stopped early (HessianHooks) skipped FSDP's post-forward
                module.reshard()  # writes go to the local shards, so the whole copy must not outlive this
                module.set_reshard_after_forward(reshards, recurse=False)

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        if not isinstance(param, DTensor):
            return param.data
        if param.placements != (Shard(0),):
            raise NotImplementedError(f"only Shard(0) FSDP2 parameters are supported, got {param.placements}")
        return param.to_local()

    def gather_weight(self, param: torch.Tensor, owner: int) -> Pending:
        if not isinstance(param, DTensor):
            return super().gather_weight(param, owner)
        counts = row_counts(param.shape[0], self.world_size)
        local = self._local(param).detach()
        assert local.shape[0] == counts[self.rank], (local.shape, counts)
        padded = torch.zeros((max(counts), *param.shape[1:]), dtype=local.dtype, device=comm_device())
        padded[: local.shape[0]] = local
        return gather_pieces(padded, owner).then(
            lambda pieces: None if pieces is None else torch.cat([pieces[r, :n] for r, n in enumerate(counts)])
        )

    def scatter_weight(self, param: torch.Tensor, full: torch.Tensor | None, owner: int) -> Pending:
        if not isinstance(param, DTensor):
            return super().scatter_weight(param, full, owner)
        counts = row_counts(param.shape[0], self.world_size)
        local = self._local(param)
        pieces = None
        if self.rank == owner:
            pieces = torch.zeros(
                (self.world_size, max(counts), *full.shape[1:]), dtype=local.dtype, device=comm_device()
            )
            for r, piece in enumerate(full.to(local.dtype).split(counts)):
                pieces[r, : piece.shape[0]] = piece
        out = torch.empty((max(counts), *local.shape[1:]), dtype=local.dtype, device=comm_device())

        def write(received: torch.Tensor) -> None:
            with torch.no_grad():
                local.copy_(received[: local.shape[0]])

        return scatter_pieces(pieces, out, owner).then(write)

    def piece_of(self, param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        # Unsharded, the parameter is a plain tensor: its rows are cut as FSDP2 cuts them at rest.
        return whole.split(row_counts(whole.shape[0], self.world_size))[self.rank].clone()

    def write_piece(self, param: torch.Tensor, piece: torch.Tensor | None) -> None:
        if isinstance(param, DTensor) and piece is not None:  # a plain parameter was written whole
            with torch.no_grad():
                self._local(param).copy_(piece)

    def holder(self, param: torch.Tensor, index: int) -> int | None:
        if not isinstance(param, DTensor):
            return super().holder(param, index)
        counts = row_counts(param.shape[0], self.world_size)
        return next(r for r in range(self.world_size) if sum(counts[: r + 1]) > index)

    def local_part(self, param: torch.Tensor) -> torch.Tensor:
        return self._local(param)
