"""The plan as text (`format_plan`, `reasons`), sizes and durations in and out, and
`plan_from_config`, the one-call entry point from a config.json (docs/planner.md)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from gptq_fsdp.config import DTYPES
from gptq_fsdp.planner.memory import GiB, _expert_hessians, _gib, _hessian_bytes, expert_sums
from gptq_fsdp.planner.options import Plan, PlanOptions, RankMemory
from gptq_fsdp.planner.shapes import load_model_shape
from gptq_fsdp.planner.timing import plan


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '80G' (= GiB), '81920MiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 80GiB, 80GB, 81920MiB)")
    number, prefix, binary, unit = match.groups()
    power = "KMGT".find(prefix.upper()) + 1 if prefix else 0
    decimal = bool(prefix) and not binary and bool(unit)  # 'GB' is decimal; 'GiB' and bare 'G' are binary
    return int(float(number) * (1000 if decimal else 1024) ** power)


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def format_plan(result: Plan) -> str:
    """The plan as the `gptq-fsdp plan` command prints it."""
    shape, o = result.shape, result.options
    world, b = o.world_size, shape.element_size
    dtype = str(shape.dtype).removeprefix("torch.")
    lines = [
        f"model: {shape.name}, {shape.total_params:,} parameters ({_gib(shape.total_params * b)} in {dtype}), "
        f"{shape.num_layers} decoder layers ({shape.layers_name}), hidden {shape.hidden}",
        f"run: {world} rank(s) x {_gib(o.gpu_memory)}, {o.backend}, {o.num_samples} samples x "
        f"{o.max_seq_length} tokens "
        f"({result.samples_per_rank[0]} on rank 0 in {result.batches} forward call(s) per pass), "
        f"batch size {o.batch_size}{', activations offloaded' if o.offload_activations else ''}"
        f"{', true-sequential' if o.true_sequential else ''}"
        f"{', parameters offloaded to host memory' if o.param_offload else ''}",
    ]
    if o.expert_parallel:
        lines.append(
            "expert-parallel calibration (--expert-parallel): each routed token's hidden state goes to the rank "
            "storing its expert and the expert's output comes back; the experts stay out of the layer's unshard"
        )
    ts = o.true_sequential
    for s, structure in enumerate(shape.structures):
        layers = [i for i, x in enumerate(shape.layer_structure) if x == s]
        how = "tensor identity in a meta-device forward" if structure.grouping == "forward" else "sibling-name rule"
        lines.append(
            f"layer structure {s} ({len(layers)} layer(s), first {layers[0]}; {_gib(structure.numel * b)} whole): "
            f"{len(structure.groups)} Hessian group(s) by {how}"
        )
        for group, owner in zip(structure.groups, result.owners[s], strict=True):
            lines.append(
                f"    {group.label:<44} [{group.total_rows:>6} x {group.columns:>6}]  Hessian "
                f"{_gib(_hessian_bytes(group.columns, result.options.device_type)):>11}  owner {owner}"
            )
        lines += _expert_lines(result, s)
        if structure.unquantized_params:
            lines.append(
                f"    not quantized (no target covers them, or ignored): {', '.join(structure.unquantized)} - "
                f"{structure.unquantized_params:,} parameters per layer"
            )
    lines.append("")
    lines.append("per rank (GiB; per-layer items are the largest over the layers):")
    header = (
        f"{'rank':>4}  {'shards':>8}  {'layer':>7}  {'acts':>7}  {'working':>7}  {'Hessians':>8}  {'owned H':>7}  "
        f"{'owned W':>7}  {'GPTQ ws':>7}  {'peak':>8}  peak phase"
    )
    lines.append(header)
    for r in result.ranks:
        values = (r.shards, r.layer, r.activations, r.working, r.hessians, r.hessians_owned, r.owned_weights)
        widths = (8, 7, 7, 7, 8, 7, 7)
        cells = "  ".join(f"{v / GiB:>{w}.2f}" for v, w in zip(values, widths, strict=True))
        lines.append(f"{r.rank:>4}  {cells}  {r.workspace / GiB:>7.2f}  {r.peak / GiB:>8.2f}  {r.peak_phase}")
    if ts:
        lines.append(
            "  acts: layer inputs of the rank's samples (x2 at the layer's end); working: every batch's paused "
            "forward; owned W: the results its units keep till the layer ends (owners pack)"
        )
    else:
        lines.append("  acts: layer inputs of the rank's samples (x2 while propagating); working: one batch's forward")
    moe = any(e is not None for e in result.expert_owners)
    if moe and o.expert_parallel:
        lines.append(
            "  Hessians: the Linear groups' (every rank) and its own experts' slices'; layer: without the experts; "
            f"dispatch buffers of one batch (routing balanced): {_gib(max(r.dispatch for r in result.ranks))}; "
            "GPTQ ws: largest owned group or expert slice"
        )
    elif moe:
        lines.append(
            "  Hessians: the Linear groups' and every expert slice's (all on every rank, from the forwards till "
            "reduced); GPTQ ws: largest owned group or expert slice"
        )
    if o.param_offload and result.ranks[0].host_shards:
        lines.append(f"  shards: in host memory, {_gib(max(r.host_shards for r in result.ranks))} per rank")
    lines.append("")
    big = result.largest
    t = result.traffic[big]
    lines.append(f"communication per layer (structure {big}):")
    if ts:
        lines.append(f"    Hessian all-reduce            {_gib(t.hessian_reduce)} (float64 sums)")
        lines.append(f"    rows all-gather               {_gib(t.weight_transfer)} received per rank (int8 levels)")
    else:
        lines.append(f"    Hessian reduce to owners      {_gib(t.hessian_reduce)} (float64 sums)")
        lines.append(f"    weight gather + scatter       {_gib(t.weight_transfer)}")
    if t.expert_reduce:
        lines.append(
            f"    expert Hessian reduce         {_gib(t.expert_reduce)} (float64 sums, to the experts' owners)"
        )
    if t.expert_gather:
        lines.append(
            f"    expert results all-gather     {_gib(t.expert_gather)} received per rank (int8 levels, every "
            "rank's piece padded to the owner's rows)"
        )
    passes = "1 pass" if ts else "2 passes"
    if t.dispatch:
        lines.append(f"    expert dispatch + combine     {_gib(t.dispatch)} sent per rank ({passes}, routing balanced)")
    lines.append(
        f"    layer all-gather              {_gib(t.layer_gather)} received per rank, x{t.gathers} per layer "
        + (f"({passes})" if o.backend == "fsdp2" else "(every forward call: ZeRO-3 does not pin the layer)")
    )
    idle = world - len(set(result.owners[big]))
    if ts:
        lines.append(f"packing owners (assign_owners by elements, max/mean): {result.balance[big]:.2f}")
    else:
        lines.append(
            f"owner balance (assign_owners, max/mean predicted GPTQ load): {result.balance[big]:.2f}"
            + (
                f"; {idle} of {world} rank(s) own no {'Linear ' if moe else ''}group and wait during GPTQ"
                if idle > 0
                else ""
            )
        )
    lines.append("")
    tm = result.time
    lines.append(
        f"estimated time {_seconds(tm.total)}: forward {_seconds(tm.forward)}, XᵀX {_seconds(tm.xtx)}, "
        f"layer all-gathers {_seconds(tm.gathers)}, GPTQ {_seconds(tm.gptq)}"
        + (f" (experts {_seconds(tm.expert_gptq)})" if tm.expert_gptq else "")
        + (f", expert dispatch {_seconds(tm.dispatch)}" if tm.dispatch else "")
    )
    lines += [
        f"    at {o.matmul_tflops:g} matmul TFLOP/s, {o.cholesky_tflops:g} Cholesky TFLOP/s, {o.bandwidth_gbps:g} GB/s "
        "per rank (10⁹ bytes/s), for the rank with the most samples; per layer:",
        f"    forward = {passes} x (2·active params·tokens + 2·samples·seq²·heads·head_dim) / matmul",
        "    XᵀX = Σ groups 2·tokens·cols² / matmul;  all-gathers = bytes / bandwidth"
        + (f" (+ the rank's shard / {o.host_bandwidth_gbps:g} GB/s host copy)" if o.param_offload else ""),
        (
            f"    GPTQ = Σ units k·cols³/Cholesky + rows/N·cols²/matmul + {o.column_latency_us:g} µs·cols "
            "+ (Hessian all-reduce + rows all-gather) / bandwidth, on every rank"
            if ts
            else f"    GPTQ = max(slowest owner's Σ k·cols³/Cholesky + rows·cols²/matmul + {o.column_latency_us:g} "
            "µs·cols, Hessian reduces + weight transfers / bandwidth)"
        ),
        "    (k = 1/3 with act-order static or one scale per channel, 4/3 with none/group)",
    ]
    if moe:
        lines += [
            "    experts: XᵀX = Σ projections 2·tokens·E·cols² / matmul (all tokens to all E experts; gate/up once);"
            if o.config.expert_calibration == "all_tokens"
            else "    experts: XᵀX = Σ projections 2·tokens·top_k·cols² / matmul "
            "(each expert: tokens·top_k/E of them);",
            "    GPTQ = slowest holder's Σ slices (each owner summed its own experts' Hessians); "
            "dispatch = 2 passes x 2·tokens·top_k·hidden·bytes·(N-1)/N / bandwidth"
            if o.expert_parallel
            else "    GPTQ = max(slowest holder's Σ slices, expert Hessian reduces / bandwidth)"
            if o.backend == "fsdp2" or world == 1
            else "    GPTQ = max(slowest owner's Σ slices, expert Hessian reduces / bandwidth) + all-gathers / bw",
        ]
    if result.other_order is not None:
        seconds, peak = result.other_order
        other = "standard order" if ts else "--true-sequential"
        lines.append(f"{other}: estimated time {_seconds(seconds)}, peak {_gib(peak)}")
    elif moe and not ts:
        lines.append("--true-sequential: refused, it does not quantize fused MoE experts yet")
    lines.append("")
    if result.fits:
        lines.append(f"FITS: peak {_gib(result.peak)} of {_gib(o.gpu_memory)} (rank {_peak_rank(result).rank})")
    else:
        lines.append("DOES NOT FIT")
        lines.extend(f"  - {reason}" for reason in reasons(result))
        if result.suggestions:
            lines.append("what would make it fit:")
            lines.extend(f"  - {s}" for s in result.suggestions)
    return "\n".join(lines)


def _expert_lines(result: Plan, s: int) -> list[str]:
    """What the layer structure's fused MoE experts are: a line per experts module, and their owners."""
    structure, owners = result.shape.structures[s], result.expert_owners[s] if result.expert_owners else None
    if not structure.experts:
        return []
    o = result.options
    lines = []
    for module in dict.fromkeys(e.module for e in structure.experts):
        params = [e for e in structure.experts if e.module == module]
        each = ", ".join(f"{'+'.join(e.members)} [{e.total_rows} x {e.columns}]" for e in params)
        hessians = _expert_hessians(params, o)
        calibrated = "on every token" if o.config.expert_calibration == "all_tokens" else "on their routed tokens"
        lines.append(
            f"    {module}: {params[0].num_experts} experts x ({each}) quantized per expert, {calibrated}, "
            f"{sum(expert_sums(e, o) for e in params)} Hessians {_gib(hessians)} "
            + ("in all, each on its expert's rank only" if o.expert_parallel and o.world_size > 1 else "on every rank")
        )
    if owners is None:
        return [*lines, "        owners: none, the true-sequential order refuses them (below)"]
    first = structure.experts[0].num_experts
    held = Counter(owners[:first])
    per_rank = [held.get(r, 0) for r in range(o.world_size)]
    if o.world_size == 1:
        who = "rank 0 (one process)"
    elif o.backend == "fsdp2":
        spread = (
            f"{per_rank[0]} on each rank" if len(set(per_rank)) == 1 else f"{min(per_rank)}-{max(per_rank)} per rank"
        )
        travel = "the routed tokens travel to them" if o.expert_parallel else "only the Hessians travel"
        who = f"the ranks storing them (FSDP2 rows: {spread}); {travel}"
    else:
        who = (
            f"balanced by GPTQ cost (assign_owners, max/mean {result.expert_balance[s]:.2f}); every result is "
            "all-gathered as int8 levels once every owner is done"
        )
    lines.append(f"        owners: {who}")
    return lines


def _peak_rank(result: Plan) -> RankMemory:
    return max(result.ranks, key=lambda r: r.peak)


def reasons(result: Plan) -> list[str]:
    """Why the plan does not fit: refused splits, and the peak with its parts."""
    out = list(result.problems)
    worst = _peak_rank(result)
    if worst.peak > result.options.gpu_memory:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(worst.peak_parts.items(), key=lambda kv: -kv[1]) if v)
        out.append(
            f"rank {worst.rank} peaks at {_gib(worst.peak)} > {_gib(result.options.gpu_memory)} during "
            f"{worst.peak_phase}: {parts}"
        )
    return out


def plan_from_config(config_path: str | Path, options: PlanOptions, dtype: str = "bfloat16") -> Plan:
    """Load the shapes (targets, ignored modules, group size of `options.config`) and plan in one call."""
    return plan(load_model_shape(config_path, DTYPES[dtype], options.config), options)
