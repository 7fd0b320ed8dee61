"""The sharded-parameter protocol: how the pipeline reaches a parameter, whatever the sharding.

A backend makes a layer's parameters whole for its forwards (`layer_unsharded`), moves a weight to
the rank that owns its GPTQ (`gather_weight`), writes the quantized result back into every rank's
own storage (`scatter_weight`, or `piece_of` + `write_piece` from a whole copy) and says what a
rank stores (`local_part`, `weight_shape`). Calls that move data are collective: every rank calls
them in the same order. This base class is one process holding whole parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gptq_fsdp.distributed import collectives
from gptq_fsdp.distributed.collectives import Pending, done


class Backend:
    """One process holding whole parameters (also the base of the sharded backends)."""

    name = "single"
    copies_weights = False  # whether gather_weight / layer_unsharded allocate new parameter memory

    @property
    def rank(self) -> int:
        return collectives.rank()

    @property
    def world_size(self) -> int:
        return collectives.world_size()

    def prepare(self, model: nn.Module) -> None:
        """Called once before the first forward."""

    def reshard(self, model: nn.Module) -> None:
        """Return every parameter to its shards (after a full-model forward that was cut short)."""

    @contextmanager
    def layer_unsharded(self, layer: nn.Module, keep_sharded: Collection[nn.Module] = ()) -> Iterator[None]:
        """Keep `layer`'s parameters whole across the forwards inside (one all-gather, not one per batch),
        but for those of the modules in `keep_sharded` (expert-parallel experts)."""
        yield

    def gather_weight(self, param: torch.Tensor, owner: int) -> Pending:
        """The whole parameter on `owner` (fp32 or its dtype), None elsewhere (a whole parameter: on every rank)."""
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
        whole = self.gather_weight(tensor, dst).wait()
        return whole if self.rank == dst else None

    def holder(self, param: torch.Tensor, index: int) -> int | None:
        """The one rank that stores `param[index]` (a slice of dim 0) at rest; None when several do
        (a replicated parameter, or a slice spread over partitions)."""
        return 0 if self.world_size == 1 else None

    def local_part(self, param: torch.Tensor) -> torch.Tensor:
        """What this rank stores of `param` (its rows, its flat partition, or all of it), as a tensor."""
        return param.detach()

    def stored_values(self, param: torch.Tensor) -> torch.Tensor:
        """The elements of `param` this rank stores, without padding (ZeRO-3's last partitions)."""
        return self.local_part(param)

    def weight_shape(self, param: torch.Tensor) -> torch.Size:
        """The whole parameter's shape (ZeRO-3 shows (0,) while partitioned)."""
        return param.shape
