"""The per-rank memory model: what each rank holds in each phase of a layer (shards, the unsharded
layer, activations, the forward's working set, Hessians, owned weights, GPTQ's workspace) and the
largest sum over the phases. Every term and its assumptions: docs/planner.md."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable

from gptq_fsdp.core.hessian import column_blocks, packed_size, upper_blocks
from gptq_fsdp.data import near_equal_shares
from gptq_fsdp.distributed.fsdp2 import row_counts
from gptq_fsdp.distributed.schedule import assign_owners, gptq_cost, packing_cost
from gptq_fsdp.model.experts import FUSED
from gptq_fsdp.planner.options import PlanOptions, RankMemory, split_samples
from gptq_fsdp.planner.shapes import ExpertShape, GroupShape, LayerShape, ModelShape

GiB = 2**30
REDUCE_BYTES = 8  # per element: the float64 sum is what gets reduced
FP32 = 4


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


@functools.lru_cache(maxsize=65536)
def _rows(rows: int, world: int) -> tuple[int, ...]:
    return tuple(row_counts(rows, world))


def _piece(shape: tuple[int, ...], world: int, backend: str) -> int:
    """Elements of one rank's padded piece of a parameter (what a collective moves per rank)."""
    if backend == "fsdp2" and len(shape) > 0:
        return max(_rows(shape[0], world)) * math.prod(shape[1:])
    return math.ceil(math.prod(shape) / world)


def _local(shape: tuple[int, ...], world: int, rank: int, backend: str) -> int:
    """Elements of a parameter that `rank` stores at rest."""
    if world == 1:
        return math.prod(shape)
    if backend == "fsdp2" and len(shape) > 0:
        return _rows(shape[0], world)[rank] * math.prod(shape[1:])
    return math.ceil(math.prod(shape) / world)


def _workspace(rows: int, cols: int, element_size: int, static_scales: bool) -> int:
    """GPTQ's own memory for a [rows, cols] weight (docs/planner.md: gptq.py's live fp32 copies)."""
    w = rows * cols * FP32
    h = cols**2 * FP32
    inverse = 0 if static_scales else w + 3 * h
    return rows * cols * element_size + max(inverse, 2 * w + 2 * h)


def _row_share(group: GroupShape, world: int) -> int:
    """True-sequential: the most rows of a unit one rank quantizes (the first of the near-equal shares
    that `pipeline.owners.quantize_rows_everywhere` splits it into)."""
    return near_equal_shares(group.total_rows, world)[0]


def _unit_workspace(group: GroupShape, element_size: int, options: PlanOptions) -> int:
    """GPTQ memory for one group on a rank that runs it. True-sequential: GPTQ on the rank's share of
    the rows, beside the unit's stacked weight (several members are concatenated) and its whole result
    (weight in the model's dtype + int8 levels, all-gathered)."""
    if not options.true_sequential:
        return _workspace(group.total_rows, group.columns, element_size, options.static_scales)
    share = _row_share(group, options.world_size)
    stacked = group.total_rows * group.columns * element_size if len(group.rows) > 1 else 0
    whole = group.total_rows * group.columns * (element_size + 1)
    return _workspace(share, group.columns, element_size, options.static_scales) + stacked + whole


class _Experts:
    """A layer structure's expert slices as `pipeline.owners.quantize_experts` runs them, inside the
    unsharded layer: every slice's owner (FSDP2, or one process: the rank storing the expert's rows;
    ZeRO-3: balanced by GPTQ cost), and what each rank holds for the slices it owns."""

    def __init__(self, structure: LayerShape, options: PlanOptions, element_size: int) -> None:
        world, b, device = options.world_size, element_size, options.device_type
        self.params: tuple[ExpertShape, ...] = structure.experts
        self.held = options.backend == "fsdp2" or world == 1  # else every rank all-gathers each result
        units = [(p, e) for p in range(len(self.params)) for e in range(self.params[p].num_experts)]
        if self.held:
            owners = [_holder(self.params[p].num_experts, e, world) for p, e in units]
        else:
            owners = assign_owners(
                [(self.params[p].total_rows, self.params[p].columns) for p, _ in units], world
            ).owners
        self.owners = owners
        self.counts = [[0] * len(self.params) for _ in range(world)]  # slices of each param a rank owns
        for (p, _), owner in zip(units, owners, strict=True):
            self.counts[owner][p] += 1
        loads = [self.per_rank(lambda q: gptq_cost(q.total_rows, q.columns), rank) for rank in range(world)]
        self.balance = max(loads) * world / sum(loads)  # max / mean predicted GPTQ load
        self.hessians = _expert_hessians(self.params, options)
        # H of the slices a rank owns; a projection's shared H (all-tokens) on every rank.
        self.shared = [q for q in self.params if expert_sums(q, options) == 1 < q.num_experts]
        everywhere = sum(_hessian_bytes(q.columns, device) for q in self.shared)
        self.owned_hessians = [
            everywhere + self.per_rank(lambda q: 0 if q in self.shared else _hessian_bytes(q.columns, device), r)
            for r in range(world)
        ]
        workspace = [_workspace(q.total_rows, q.columns, b, options.static_scales) for q in self.params]
        self.workspace = [max((w for n, w in zip(c, workspace, strict=True) if n), default=0) for c in self.counts]
        self.buffers = [0] * world
        self.results = [0] * world  # owned results kept till every owner is done (ZeRO-3)
        if not self.held:  # the all-gather of one slice's result, after all of this rank's own results
            group_size = options.config.weights.group_size
            width = [q.columns + 5 * (q.columns // group_size if group_size else 1) + 4 for q in self.params]
            gathered = [(world + 3) * q.total_rows * w for q, w in zip(self.params, width, strict=True)]
            result = [q.total_rows * q.columns * (b + 1) for q in self.params]
            for rank, c in enumerate(self.counts):
                self.results[rank] = sum(n * r for n, r in zip(c, result, strict=True))
                self.buffers[rank] = self.results[rank] + max(gathered)

    def per_rank(self, value: Callable[[ExpertShape], float], rank: int) -> float:
        """Σ over the slices `rank` owns of `value(their fused parameter)`."""
        return sum(n * value(q) for n, q in zip(self.counts[rank], self.params, strict=True))

    def weight_bytes(self, element_size: int, rank: int | None = None, world: int = 1, backend: str = "fsdp2") -> int:
        """Bytes of the fused expert parameters: all of them, or what `rank` stores (FSDP2: its experts)."""
        if rank is None:
            return sum(math.prod(q.shape) for q in self.params) * element_size
        return sum(_local(q.shape, world, rank, backend) for q in self.params) * element_size

    def dispatch_bytes(self, batch_tokens: int, element_size: int) -> int:
        """Expert-parallel buffers of one batch on a rank, routing balanced (`distributed.expert_parallel`):
        its routed hidden states sent, as many received, the experts' outputs for those and its own
        returned, each row with its routing weight and keep flag (2 float64) both ways."""
        routed = batch_tokens * max(q.top_k for q in self.params)
        hidden = next(q for q in self.params if q.param_name == FUSED[0]).columns
        return routed * (4 * hidden * element_size + 2 * 2 * REDUCE_BYTES)

    def pieces(self, rank: int, options: PlanOptions, element_size: int) -> int:
        """Bytes of this rank's pieces of the quantized fused parameters (`backend.piece_of`), kept
        till the layer is done (0 in one process: the whole copy is the parameter)."""
        world, backend = options.world_size, options.backend
        return sum(_local(q.shape, world, rank, backend) for q in self.params) * element_size if world > 1 else 0


def expert_sums(expert: ExpertShape, options: PlanOptions) -> int:
    """Hessian sums of a fused projection's experts: one per expert, or one for all of them where
    every expert reads the same tokens (all-tokens calibration's gate/up)."""
    shared = options.config.expert_calibration == "all_tokens" and expert.param_name == FUSED[0]
    return 1 if shared else expert.num_experts


def _expert_hessians(experts: tuple[ExpertShape, ...] | list[ExpertShape], options: PlanOptions) -> int:
    """Bytes of the Hessian sums of `experts` (each rank holds them all)."""
    return sum(expert_sums(e, options) * _hessian_bytes(e.columns, options.device_type) for e in experts)


def _holder(experts: int, expert: int, world: int) -> int:
    """The rank whose FSDP2 rows (dim 0 of the fused parameter: the experts) hold `expert`."""
    return bisect.bisect_right(list(itertools.accumulate(_rows(experts, world))), expert)


class _Context:
    """What does not depend on the rank: splits, owners, per-structure sizes."""

    def __init__(self, shape: ModelShape, options: PlanOptions) -> None:
        self.shape, self.options = shape, options
        world, b = options.world_size, shape.element_size
        self.per_rank, self.batches, self.batch, self.problems = split_samples(
            options.num_samples, world, options.batch_size
        )
        self.param_counts = shape.all_params()
        self.sharded = world > 1
        self.outer_bytes = sum(math.prod(s) for s in shape.outer_params) * b if self.sharded else 0
        # True-sequential owners only pack (every rank runs GPTQ on a share of each unit's rows).
        cost = packing_cost if options.true_sequential else gptq_cost
        self.assignments = [
            assign_owners([(g.total_rows, g.columns) for g in s.groups], world, cost) if s.groups else None
            for s in shape.structures
        ]
        self.owner_sets = [set(a.owners) if a else set() for a in self.assignments]
        # Fused MoE experts, quantized per expert in the standard order; the true-sequential order refuses them.
        self.experts = [
            _Experts(s, options, b) if s.experts and not options.true_sequential else None for s in shape.structures
        ]
        self.owner_sets += [set(e.owners) for e in self.experts if e]
        first = next((i for i, x in enumerate(shape.layer_structure) if shape.structures[x].experts), None)
        if options.param_offload and world == 1:
            self.problems.append(
                "parameter offload keeps the shards of a sharded run in host memory: give 2 or more ranks"
            )
        if options.expert_parallel and first is not None:
            if options.backend != "fsdp2":
                self.problems.append(
                    "expert-parallel calibration needs each expert whole on one rank: FSDP2 (ZeRO-3's flat "
                    "partitions cut through experts)"
                )
        self.refusal = ""
        if options.true_sequential and first is not None:
            module = shape.structures[shape.layer_structure[first]].experts[0].module
            self.refusal = (
                "--true-sequential does not quantize fused MoE experts yet: use the standard order, or ignore the "
                f"experts modules (e.g. {shape.layers_name}.{first}.{module})"
            )
            self.problems.append(self.refusal)

    def owners(self, structure: int) -> list[int]:
        a = self.assignments[structure]
        return a.owners if a else []

    def target_piece_bytes(self, structure: LayerShape) -> list[tuple[GroupShape, int]]:
        """(group, Σ piece bytes of its members) for every group."""
        world, backend, b = self.options.world_size, self.options.backend, self.shape.element_size
        return [(g, sum(_piece((r, g.columns), world, backend) for r in g.rows) * b) for g in structure.groups]


def _block_width(columns: int, device_type: str) -> int:
    """Widest column block of the symmetric XᵀX on the device (hessian.column_blocks)."""
    return max(b - a for a, b in column_blocks(columns, device_type))


def _hessian_bytes(columns: int, device_type: str) -> int:
    """hessian.HessianGroup: the float64 running sum of the upper blocks and one fp32 block of XᵀX."""
    return _upper(columns, device_type) * REDUCE_BYTES + _block_width(columns, device_type) ** 2 * FP32


@functools.lru_cache(maxsize=1024)
def _upper(columns: int, device_type: str) -> int:
    """Elements of a Hessian sum (hessian.upper_blocks)."""
    return packed_size(upper_blocks(columns, device_type))


def _rank_memory(ctx: _Context, rank: int) -> RankMemory:
    shape, options = ctx.shape, ctx.options
    world, backend, b = options.world_size, options.backend, shape.element_size
    shards = sum(count * _local(s, world, rank, backend) for s, count in ctx.param_counts.items()) * b
    host_shards = shards if options.param_offload and ctx.sharded else 0
    shards -= host_shards
    token_bytes = options.max_seq_length * shape.hidden * b
    act_samples = ctx.batch[rank] if options.offload_activations else ctx.per_rank[rank]
    activations = act_samples * token_bytes
    batch_tokens = ctx.batch[rank] * options.max_seq_length

    best = RankMemory(rank, shards, 0, activations, 0, 0, 0, 0, 0, 0, "", {}, host_shards=host_shards)
    capture = {"shards": shards, "outer params": ctx.outer_bytes, "activations": activations}
    phases: list[tuple[str, dict[str, int]]] = [("capture", capture)]
    for s, structure in enumerate(shape.structures):
        layer = structure.numel * b if ctx.sharded else 0
        working = batch_tokens * structure.widest_output * b
        hessians = sum(_hessian_bytes(g.columns, options.device_type) for g in structure.groups)
        owners = ctx.owners(s)
        mine = [g for g, o in zip(structure.groups, owners, strict=True) if o == rank]
        owned_h = sum(_hessian_bytes(g.columns, options.device_type) for g in mine)
        expert_h = 0
        layers = [i for i, x in enumerate(shape.layer_structure) if x == s]
        where = f"layer {layers[0]}" + (f" (and {len(layers) - 1} like it)" if len(layers) > 1 else "")
        if options.true_sequential:
            # Every batch's forward waits inside the layer, holding what the meta forward measured per
            # token at its worst pause; the owners keep their units' results till the layer ends.
            working = math.ceil(ctx.per_rank[rank] * options.max_seq_length * structure.paused_bytes_per_token)
            owned_h = hessians  # every rank sums and keeps every group
            buffers = sum(g.total_rows * g.columns * (b + 1) for g in mine)
            workspace = max((_unit_workspace(g, b, options) for g in structure.groups), default=0)
            phases += [
                (
                    f"true-sequential GPTQ, {where}",
                    {
                        "shards": shards,
                        "layer": layer,
                        "activations": activations,
                        "paused forwards": working,
                        "Hessians": hessians,
                        "owned weights": buffers,
                        "GPTQ workspace": workspace,
                    },
                ),
                (
                    f"true-sequential layer end, {where}",
                    {"shards": shards, "layer": layer, "activations x2": 2 * activations, "Hessians": hessians,
                     "owned weights": buffers},
                ),
            ]  # fmt: skip
        else:
            buffers = 0
            if ctx.sharded:
                for (_, piece_bytes), owner in zip(ctx.target_piece_bytes(structure), owners, strict=True):
                    buffers += 2 * piece_bytes + (2 * world * piece_bytes if owner == rank else 0)
            workspace = max((_unit_workspace(g, b, options) for g in mine), default=0)
            experts = ctx.experts[s]
            expert_h = experts.hessians if experts else 0
            if experts:  # this rank's stored rows, and the whole experts while the layer is unsharded
                parallel = options.expert_parallel and ctx.sharded
                stored = experts.weight_bytes(b, rank, world, backend)
                whole = experts.weight_bytes(b) if ctx.sharded and not parallel else 0
                copied = stored if parallel and options.param_offload else 0  # its experts on the GPU too
                best.expert_weights = max(best.expert_weights, stored + whole + copied)
            forward_extra = {}
            if experts and options.expert_parallel and ctx.sharded:
                # The experts stay out of the layer's unshard: a rank holds its own experts only (on
                # the GPU, and so in "layer", when their shards live in host memory), their Hessians
                # only, and the dispatch buffers of one batch.
                layer -= experts.weight_bytes(b)
                layer += experts.weight_bytes(b, rank, world) if options.param_offload else 0
                expert_h = experts.owned_hessians[rank]
                forward_extra = {"dispatch buffers": experts.dispatch_bytes(batch_tokens, b)}
                best.dispatch = max(best.dispatch, forward_extra["dispatch buffers"])
            unsharded = {"shards": shards, "layer": layer, "activations": activations}
            # Every expert slice's Hessian is on every rank, from the forwards till it is reduced
            # (expert-parallel: the rank's own experts' only).
            all_h = {"Hessians": hessians} | ({"expert Hessians": expert_h} if experts else {})
            phases.append((f"Hessian forward, {where}", unsharded | {"working set": working} | all_h | forward_extra))
            gptq = {"shards": shards, "activations": activations, "Hessians": hessians}
            gptq |= {"owned weights": buffers, "GPTQ workspace": workspace}
            if experts:  # quantized inside the unsharded layer, before the Linear groups
                phases.append(
                    (
                        f"expert GPTQ, {where}",
                        unsharded
                        | all_h
                        | {"GPTQ workspace": experts.workspace[rank], "owned results": experts.results[rank]},
                    )
                )
                if experts.buffers[rank]:
                    gathered = {"owned weights": experts.buffers[rank]}
                    phases.append((f"expert results all-gather, {where}", unsharded | all_h | gathered))
                if not (options.expert_parallel and ctx.sharded):  # expert-parallel writes its own rows in place
                    gptq["expert pieces"] = experts.pieces(rank, options, b)
                owned_h += experts.owned_hessians[rank]
                buffers = max(buffers, experts.buffers[rank])
                workspace = max(workspace, experts.workspace[rank])
            phases += [
                (f"GPTQ, {where}", gptq),
                (
                    f"propagate, {where}",
                    {"shards": shards, "layer": layer, "activations x2": 2 * activations, "working set": working}
                    | forward_extra,
                ),
            ]
        best.layer = max(best.layer, layer)
        best.working = max(best.working, working)
        best.hessians = max(best.hessians, hessians + expert_h)
        best.expert_hessians = max(best.expert_hessians, expert_h)
        best.hessians_owned = max(best.hessians_owned, owned_h)
        best.owned_weights = max(best.owned_weights, buffers)
        best.workspace = max(best.workspace, workspace)
    name, parts = max(phases, key=lambda p: sum(p[1].values()))
    best.peak, best.peak_phase, best.peak_parts = sum(parts.values()), name, parts
    return best


def _candidate_ranks(ctx: _Context) -> list[int]:
    """Ranks whose peak can be the largest: owners, and the first rank that owns nothing.

    Ranks that own nothing differ only in shards and samples, which never grow with the rank index
    (both layouts give the first ranks the most), so the first of them stands for all.
    """
    world = ctx.options.world_size
    owners = set().union(*ctx.owner_sets) if ctx.owner_sets else set()
    idle = next((r for r in range(world) if r not in owners), None)
    return sorted(owners | {0} | ({idle} if idle is not None else set()))


def peak_bytes(shape: ModelShape, options: PlanOptions) -> tuple[int, list[str]]:
    """The largest per-rank peak (and the problems that would stop the run), without a full plan."""
    ctx = _Context(shape, options)
    return max(_rank_memory(ctx, r).peak for r in _candidate_ranks(ctx)), ctx.problems
