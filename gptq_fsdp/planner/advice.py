"""What would make a run fit: the smallest world size, the most samples, activation offload, and
what does not shrink with more ranks. Each suggestion is a re-plan that fits (docs/planner.md)."""

from __future__ import annotations

import math

from gptq_fsdp.planner.memory import _expert_hessians, _gib, _hessian_bytes, _unit_workspace, expert_sums, peak_bytes
from gptq_fsdp.planner.options import Plan, PlanOptions
from gptq_fsdp.planner.shapes import ModelShape


def _fits(shape: ModelShape, options: PlanOptions) -> bool:
    peak, problems = peak_bytes(shape, options)
    return not problems and peak <= options.gpu_memory


def at_world_size(options: PlanOptions, world: int) -> PlanOptions:
    """`options` at `world` ranks, the batch size lowered where the samples would make fewer batches
    than ranks (each rank runs whole batches: data.rank_batches)."""
    if math.ceil(options.num_samples / options.batch_size) >= world:
        return options.with_(world_size=world)
    return options.with_(world_size=world, batch_size=max(1, options.num_samples // world))


def world_size_flags(candidate: PlanOptions, options: PlanOptions) -> str:
    """'--world-size N' of `candidate`, and the batch size `at_world_size` chose if not `options`'."""
    lowered = candidate.batch_size != options.batch_size
    return f"--world-size {candidate.world_size}" + (f" --batch-size {candidate.batch_size}" if lowered else "")


def smallest_world_size(shape: ModelShape, options: PlanOptions, limit: int | None = None) -> PlanOptions | None:
    """The options at the smallest world size above `options.world_size` that fits (at most the
    sample count; `at_world_size`), or None."""
    limit = limit or options.num_samples
    for world in range(options.world_size + 1, limit + 1):
        if _fits(shape, candidate := at_world_size(options, world)):
            return candidate
    return None


def most_samples(shape: ModelShape, options: PlanOptions) -> int | None:
    """The largest sample count below `options.num_samples` that fits at this world size."""
    low, high = options.world_size, options.num_samples - 1  # at least one sample per rank
    if high < low or peak_bytes(shape, options.with_(num_samples=low))[0] > options.gpu_memory:
        return None
    while low < high:  # peak grows with the samples: the largest count whose peak fits
        mid = (low + high + 1) // 2
        if peak_bytes(shape, options.with_(num_samples=mid))[0] <= options.gpu_memory:
            low = mid
        else:
            high = mid - 1
    for samples in range(low, options.world_size - 1, -1):  # and that rank_batches accepts
        if _fits(shape, options.with_(num_samples=samples)):
            return samples
    return None


def _advice(result: Plan) -> list[str]:
    shape, options = result.shape, result.options
    advice = []
    more = smallest_world_size(shape, options)
    if more is not None:
        advice.append(f"more ranks: {world_size_flags(more, options)} fits (peak {_gib(peak_bytes(shape, more)[0])})")
    else:
        floor = _floor(result)
        advice.append(
            f"more ranks: no world size up to {options.num_samples} (one sample per rank) fits; what does not shrink "
            f"with more ranks already needs {_gib(floor)} on one rank"
        )
        structure = shape.structures[result.largest]
        if structure.experts and not options.expert_parallel:
            experts = _expert_hessians(structure.experts, options)
            sums = sum(expert_sums(e, options) for e in structure.experts)
            advice.append(
                f"every rank holds all {sums} expert Hessians of a layer "
                f"({_gib(experts)}) beside the unsharded layer ({_gib(structure.numel * shape.element_size)}), at any "
                "world size: a GPU with more memory, or ignoring the experts modules (left unquantized), is what "
                "would make this fit"
            )
        elif structure.groups:
            workspace = {g: _unit_workspace(g, shape.element_size, options) for g in structure.groups}
            group = max(structure.groups, key=workspace.__getitem__)
            hessians = sum(_hessian_bytes(g.columns, options.device_type) for g in structure.groups)
            who = "every rank, for" if options.true_sequential else "the owner of"
            advice.append(
                f"{who} {group.label} [{group.total_rows} x {group.columns}] alone needs the layer's Hessians "
                f"({_gib(hessians)}) + GPTQ workspace ({_gib(workspace[group])}): a GPU with "
                "more memory, or fewer live fp32 copies in gptq.py, is what would make this fit"
            )
    if not options.offload_activations and not options.true_sequential:
        offload = options.with_(offload_activations=True)
        peak, problems = peak_bytes(shape, offload)
        if not problems and peak <= options.gpu_memory:
            advice.append(f"--offload-activations fits at --world-size {options.world_size} (peak {_gib(peak)})")
        else:
            both = smallest_world_size(shape, offload)
            tail = f"; with it, {world_size_flags(both, options)} fits" if both is not None else ""
            advice.append(f"--offload-activations alone does not fit (peak {_gib(peak)}){tail}")
    if not options.param_offload and options.world_size > 1:
        offload = options.with_(param_offload=True)
        peak, problems = peak_bytes(shape, offload)
        if not problems and peak <= options.gpu_memory:
            advice.append(f"--offload-param fits at --world-size {options.world_size} (peak {_gib(peak)})")
    samples = most_samples(shape, options)
    if samples is not None:
        per_rank = math.ceil(samples / options.world_size)
        advice.append(f"fewer samples per rank: --num-samples {samples} ({per_rank} per rank) fits")
    else:
        advice.append("fewer samples per rank: does not fit even with one sample per rank")
    return advice


def _floor(result: Plan) -> int:
    """Bytes that do not shrink with more ranks: the largest peak with shards and activations taken out."""
    floor = 0
    for rank in result.ranks:
        shrinking = ("shards", "expert pieces")
        parts = {k: v for k, v in rank.peak_parts.items() if k not in shrinking and not k.startswith("activations")}
        floor = max(floor, sum(parts.values()))
    return floor
