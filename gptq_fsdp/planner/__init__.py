"""Will a sharded GPTQ run fit, and how long will it take? Worked out from the model's config alone
(`gptq-fsdp plan`). What is modelled, every formula and its assumptions: docs/planner.md.

Modules, each importing only those above it: `shapes` (the model read off a meta-device copy),
`options` (the run planned and the result types), `memory` (per-rank memory), `advice` (what would
make it fit), `timing` (traffic, time and `plan`), `report` (text and `plan_from_config`)."""

from gptq_fsdp.planner.advice import at_world_size, most_samples, smallest_world_size
from gptq_fsdp.planner.memory import peak_bytes
from gptq_fsdp.planner.options import LayerTraffic, Plan, PlanOptions, RankMemory, TimeEstimate, split_samples
from gptq_fsdp.planner.report import format_plan, parse_size, plan_from_config, reasons
from gptq_fsdp.planner.shapes import ExpertShape, GroupShape, LayerShape, ModelShape, load_model_shape
from gptq_fsdp.planner.timing import plan

__all__ = [
    "ExpertShape",
    "GroupShape",
    "LayerShape",
    "LayerTraffic",
    "ModelShape",
    "Plan",
    "PlanOptions",
    "RankMemory",
    "TimeEstimate",
    "at_world_size",
    "format_plan",
    "load_model_shape",
    "most_samples",
    "parse_size",
    "peak_bytes",
    "plan",
    "plan_from_config",
    "reasons",
    "smallest_world_size",
    "split_samples",
]
