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
from gptq_fsdp.core.hessian import HessianGroup, hessian_from_sum, packed_size, upper_blocks
from gptq_fsdp.core.scheme import GPTQError, dequantize
from gptq_fsdp.data import near_equal_shares
from gptq_fsdp.distributed import collectives
from gptq_fsdp.distributed.collectives import Pending
from gptq_fsdp.distributed.expert_parallel import ExpertParallel
from gptq_fsdp.distributed.schedule import assign_owners
from gptq_fsdp.model.experts import ExpertParam
from gptq_fsdp.model.hooks import HessianHooks
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
                fulls = result.record(job.index, group.names, rows, gptq, seconds, tokens[gi])
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


def quantize_experts(job: LayerJob, hooks: HessianHooks, holders: dict) -> dict[ExpertParam, torch.Tensor | None]:
    """GPTQ for every expert slice of the layer's fused MoE parameters, inside its unsharded forwards
    (every rank holds the whole parameters); returns each parameter's piece for `write_piece`.

    An expert's Hessian is summed on its owner: the rank that stores the slice (`holders`, found
    while the layer was sharded: FSDP2's expert rows), so that nothing but the Hessian travels;
    where no rank stores it alone (ZeRO-3's flat partitions, replicated parameters) owners are
    balanced by GPTQ cost and every rank receives the result to write its own piece. Token counts
    are summed over ranks first, so every rank agrees which slices have fewer tokens than input
    columns (their H would be singular): those are quantized with the pooled Hessian of the same
    projection over all the layer's routed tokens (for gate/up: the Hessian of every token the
    layer's experts see). A projection whose experts
    share one Hessian (all-tokens calibration's gate/up) has it all-reduced once.
    """
    clock, backend = job.run.clock, job.run.backend
    rank, world = backend.rank, backend.world_size
    units = [((p, e), hooks.expert_groups.get((p, e))) for p in hooks.experts for e in range(p.num_experts)]
    shared = list(hooks.shared_groups.items())
    counts = collectives.sum_ints([g.tokens for _, g in units if g is not None] + [g.tokens for _, g in shared])
    shared_tokens = {p: n for (p, _), n in zip(shared, counts[len(counts) - len(shared) :], strict=True)}
    own_counts = iter(counts[: len(counts) - len(shared)])
    tokens = [next(own_counts) if g is not None else shared_tokens[p] for (p, _), g in units]
    lpt = assign_owners([(len(p.members) * p.rows, p.columns) for (p, _), _ in units], world)
    owners = [holders[unit] if holders[unit] is not None else o for (unit, _), o in zip(units, lpt.owners, strict=True)]
    whole = _pooled_hessians(units, tokens, hooks) | _shared_hessians(shared, shared_tokens)
    pending = [
        collectives.reduce_to(group.sum, owner) if group is not None else None
        for (_, group), owner in zip(units, owners, strict=True)
    ]
    spread = {}  # results of this rank's slices that every rank must receive, till all are computed
    for i in lpt.order:
        (param, expert), group = units[i]
        owner = owners[i]
        with clock("wait", layer=job.index, group=param.label(expert)):
            hessian_sum = pending[i].wait() if pending[i] is not None else None
        pending[i] = None
        if owner == rank:
            kind = "shared" if group is None else None
            gptq = _quantize_slice(job, param, expert, param.weight[expert], hessian_sum, tokens[i], whole, kind)
            if holders[(param, expert)] is None and world > 1:
                spread[i] = gptq
            else:
                param.weight[expert].copy_(gptq.weight)
        del hessian_sum
        if group is not None:
            group.release()
    if any(h is None for h in holders.values()) and world > 1:  # after every owner's GPTQ: no rank waits between slices
        for i in lpt.order:
            (param, expert), _ = units[i]
            if holders[(param, expert)] is None:
                mine = spread.pop(i, None) or _no_rows(param, job.run.config.weights)
                with clock("wait", layer=job.index, group=param.label(expert), step="results"):
                    gathered = _all_gather_rows(mine, _only(owners[i], param, world))
                param.weight[expert].copy_(gathered.weight)
    return {param: backend.piece_of(param.weight, param.weight.detach()) for param in hooks.experts}


def quantize_owned_experts(job: LayerJob, hooks: HessianHooks, dispatch: ExpertParallel) -> None:
    """Expert-parallel: GPTQ for the expert slices this rank stores, from the Hessians it summed
    alone (every token of its experts came here), written into its own shards. Only token counts
    travel, so every rank agrees which slices are short of tokens, and for those projections each
    rank's sum over its own experts, all-reduced into the pooled Hessian."""
    units = [((p, e), hooks.expert_groups.get((p, e))) for p in hooks.experts for e in range(p.num_experts)]
    tokens = collectives.sum_ints([g.tokens if g is not None else 0 for _, g in units])
    pooled = _pooled_hessians(units, tokens, hooks)
    for ((param, expert), group), count in zip(units, tokens, strict=True):
        if group is None:  # another rank's expert
            continue
        weight = dispatch.local_weight(param, expert)
        gptq = _quantize_slice(job, param, expert, weight, group.sum, count, pooled)
        weight.copy_(gptq.weight)
        group.release()
    dispatch.store()


def _quantize_slice(
    job: LayerJob, param: ExpertParam, expert: int, weight: torch.Tensor, hessian_sum: torch.Tensor | None,
    tokens: int, whole: dict[ExpertParam, torch.Tensor], kind: str | None = None,
) -> GPTQResult:  # fmt: skip
    """GPTQ of one expert slice, recorded: from its own Hessian sum, or from its projection's
    `whole` Hessian when it has fewer tokens than columns ("pooled") or shares it ("shared")."""
    kind = kind or ("own" if tokens >= param.columns else "pooled")
    names = param.names(expert)
    with job.run.clock("gptq", layer=job.index, group=param.label(expert)):
        begin = time.perf_counter()
        hessian = hessian_from_sum(hessian_sum, tokens, param.columns) if kind == "own" else whole[param].clone()
        gptq = _gptq(job, weight.detach(), hessian, names)
        seconds = time.perf_counter() - begin
        job.run.result.record(job.index, names, [param.rows] * len(param.members), gptq, seconds, tokens, kind)
    return gptq


def _pooled_hessians(units: list, tokens: list[int], hooks: HessianHooks) -> dict[ExpertParam, torch.Tensor]:
    """Per fused parameter with an expert short of tokens (`tokens`: summed over ranks): H from the
    sum of all its experts' sums (this rank's, all-reduced: every rank computes the same), over all
    their tokens. `units`: ((param, expert), this rank's group or None) for every expert slice of the
    layer; the projections whose experts share one Hessian (`hooks.shared_groups`) have none."""
    short = {p for ((p, _), _), n in zip(units, tokens, strict=True) if n < p.columns and p not in hooks.shared_groups}
    device = hooks.device
    pooled = {}
    for param in sorted(short, key=lambda p: p.label(0)):  # the same order on every rank
        members = [(group, n) for ((p, _), group), n in zip(units, tokens, strict=True) if p is param]
        total = torch.zeros(packed_size(upper_blocks(param.columns, device.type)), dtype=torch.float64, device=device)
        for group, _ in members:  # summed in place: no [E, ...] stack of the sums
            if group is not None:
                total += group.sum
        collectives.all_reduce(total)
        pooled[param] = _hessian_of_experts(param, total, sum(n for _, n in members))
        logger.info(
            "%s: %d of %d experts have fewer tokens than its %d columns; they use the pooled Hessian",
            param.label("*"),
            sum(n < param.columns for _, n in members),
            len(members),
            param.columns,
        )
    return pooled


def _shared_hessians(shared: list[tuple[ExpertParam, HessianGroup]], tokens: dict) -> dict[ExpertParam, torch.Tensor]:
    """H of each projection whose experts all read the same tokens (all-tokens calibration), its sum
    all-reduced (every rank computes the same)."""
    hessians = {}
    for param, group in shared:
        collectives.all_reduce(group.sum)
        hessians[param] = _hessian_of_experts(param, group.sum, tokens[param])
        group.release()
    return hessians


def _hessian_of_experts(param: ExpertParam, total: torch.Tensor, count: int) -> torch.Tensor:
    if count == 0:  # never quantize from nothing (an all-zero H would zero every weight)
        raise GPTQError(
            f"no calibration token reached the experts of {param.label('*')}: their inputs were not "
            "seen (an experts implementation that does not call F.linear on each expert's slice?)"
        )
    return hessian_from_sum(total, count, param.columns)


def _only(owner: int, param: ExpertParam, world: int) -> list[int]:
    """Row counts of an all-gather in which only `owner` contributes the slice's rows."""
    return [len(param.members) * param.rows if r == owner else 0 for r in range(world)]


def _no_rows(param: ExpertParam, args) -> GPTQResult:
    """A GPTQ result of no rows, the shape of `param`'s slices (what a non-owner contributes)."""
    groups = param.columns // args.group_size if args.group_size else 1
    weight = param.weight
    empty = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=weight.device)  # noqa: E731
    return GPTQResult(
        empty(0, param.columns, dtype=weight.dtype), empty(0, param.columns, dtype=torch.int8),
        empty(0, groups, dtype=weight.dtype), empty(0, groups, dtype=torch.int8), None,
        empty(0, dtype=torch.float32), 0.0,
    )  # fmt: skip
