"""Traffic and time per layer (Hessian reduces, weight transfers, layer all-gathers; forward, XᵀX
and GPTQ seconds at given rates), and `plan`, which puts them together with the memory model and,
where the run does not fit, the advice. The formulas: docs/planner.md."""

from __future__ import annotations

from gptq_fsdp.model.experts import FUSED
from gptq_fsdp.planner.advice import _advice
from gptq_fsdp.planner.memory import (
    REDUCE_BYTES,
    _Context,
    _Experts,
    _piece,
    _rank_memory,
    _row_share,
    _upper,
    expert_sums,
)
from gptq_fsdp.planner.options import LayerTraffic, Plan, PlanOptions, TimeEstimate
from gptq_fsdp.planner.shapes import ExpertShape, ModelShape


def _gptq_seconds(rows: int, cols: int, options: PlanOptions) -> float:
    """The package's cost model with its FLOP terms at the given rates (docs/planner.md)."""
    factorization = 1 / 3 if options.static_scales else 4 / 3
    return (
        factorization * cols**3 / (options.cholesky_tflops * 1e12)
        + rows * cols**2 / (options.matmul_tflops * 1e12)
        + options.column_latency_us * 1e-6 * cols
    )


def plan(shape: ModelShape, options: PlanOptions, advise: bool = True) -> Plan:
    """Memory per rank, traffic, balance and time for `options`; with `advise`, what would make it fit."""
    ctx = _Context(shape, options)
    world, backend, b = options.world_size, options.backend, shape.element_size
    ranks = [_rank_memory(ctx, r) for r in range(world)]
    traffic, balance = [], []
    forward = xtx = gathers = gptq = expert_gptq = dispatch = 0.0
    mm, bw = options.matmul_tflops * 1e12, options.bandwidth_gbps * 1e9
    samples0 = ctx.per_rank[0]
    tokens = samples0 * options.max_seq_length
    passes = 1 if options.true_sequential else 2  # forwards per layer
    for s, structure in enumerate(shape.structures):
        count = shape.layer_structure.count(s)
        owners = ctx.owners(s)
        pieces = ctx.target_piece_bytes(structure)
        hessian_reduce = sum(_upper(g.columns, options.device_type) for g in structure.groups) * REDUCE_BYTES
        if options.true_sequential:  # every rank receives the other ranks' rows, as int8 levels
            shares = [_row_share(g, world) for g in structure.groups]
            weight_transfer = sum((world - 1) * n * g.columns for g, n in zip(structure.groups, shares, strict=True))
        else:
            weight_transfer = sum(2 * (world - 1) * p for _, p in pieces)
        gathered = list(structure.params)
        if options.expert_parallel and ctx.experts[s]:  # the experts stay out of the layer's unshard
            for q in ctx.experts[s].params:
                gathered.remove(q.shape)
        layer_gather = (world - 1) * sum(_piece(p, world, backend) for p in gathered) * b
        n_gathers = 0 if world == 1 else (passes if backend == "fsdp2" else passes * ctx.batches)
        traffic.append(LayerTraffic(hessian_reduce, weight_transfer, layer_gather, n_gathers))
        balance.append(ctx.assignments[s].balance if ctx.assignments[s] else 1.0)
        if options.param_offload and world > 1:  # every unshard first copies the rank's shard to the GPU
            shard = sum(_piece(p, world, backend) for p in structure.params) * b
            gathers += count * n_gathers * shard / (options.host_bandwidth_gbps * 1e9)
        if experts := ctx.experts[s]:  # quantized per expert before the Linear groups
            seconds, xtx_flops = _expert_phase(experts, traffic[-1], tokens, options)
            if options.expert_parallel and world > 1:
                # Each routed hidden state to its expert's rank and its output back, in both passes;
                # the (world - 1) / world of them whose expert is elsewhere, routing balanced.
                hidden = next(q.columns for q in experts.params if q.param_name == FUSED[0])
                routed = tokens * max(q.top_k for q in experts.params)
                traffic[-1].dispatch = round(passes * 2 * routed * hidden * b * (world - 1) / world)
                dispatch += count * traffic[-1].dispatch / bw
            xtx += count * xtx_flops / mm
            if options.config.expert_calibration == "all_tokens":  # the calibration pass runs every expert too
                every_expert = sum(q.num_experts * q.total_rows * q.columns for q in experts.params)
                forward += count * 2 * tokens * every_expert / mm
            gptq += count * seconds
            expert_gptq += count * seconds

        attention = samples0 * 2 * options.max_seq_length**2 * shape.attention_width
        forward += count * passes * (2 * structure.active_params * tokens + attention) / mm
        xtx += count * sum(2 * tokens * _upper(g.columns, options.device_type) for g in structure.groups) / mm
        gathers += count * n_gathers * layer_gather / bw
        if options.true_sequential:  # unit after unit, each on every rank between its two collectives
            compute = sum(_gptq_seconds(n, g.columns, options) for g, n in zip(structure.groups, shares, strict=True))
            all_reduce = 2 * (world - 1) / world * hessian_reduce
            gptq += count * (compute + (all_reduce + weight_transfer) / bw)
        else:  # owners run their groups while the transfers are in flight
            compute_of = [0.0] * world
            owner_bytes = [0] * world
            for (group, piece_bytes), owner in zip(pieces, owners, strict=True):
                compute_of[owner] += _gptq_seconds(group.total_rows, group.columns, options)
                owner_bytes[owner] += 2 * (world - 1) * piece_bytes
            transfers = ((world - 1) / world * hessian_reduce + max(owner_bytes)) / bw
            gptq += count * max(max(compute_of), transfers)
    result = Plan(
        shape=shape,
        options=options,
        ranks=ranks,
        samples_per_rank=ctx.per_rank,
        batches=ctx.batches,
        owners=[ctx.owners(s) for s in range(len(shape.structures))],
        balance=balance,
        traffic=traffic,
        time=TimeEstimate(forward, xtx, gathers, gptq, expert_gptq, dispatch),
        problems=list(ctx.problems),
        expert_owners=[e.owners if e else None for e in ctx.experts],
        expert_balance=[e.balance if e else None for e in ctx.experts],
    )
    if advise:
        if not result.fits and not ctx.refusal:  # a refused order: the problem says what to do instead
            result.suggestions = _advice(result)
        refused = not options.true_sequential and any(s.experts for s in shape.structures)
        if not options.offload_activations and not refused:
            other = plan(shape, options.with_(true_sequential=not options.true_sequential), advise=False)
            result.other_order = (other.time.total, other.peak)
    return result


def _expert_phase(experts: _Experts, traffic: LayerTraffic, tokens: int, options: PlanOptions) -> tuple[float, float]:
    """Seconds of one layer's expert GPTQ, and its experts' XᵀX FLOPs (`traffic` gets the expert bytes).

    XᵀX: every token reaches top_k of a projection's E experts, so each expert sums about
    tokens·top_k/E of them (all-tokens calibration: every expert sums every token, and a shared
    gate/up sum is taken once and all-reduced). Owners storing their experts (FSDP2) work in parallel
    while the Hessian sums are reduced to them; with ZeRO-3 the owners (balanced by GPTQ cost)
    compute all their slices, then every slice's result is all-gathered."""
    world, bw = options.world_size, options.bandwidth_gbps * 1e9
    upper = {q: _upper(q.columns, options.device_type) for q in experts.params}
    sums = {q: expert_sums(q, options) for q in experts.params}
    all_tokens = options.config.expert_calibration == "all_tokens"
    reduced = {q: 2 if q in experts.shared else sums[q] for q in experts.params}  # an all-reduce: twice the bytes
    traffic.expert_reduce = sum(reduced[q] * upper[q] for q in experts.params) * REDUCE_BYTES
    xtx_flops = sum(2 * tokens * (sums[q] if all_tokens else q.top_k) * upper[q] for q in experts.params)

    def slice_seconds(q: ExpertShape) -> float:
        return _gptq_seconds(q.total_rows, q.columns, options)

    if options.expert_parallel:  # each owner summed its own experts' tokens: nothing to reduce
        traffic.expert_reduce = 0
    reduce = (world - 1) / world * traffic.expert_reduce / bw
    if experts.held:
        return max(max(experts.per_rank(slice_seconds, r) for r in range(world)), reduce), xtx_flops
    traffic.expert_gather = sum(q.num_experts * world * q.total_rows * q.columns for q in experts.params)
    compute = max(experts.per_rank(slice_seconds, r) for r in range(world))
    return max(compute, reduce) + traffic.expert_gather / bw, xtx_flops
