"""DeepSpeed ZeRO-3: each parameter is a flat 1-D partition, `param.ds_tensor`, not aligned to rows.

The flattened parameter is zero-padded to a multiple of the world size and rank r holds elements
[r·p, (r+1)·p), p = ceil(numel / world). Partition boundaries cut through rows and quantization
groups freely; only the owner ever sees the whole weight. Small parameters that ZeRO keeps whole on
every rank once gathered (`ds_persist`, below `stage3_param_persistence_threshold`) get their whole copy
updated too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from gptq_fsdp import compat
from gptq_fsdp.compat import is_zero3_param
from gptq_fsdp.distributed.backend import Backend
from gptq_fsdp.distributed.collectives import Pending, comm_device, done, gather_pieces, scatter_pieces


class ZeRO3Backend(Backend):
    name = "zero3"
    copies_weights = True

    def __init__(self) -> None:
        compat.require("deepspeed")

    @contextmanager
    def layer_unsharded(self, layer: nn.Module, keep_sharded: Collection[nn.Module] = ()) -> Iterator[None]:
        """One all-gather of the layer (GatheredParameters) for every forward inside, without ZeRO's hooks
        (`keep_sharded`: expert-parallel calibration, which ZeRO-3 does not run, is refused before)."""
        import deepspeed

        params = [p for p in layer.parameters() if is_zero3_param(p)]
        with ExitStack() as stack:
            if params:
                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            stack.enter_context(compat.zero_hooks_set_aside(layer))
            yield

    def gather_weight(self, param: torch.Tensor, owner: int) -> Pending:
        if not is_zero3_param(param):
            return super().gather_weight(param, owner)
        numel, shape = param.ds_numel, param.ds_shape

        def assemble(pieces: torch.Tensor | None) -> torch.Tensor | None:
            return None if pieces is None else pieces.reshape(-1)[:numel].view(shape)

        return gather_pieces(param.ds_tensor.detach().to(comm_device()), owner).then(assemble)

    def scatter_weight(self, param: torch.Tensor, full: torch.Tensor | None, owner: int) -> Pending:
        if not is_zero3_param(param):
            return super().scatter_weight(param, full, owner)
        partition = param.ds_tensor
        size = partition.numel()
        pieces = None
        if self.rank == owner:
            flat = torch.zeros(size * self.world_size, dtype=partition.dtype, device=comm_device())
            flat[: param.ds_numel] = full.reshape(-1).to(flat)
            pieces = flat.view(self.world_size, size)
        out = torch.empty(size, dtype=partition.dtype, device=comm_device())

        def write(received: torch.Tensor) -> None:
            with torch.no_grad():
                partition.copy_(received)

        pending = scatter_pieces(pieces, out, owner).then(write)
        if param.data.numel() != param.ds_numel:  # partitioned: the next forward gathers the new partitions
            return pending
        pending.wait()  # gathered and kept (ZeRO's persistent small parameters): update the whole copy too
        whole = (
            full.to(comm_device(), param.dtype)
            if self.rank == owner
            else torch.empty(param.ds_shape, dtype=param.dtype, device=comm_device())
        )
        dist.broadcast(whole, src=owner)
        with torch.no_grad():
            param.data.copy_(whole.view(param.data.shape))
        return done(None)

    def piece_of(self, param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor | None:
        if not is_zero3_param(param):
            return None
        size = param.ds_tensor.numel()
        flat = torch.zeros(size * self.world_size, dtype=param.ds_tensor.dtype, device=whole.device)
        flat[: param.ds_numel] = whole.reshape(-1)
        return flat[self.rank * size : (self.rank + 1) * size].clone()

    def write_piece(self, param: torch.Tensor, piece: torch.Tensor | None) -> None:
        if piece is not None:  # (a persistent parameter's whole copy was written in the forward already)
            with torch.no_grad():
                param.ds_tensor.copy_(piece)

    def holder(self, param: torch.Tensor, index: int) -> int | None:
        return None if is_zero3_param(param) else super().holder(param, index)  # flat partitions cut through slices

    def local_part(self, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if is_zero3_param(param) else param.detach()

    def stored_values(self, param: torch.Tensor) -> torch.Tensor:
        if not is_zero3_param(param):
            return param.detach()
        size = param.ds_tensor.numel()  # the padding past ds_numel is uninitialized memory, not zeros
        return param.ds_tensor[: max(0, min(size, param.ds_numel - self.rank * size))]

    def weight_shape(self, param: torch.Tensor) -> torch.Size:
        return param.ds_shape if is_zero3_param(param) else param.shape
