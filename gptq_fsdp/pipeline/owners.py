"""Who runs GPTQ on which rows, and how results reach every rank's shards.

Standard order (`quantize_on_owners`): each Hessian group has an owner (LPT by predicted GPTQ cost);
the group's Hessian is summed there and its weight gathered there, the owner runs GPTQ and packs
the result, and every rank's shard receives its piece. True-sequential order
(`quantize_rows_everywhere`): the layer is whole on every rank inside its forward, so every rank
quantizes a share of the unit's rows and all-gathers the rest.
"""

from __future__ import annotations

import logging
import time

import torch

from gptq_fsdp.core.gptq import GPTQResult, gptq_quantize
from gptq_fsdp.core.hessian import HessianGroup, hessian_from_sum
from gptq_fsdp.core.scheme import dequantize
from gptq_fsdp.data import near_equal_shares
from gptq_fsdp.distributed import collectives
from gptq_fsdp.distributed.collectives import Pending
from gptq_fsdp.distributed.schedule import assign_owners
from gptq_fsdp.pipeline.job import LayerJob

logger = logging.getLogger(__name__)


def _gptq(job: LayerJob, weight: torch.Tensor, hessian: torch.Tensor, names) -> GPTQResult:
    config = job.run.config
    return gptq_quantize(
        weight,
        hessian,
        config.weights,
        dampening_frac=config.dampening_frac,
        block_size=config.block_size,
        name=", ".join(names),
        overwrite_hessian=True,  # GPTQ's working copy: one [cols, cols] fewer
    )


def quantize_on_owners(job: LayerJob, groups: list[HessianGroup]) -> None:
    """Sum each group's Hessian on its owner, GPTQ there, write the result into every rank's shard.

    All reduces and gathers are posted first, so while an owner runs GPTQ on one group the
    transfers of its next groups are in flight; scatters are posted in the same global order.
    """
    modules, result, clock = job.modules, job.run.result, job.run.clock
    backend = result.backend
    rank = backend.rank
    rows_of = {n: backend.weight_shape(modules[n].weight)[0] for g in groups for n in g.names}
    shapes = [(sum(rows_of[n] for n in g.names), g.columns) for g in groups]
    assignment = assign_owners(shapes, backend.world_size)
    logger.debug(
        "layer %d owners %s, predicted balance (max/mean) %.3f",
        job.index,
        {", ".join(g.names): o for g, o in zip(groups, assignment.owners, strict=True)},
        assignment.balance,
    )
    tokens = collectives.sum_ints([g.tokens for g in groups])
    hessians: list[Pending | None] = [
        collectives.reduce_to(g.sum, owner) for g, owner in zip(groups, assignment.owners, strict=True)
    ]
    weights = [
        [backend.gather_weight(modules[n].weight, owner) for n in g.names]
        for g, owner in zip(groups, assignment.owners, strict=True)
    ]
    scatters: list[Pending] = []
    held = 0  # bytes of gathered weights this rank holds (all its groups' transfers are in flight at once)
    for gi, owner in enumerate(assignment.owners):
        if owner == rank:
            held += sum(rows_of[n] * groups[gi].columns * modules[n].weight.element_size() for n in groups[gi].names)
    if backend.copies_weights:
        result.memory.owned_weight_bytes = max(result.memory.owned_weight_bytes, held)
    for gi in assignment.order:
        group, owner = groups[gi], assignment.owners[gi]
        fulls: list[torch.Tensor | None] = [None] * len(group.names)
        if owner == rank:
            event = {"layer": job.index, "group": gi}
            with clock("wait", **event):
                hessian_sum = hessians[gi].wait()
                parts = [p.wait() for p in weights[gi]]
            hessians[gi], weights[gi] = None, []  # the pendings hold the buffers: drop them with the locals
            with clock("gptq", **event):
                begin = time.perf_counter()
                hessian = hessian_from_sum(hessian_sum, tokens[gi], group.columns)
                del hessian_sum
                group.release()  # the float64 sum (twice the fp32 H) is not needed during GPTQ
                gptq = _gptq(job, torch.cat(parts) if len(parts) > 1 else parts[0], hessian, group.names)
                del hessian, parts
                rows = [rows_of[n] for n in group.names]
                seconds = time.perf_counter() - begin
                fulls = result.record(job.index, group.names, rows, gptq, seconds)
        else:  # this rank's partial sum and its piece of the weight have been sent: free them now
            with clock("wait"):
                for pending in [hessians[gi], *weights[gi]]:
                    pending.wait()
            hessians[gi], weights[gi] = None, []
        group.release()
        for name, full in zip(group.names, fulls, strict=True):
            scatters.append(backend.scatter_weight(modules[name].weight, full, owner))
    with clock("wait"):
        for pending in scatters:
            pending.wait()


def quantize_rows_everywhere(job: LayerJob, unit: tuple[str, ...], group: HessianGroup) -> tuple[GPTQResult, float]:
    """True-sequential: the unit's GPTQ result, whole, on every rank, and this rank's GPTQ seconds.

    The group's Hessian sum is complete on every rank (all-reduced). GPTQ is separable by rows given
    H: each rank quantizes a share of them (the factorization of H is repeated on every rank), then
    every rank gets all of them.
    """
    world, rank, clock = collectives.world_size(), collectives.rank(), job.run.clock
    weights = [job.modules[n].weight.detach() for n in unit]  # whole: the layer is unsharded for these forwards
    rows = sum(w.shape[0] for w in weights)
    split = world > 1 and rows >= world  # else every rank does all rows
    counts = near_equal_shares(rows, world)
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1])) if split else slice(None)
    with clock("gptq", layer=job.index, group=", ".join(unit)):
        start = time.perf_counter()
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        hessian = hessian_from_sum(group.sum, group.tokens, group.columns)
        part = _gptq(job, stacked[mine], hessian, unit)
        seconds = time.perf_counter() - start
    if not split:
        return part, seconds
    with clock("wait", layer=job.index, group=", ".join(unit), step="rows"):
        return _all_gather_rows(part, counts), seconds


def _all_gather_rows(part: GPTQResult, counts: list[int]) -> GPTQResult:
    """The whole unit's result on every rank from each rank's rows (`counts`), in one collective.

    The weight travels as its int8 levels (a quarter of fp32's bytes) and is dequantized on arrival,
    bit for bit what its rank computed; the other fields ride along as bytes.
    """
    fields = [part.levels, part.zero_point, part.scale.float(), part.row_losses[:, None]]
    widths = [f.shape[1] * f.element_size() for f in fields]
    whole = collectives.all_gather_rows(torch.cat([f.view(torch.int8) for f in fields], dim=1), counts)
    levels, zero_point, scale, losses = (
        f.contiguous().view(like.dtype) for f, like in zip(whole.split(widths, dim=1), fields, strict=True)
    )
    scale = scale.to(part.scale.dtype)
    start, end = sum(counts[: collectives.rank()]), sum(counts[: collectives.rank() + 1])
    weight = torch.empty(levels.shape, dtype=part.weight.dtype, device=levels.device)
    weight[start:end] = part.weight
    for others in (slice(0, start), slice(end, len(levels))):
        if others.stop > others.start:
            weight[others] = dequantize(levels[others], scale[others], zero_point[others], part.g_idx, weight.dtype)
    return GPTQResult(weight, levels, scale, zero_point, part.g_idx, row_losses=losses[:, 0], damping=part.damping)
