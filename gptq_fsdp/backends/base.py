"""The one interface the pipeline uses to reach parameters, whatever the sharding.

A backend moves a weight to the rank that owns its GPTQ (`gather_weight`), writes the quantized
result back into every rank's own storage (`scatter_weight`), sums Hessians on the owner (`reduce`)
and reads a whole tensor on one rank for saving (`full_tensor`). All calls are collective: every
rank calls them in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from gptq_fsdp.comm import Pending, all_gather_rows, done, reduce_to


class Backend:
    """One process holding whole parameters (also the base of the sharded backends)."""

    name = "single"
    copies_weights = False  # whether gather_weight / layer_unsharded allocate new parameter memory

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def prepare(self, model: nn.Module) -> None:
        """Called once before the first forward."""

    def reshard(self, model: nn.Module) -> None:
        """Return every parameter to its shards (after a full-model forward that was cut short)."""

    @contextmanager
    def layer_unsharded(self, layer: nn.Module) -> Iterator[None]:
        """Keep `layer`'s parameters whole across the forwards inside (one all-gather, not one per batch)."""
        yield

    def gather_weight(self, param: torch.Tensor, owner: int) -> Pending:
        """The whole parameter on `owner` (fp32 or its dtype), None elsewhere."""
        return done(param.detach())

    def scatter_weight(self, param: torch.Tensor, full: torch.Tensor | None, owner: int) -> Pending:
        """Write `full` (given on `owner`) into every rank's storage of `param`."""
        with torch.no_grad():
            param.copy_(full)
        return done(None)

    def piece_of(self, param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor | None:
        """Inside `layer_unsharded`: this rank's share of `whole` (the new value of `param`), laid out as
        the rank stores it, for `write_piece` once the layer is sharded again; None when `param` is
        stored whole (writing the whole copy was enough)."""
        return None

    def write_piece(self, param: torch.Tensor, piece: torch.Tensor | None) -> None:
        """Outside `layer_unsharded`: store a `piece_of` result in this rank's storage of `param`."""

    def full_tensor(self, tensor: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """The whole tensor on `dst`, None elsewhere (for saving parameters GPTQ did not touch)."""
        return tensor.detach()

    def local_part(self, param: torch.Tensor) -> torch.Tensor:
        """What this rank stores of `param` (its rows, its flat partition, or all of it), as a tensor."""
        return param.detach()

    def weight_shape(self, param: torch.Tensor) -> torch.Size:
        """The whole parameter's shape (ZeRO-3 shows (0,) while partitioned)."""
        return param.shape

    # Plain collectives (no-ops in one process).
    def reduce(self, tensor: torch.Tensor, owner: int) -> Pending:
        return reduce_to(tensor, owner) if self.world_size > 1 else done(tensor)

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: NCCL needs device tensors, even for CPU-offloaded shards."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """The sum over ranks into every rank's `tensor`, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)

    def all_gather_rows(self, piece: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's rows (`counts[r]` on rank r), concatenated in rank order, on every rank."""
        return all_gather_rows(piece, counts) if self.world_size > 1 else piece

    def sum_ints(self, values: list[int]) -> list[int]:
        """Element-wise sums over ranks, in one collective."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj, dst: int = 0) -> list | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def gather_all(self, obj) -> list:
        """Every rank's `obj`, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
