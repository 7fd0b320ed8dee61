"""Will a sharded GPTQ run fit, and how long will it take? Worked out from the model's config alone.

The model is built on the meta device (no weights), its decoder layers and target Linears are found
by the pipeline's own `find_decoder_layers` / `target_modules`, and the Hessian groups (Linears that
read the same input tensor) by running one forward of each distinct decoder layer on the meta device
under the pipeline's own `HessianHooks` (tensor identity, as in a real run). Where a layer's forward
cannot run on meta tensors (data-dependent control flow), a documented rule stands in: Linears with
the same parent module and in_features whose names are q/k/v or gate/up siblings share a group.
Owners come from the real scheduler, `schedule.assign_owners`, run per layer as the pipeline does.

Memory of rank r (bytes; b = bytes per element of --dtype, N = world size, T = --seq-len):

- shards: FSDP2 cuts every parameter's dim 0 like `torch.chunk` (ceil(rows/N) rows per rank, the
  last ranks get what is left, `backends.fsdp2.row_counts`); ZeRO-3 gives every rank a flat
  partition of ceil(numel/N) elements. One process (N = 1) holds the whole model.
- layer: one decoder layer unsharded for the forwards (all of its parameters, whole); 0 when N = 1.
- activations: the layer inputs of the rank's calibration slice, samples_r·T·hidden·b, with
  samples_r from `data.rank_batches` (ceil(samples/N) on the first ranks); x2 while a layer maps its
  inputs to outputs. With --offload-activations only one batch (of at most --batch-size samples) is
  on the device, x2 while propagating (the pipeline's ActivationStore with offload_activations).
- forward working set, one batch: batch_r·T·widest output·b, the largest Linear-group output
  (gate+up). XᵀX makes no copy of its input on a GPU (16-bit blocks go straight into the tensor
  cores, `hessian.HessianGroup`). Attention is assumed to use a fused kernel (no T² score matrix).
- Hessians: every rank accumulates every group of the layer: a float64 sum of the column blocks
  on and above the diagonal (upper(cols) elements: 91 of 169 blocks at 13 blocks a side) and one
  fp32 block of XᵀX, Σ (upper(cols)·8 + block²·4). They stay alive until the layer's GPTQ is
  done (the pending reduces hold them). "owned" is the part whose GPTQ this rank runs (already
  inside the total).
- owned weights: for each group it owns, the gathered pieces (N·piece·b) and the scatter buffer
  (N·piece·b), all held until the layer ends (all transfers are posted at once); plus, for every
  target, its own send and receive piece (2·piece·b). piece = ceil(rows/N)·cols (FSDP2) or
  ceil(rows·cols/N) (ZeRO-3).
- GPTQ workspace, for the owned group that needs most: the gathered weight handed to GPTQ
  (rows·cols·b) + 2·W + 2·H with W = rows·cols·4 and H = cols²·4: when the weight is transposed W
  and Wt are both alive beside the fp32 Hessian (GPTQ's working copy) and its Cholesky factor (later
  Wt and a copy of the original columns in the weight's dtype, no more than 2·W); with
  dynamic scales (act-order none/group) the factor's triangular inverse is computed beside them
  (max(W + 3·H, 2·W + 2·H)).
- phases of a layer (peak = the largest, over layers, plus the capture phase):
  hessian forward = shards + layer + activations + working set + Hessians;
  GPTQ = shards + activations + Hessians + owned weights + workspace;
  propagate = shards + layer + 2·activations + working set;
  capture (once) = shards + every parameter outside the decoder layers, whole (embeddings, final
  norm, lm_head: FSDP2's root unshards them together; an upper bound for ZeRO-3) + activations.
  Not counted: attention masks and rotary tables kept per batch, the CUDA context, allocator slack.

Communication per layer: the Hessian sums reduced to their owners (Σ upper(cols)·8 bytes); the
weights gathered to owners and scattered back (Σ over targets 2·(N-1)·piece·b); the all-gather of
the whole layer for a forward ((N-1)·Σ pieces·b received by every rank), twice per layer under
FSDP2 (the pipeline keeps the layer unsharded across all batches of a pass) and once per forward
call under ZeRO-3 (its backend does not pin the layer: an upper bound, DeepSpeed may reuse it).

Time per layer (rates: --matmul-tflops M, --cholesky-tflops C, --bandwidth-gbps B in GB/s, i.e.
10⁹ bytes per second per rank), for the rank with the most samples (tokens t = samples_r·T):
  forward  = 2 passes · (2·active_params·t + samples_r·2·T²·heads·head_dim) / M   (causal attention;
             MoE expert parameters count with num_experts_per_tok / num_experts)
  XᵀX      = Σ_groups 2·t·upper(cols) / M   (only the blocks on and above the diagonal are multiplied)
  gathers  = all-gathers per layer · layer all-gather bytes / B
  GPTQ     = max(slowest owner's Σ (k·cols³ / C + rows·cols² / M + column latency·cols),
                 transfers), transfers = (N-1)/N·Σ Hessian bytes / B + busiest owner's weight bytes / B
  (k = 1/3 with static scales, act-order static or one scale per channel: one Cholesky; 4/3 with
  act-order none/group, which also inverts the factor; the package's cost model
  `schedule.gptq_cost` with its factorization and update terms replaced by
  their FLOPs at the given rates, its per-column latency set by --column-latency-us (default 25 µs:
  an H200 ran GPTQ's column loop, replayed as a CUDA graph, at 22-30 µs per column for 4096..28672
  columns; 110-150 µs without it, as with act-order none) and its elementwise term dropped;
  transfers are posted at once and overlap GPTQ.)
The total is the sum over layers.

With --true-sequential (pipeline._run_layer_true_sequential) one forward per layer does it all:
- memory: every batch's forward pauses inside the layer, so each of the rank's samples_r·T tokens
  holds what a forward holds at its worst pause before a target ("paused forwards"). The meta
  forward that finds the groups measures it: the storages made by the layer (Hessian sums aside)
  still alive in each target's pre-hook, per probe token (Llama-3.1-8B: before down_proj, its
  input, the residual and the normalized input, (14336 + 2·4096)·b). Assumes no [T, T] attention
  matrix lives at a pause (sdpa/flash attention; the probe's T is 4). Without a meta forward, the
  rule (widest input + 2·hidden)·b stands in. Every rank sums every Hessian and runs GPTQ on its share of each
  unit's rows, beside the unit's stacked weight (several members are concatenated) and the whole
  result it all-gathers (rows·cols·(b + 1): weight and int8 levels); a unit's owner only packs it
  and keeps the result till the layer ends (owners balanced by elements, schedule.packing_cost).
  Phases: GPTQ = shards + layer + activations + paused forwards + Hessians + owned results + that
  workspace; layer end = shards + layer + 2·activations + Hessians + owned results. No activation
  offload (the package refuses it: the paused forwards hold their inputs on the device).
- time: forward = 1 pass; layer all-gathers once per layer (FSDP2) or per forward call (ZeRO-3);
  GPTQ = Σ units (k·cols³/C + ceil(rows/N)·cols²/M + column latency·cols) + (Hessian all-reduce
  2·(N-1)/N·Σ upper(cols)·8 + rows all-gather (N-1)·ceil(rows/N)·cols) / B, with no overlap: each
  unit waits for its collectives.
"""

from __future__ import annotations

import functools
import gc
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.hessian import column_blocks, packed_size, upper_blocks
from gptq_fsdp.distributed.compat import storage_key
from gptq_fsdp.distributed.fsdp2 import row_counts
from gptq_fsdp.distributed.schedule import assign_owners, gptq_cost, packing_cost
from gptq_fsdp.model.capture import StopForward
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.model.layers import find_decoder_layers, ignored_modules, target_modules, uncovered_matrices

GiB = 2**30
REDUCE_BYTES = 8  # per element: the float64 sum is what gets reduced
FP32 = 4
BACKENDS = ("fsdp2", "zero3")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROBE_TOKENS = 4  # sequence length of the meta-device probe forward (any length gives the same groups)
# Siblings that read one input, for layers whose forward cannot run on meta tensors.
SIBLING_SETS = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


# --------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class GroupShape:
    """One Hessian group: Linears (names relative to the layer) reading one input of `columns` features."""

    names: tuple[str, ...]
    rows: tuple[int, ...]  # out_features of each member
    columns: int

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def label(self) -> str:
        parent = self.names[0].rpartition(".")[0]
        if all(n.rpartition(".")[0] == parent for n in self.names) and parent:
            return f"{parent}.{'+'.join(n.rpartition('.')[2] for n in self.names)}"
        return "+".join(self.names)


@dataclass(frozen=True)
class LayerShape:
    """Everything the planner needs from one distinct decoder-layer structure."""

    params: tuple[tuple[int, ...], ...]  # every parameter's shape
    groups: tuple[GroupShape, ...]
    active_params: float  # parameters a token passes through (MoE experts weighted by top-k / experts)
    widest_output: int  # largest output width of a forward (a group's stacked rows, or a fused weight)
    unquantized: tuple[str, ...]  # matrix parameters no target covers and not ignored (fused MoE experts, routers)
    unquantized_params: int
    grouping: str  # "forward" (tensor identity in a meta forward) or "rule" (sibling names)
    # What one token of a true-sequential forward holds while paused before its worst Linear: measured
    # in the meta forward ("forward") or by the rule.
    paused_bytes_per_token: float

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.params)


@dataclass(frozen=True)
class ModelShape:
    """The model, as shapes: parameters outside the layers, and each decoder layer's structure."""

    name: str
    dtype: torch.dtype
    hidden: int
    attention_width: int  # heads · head_dim (0 when the config does not say)
    layers_name: str
    outer_params: tuple[tuple[int, ...], ...]  # parameters outside the decoder layers
    structures: tuple[LayerShape, ...]  # distinct layer structures
    layer_structure: tuple[int, ...]  # index into `structures` of each decoder layer

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_layers(self) -> int:
        return len(self.layer_structure)

    @property
    def total_params(self) -> int:
        outer = sum(math.prod(s) for s in self.outer_params)
        return outer + sum(self.structures[s].numel for s in self.layer_structure)

    def all_params(self) -> Counter[tuple[int, ...]]:
        """Every parameter shape of the model, with its count."""
        counts: Counter[tuple[int, ...]] = Counter(self.outer_params)
        for s in self.layer_structure:
            counts.update(self.structures[s].params)
        return counts


def load_model_shape(
    config_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    group_size: int | None = 128,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> ModelShape:
    """Build the model from its HF config on the meta device and read off layers, targets and groups."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    gptq_config = GPTQConfig.from_options(group_size=group_size, targets=targets, ignore=ignore)
    per_layer = target_modules(model, gptq_config)
    layers_name, layers = find_decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    outer = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_layers)

    calls = _probe_layer_calls(model, layers)
    hidden = int(calls[0][0][0].shape[-1]) if calls else int(config.hidden_size)
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if getattr(config, k, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    expert_fraction = top_k / experts if experts and top_k else 1.0

    structures: list[LayerShape] = []
    index_of: dict[tuple, int] = {}
    layer_structure = []
    ignored = ignored_modules(model, gptq_config)
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}."
        modules = {name[len(prefix) :]: module for name, module in per_layer[i].items()}
        skipped = {name[len(prefix) :] for name in ignored if name.startswith(prefix)}
        key = (tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()), tuple(modules), tuple(sorted(skipped)))
        if key not in index_of:
            index_of[key] = len(structures)
            structures.append(_layer_shape(layer, modules, skipped, calls, expert_fraction, hidden))
        layer_structure.append(index_of[key])
    return ModelShape(
        name=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        dtype=dtype,
        hidden=hidden,
        attention_width=heads * head_dim,
        layers_name=layers_name,
        outer_params=outer,
        structures=tuple(structures),
        layer_structure=tuple(layer_structure),
    )


@torch.no_grad()
def _probe_layer_calls(model: nn.Module, layers: nn.ModuleList) -> list[tuple[tuple, dict]]:
    """The first decoder layer's call arguments, from meta forwards stopped at that layer.

    Meta tensors have no values, so mask handling that looks at them fails. Two ways are tried: a
    ready-made 4-D mask (transformers then does not build one: Llama, Mistral, Gemma3, Qwen) and no
    mask (models that derive positions from the mask, like OPT). Calls whose hidden states are not
    [1, tokens, hidden] are dropped; the layer forward then tries each call that remains.
    """
    calls: list[tuple[tuple, dict]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and tuple(hidden.shape[:2]) == (1, PROBE_TOKENS):
            calls.append((args, kwargs))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    ids = torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device="meta")
    mask = torch.ones(1, 1, PROBE_TOKENS, PROBE_TOKENS, dtype=torch.bool, device="meta")
    try:
        for kwargs in ({"attention_mask": mask}, {}):
            try:
                model(input_ids=ids, use_cache=False, **kwargs)
            except StopForward:
                pass
            except Exception:  # any failure means: try the next way, then fall back to the rule
                continue
    finally:
        handle.remove()
    return calls


def _layer_shape(
    layer: nn.Module,
    modules: dict[str, nn.Linear],
    ignored: set[str],
    calls: list[tuple[tuple, dict]],
    expert_fraction: float,
    hidden: int,
) -> LayerShape:
    probe = next((p for call in calls if (p := _groups_by_forward(layer, modules, call)) is not None), None)
    grouping = "forward"
    if probe is None:
        groups, grouping = _groups_by_rule(modules), "rule"
    else:
        groups, paused = probe
    group_shapes = tuple(
        GroupShape(tuple(names), tuple(modules[n].out_features for n in names), modules[names[0]].in_features)
        for names in groups
    )
    if probe is None:  # what the forward shows for pre-norm layers: the input, a residual and a normed copy
        element_size = next(layer.parameters()).element_size()
        paused = (max((g.columns for g in group_shapes), default=0) + 2 * hidden) * element_size
    others = uncovered_matrices(layer, set(modules))  # they still run in the forward
    unquantized = uncovered_matrices(layer, {*modules, *ignored})
    active = 0.0
    for name, p in layer.named_parameters():
        active += p.numel() * (expert_fraction if "experts" in name.split(".") else 1.0)
    widest = max([g.total_rows for g in group_shapes] + [shape[-2] for _, shape in others], default=0)
    return LayerShape(
        params=tuple(tuple(p.shape) for p in layer.parameters()),
        groups=group_shapes,
        active_params=active,
        widest_output=int(widest),
        unquantized=tuple(n for n, _ in unquantized),
        unquantized_params=sum(shape.numel() for _, shape in unquantized),
        grouping=grouping,
        paused_bytes_per_token=paused,
    )


@torch.no_grad()
def _groups_by_forward(
    layer: nn.Module, modules: dict[str, nn.Linear], call: tuple[tuple, dict]
) -> tuple[list[list[str]], float] | None:
    """Groups by tensor identity (`HessianHooks`) in one meta forward, and the bytes per token that
    the forward holds at its worst pause before a target (as a paused true-sequential forward does);
    None if the forward fails.

    The forward is stopped once every target has taken its input, so e.g. an MoE block after the
    attention targets is never run. A target the forward never reached gets a group of its own.
    """
    if not modules:
        return [], 0.0
    hooks = HessianHooks(modules, stop_early=False)
    seen: set[str] = set()
    before = live_storages("meta")
    paused = 0

    def at_pause(name: str) -> None:
        nonlocal paused
        paused = max(paused, bytes_made_since(before, hooks, "meta"))
        seen.add(name)
        if len(seen) == len(modules):
            raise StopForward

    args, kwargs = call
    with hooks.attached():
        # Registered after HessianHooks' own hooks, as the pipeline's pausing hooks are.
        handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: at_pause(n)) for n, m in modules.items()]
        try:
            hooks.start_forward(None)
            layer(*args, **kwargs)
        except StopForward:
            pass
        except Exception:  # data-dependent code on meta tensors: use the rule instead
            return None
        finally:
            for handle in handles:
                handle.remove()
    groups = [list(g.names) for g in hooks.groups]
    grouped = {n for g in groups for n in g}
    return groups + [[n] for n in modules if n not in grouped], paused / PROBE_TOKENS


def bytes_made_since(before: dict[int, int], hooks: HessianHooks, device_type: str) -> int:
    """Bytes of the storages alive now that were not in `before` (a `live_storages` result), the
    hooks' own Hessian buffers aside: what a forward paused here holds."""
    own = {storage_key(t) for g in hooks.groups for t in g.buffers}
    return sum(n for k, n in live_storages(device_type).items() if k not in before and k not in own)


def live_storages(device_type: str) -> dict[int, int]:
    """Bytes of every tensor storage alive on `device_type`, by storage (views count once)."""
    storages = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): the latter reads __class__, which deprecated torch objects warn on.
        if issubclass(type(obj), torch.Tensor) and obj.device.type == device_type:
            storage = obj.untyped_storage()
            storages[storage_key(obj)] = storage.nbytes()
    return storages


def _groups_by_rule(modules: dict[str, nn.Linear]) -> list[list[str]]:
    """Same parent, same in_features, names in one sibling set (q/k/v, gate/up) -> one group."""
    groups: dict[tuple, list[str]] = {}
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        sibling = next((s for s in SIBLING_SETS if leaf in s), None)
        key = (parent, module.in_features, sibling) if sibling else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlanOptions:
    """The run being planned. `bandwidth_gbps` is in GB/s (10⁹ bytes per second per rank)."""

    world_size: int
    gpu_memory: int  # bytes
    samples: int = 128
    seq_len: int = 2048
    backend: str = "fsdp2"
    batch_size: int = 8
    offload_activations: bool = False
    matmul_tflops: float = 400.0
    cholesky_tflops: float = 20.0
    bandwidth_gbps: float = 200.0
    column_latency_us: float = 25.0
    static_scales: bool = True  # act-order static or one scale per channel (else act-order none/group)
    true_sequential: bool = False
    device_type: str = "cuda"  # where the run computes: the Hessian's block layout depends on it ("cuda" or "cpu")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {self.device_type!r}")
        for name in ("world_size", "gpu_memory", "samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("matmul_tflops", "cholesky_tflops", "bandwidth_gbps", "column_latency_us"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.true_sequential and self.offload_activations:
            raise ValueError("offload_activations and true_sequential exclude each other (GPTQConfig refuses both)")


@dataclass
class RankMemory:
    """Bytes one rank holds; per-layer items are the largest over the layers."""

    rank: int
    shards: int
    layer: int
    activations: int  # at rest (x2 while propagating)
    working: int  # forward working set of one batch
    hessians: int  # all groups of the layer, every rank
    hessians_owned: int
    owned_weights: int  # gather + scatter buffers
    workspace: int  # GPTQ of its largest owned group
    peak: int
    peak_phase: str
    peak_parts: dict[str, int]


@dataclass
class LayerTraffic:
    """Bytes moved for one decoder layer (one structure)."""

    hessian_reduce: int  # float64 sums reduced to owners
    weight_transfer: int  # gathered to owners + scattered back
    layer_gather: int  # received by every rank per all-gather of the layer
    gathers: int  # all-gathers of the layer per layer


@dataclass
class TimeEstimate:
    """Seconds for the whole model, by component (see the module docstring)."""

    forward: float
    xtx: float
    gathers: float
    gptq: float  # GPTQ phases, transfers overlapped

    @property
    def total(self) -> float:
        return self.forward + self.xtx + self.gathers + self.gptq


@dataclass
class Plan:
    shape: ModelShape
    options: PlanOptions
    ranks: list[RankMemory]
    samples_per_rank: list[int]
    batches: int  # forward calls per rank per pass
    owners: list[list[int]]  # per structure: owner of each group
    balance: list[float]  # per structure: max/mean predicted load from assign_owners
    traffic: list[LayerTraffic]  # per structure
    time: TimeEstimate
    problems: list[str] = field(default_factory=list)  # the package would refuse this run
    suggestions: list[str] = field(default_factory=list)
    # The same run in the other order (true-sequential or standard): estimated seconds and peak bytes;
    # None where that order is refused (activation offload with true-sequential).
    other_order: tuple[float, int] | None = None

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak <= self.options.gpu_memory

    @property
    def largest(self) -> int:
        """Index of the largest layer structure (by parameter count)."""
        return max(range(len(self.shape.structures)), key=lambda s: self.shape.structures[s].numel)


def split_samples(samples: int, world: int, batch_size: int) -> tuple[list[int], int, list[int], list[str]]:
    """Samples, forward calls and largest batch of each rank, as `data.rank_batches` splits them."""
    base, extra = divmod(samples, world)
    per_rank = [base + (r < extra) for r in range(world)]
    batches = math.ceil((base + (extra > 0)) / batch_size)
    largest = [math.ceil(n / batches) if batches else 0 for n in per_rank]
    problems = []
    if samples < world:
        problems.append(f"{samples} calibration samples cannot be split across {world} ranks")
    elif min(per_rank) < batches:
        problems.append(
            f"rank {per_rank.index(min(per_rank))} has {min(per_rank)} samples for {batches} forward calls "
            "(data.rank_batches refuses this): use a larger --batch-size or a sample count the ranks divide"
        )
    return per_rank, batches, largest, problems


@functools.lru_cache(maxsize=65536)
def _rows(rows: int, world: int) -> tuple[int, ...]:
    return tuple(row_counts(rows, world))


def _piece(shape: tuple[int, ...], world: int, backend: str) -> int:
    """Elements of one rank's padded piece of a parameter (what a collective moves per rank)."""
    if backend == "fsdp2" and len(shape) > 0:
        return math.ceil(shape[0] / world) * math.prod(shape[1:])
    return math.ceil(math.prod(shape) / world)


def _local(shape: tuple[int, ...], world: int, rank: int, backend: str) -> int:
    """Elements of a parameter that `rank` stores at rest."""
    if world == 1:
        return math.prod(shape)
    if backend == "fsdp2" and len(shape) > 0:
        return _rows(shape[0], world)[rank] * math.prod(shape[1:])
    return math.ceil(math.prod(shape) / world)


def _workspace(rows: int, cols: int, element_size: int, static_scales: bool) -> int:
    """GPTQ's own memory for a [rows, cols] weight (see the module docstring: gptq.py's live fp32 copies)."""
    w = rows * cols * FP32
    h = cols**2 * FP32
    inverse = 0 if static_scales else w + 3 * h
    return rows * cols * element_size + max(inverse, 2 * w + 2 * h)


def _row_share(group: GroupShape, world: int) -> int:
    """True-sequential: the most rows of a unit one rank quantizes (pipeline._shares)."""
    return math.ceil(group.total_rows / world)


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


def _gptq_seconds(rows: int, cols: int, options: PlanOptions) -> float:
    """The package's cost model with its FLOP terms at the given rates (module docstring)."""
    factorization = 1 / 3 if options.static_scales else 4 / 3
    return (
        factorization * cols**3 / (options.cholesky_tflops * 1e12)
        + rows * cols**2 / (options.matmul_tflops * 1e12)
        + options.column_latency_us * 1e-6 * cols
    )


class _Context:
    """What does not depend on the rank: splits, owners, per-structure sizes."""

    def __init__(self, shape: ModelShape, options: PlanOptions) -> None:
        self.shape, self.options = shape, options
        world, b = options.world_size, shape.element_size
        self.per_rank, self.batches, self.batch, self.problems = split_samples(
            options.samples, world, options.batch_size
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
    token_bytes = options.seq_len * shape.hidden * b
    act_samples = ctx.batch[rank] if options.offload_activations else ctx.per_rank[rank]
    activations = act_samples * token_bytes
    batch_tokens = ctx.batch[rank] * options.seq_len

    best = RankMemory(rank, shards, 0, activations, 0, 0, 0, 0, 0, 0, "", {})
    capture = {"shards": shards, "outer params": ctx.outer_bytes, "activations": activations}
    phases: list[tuple[str, dict[str, int]]] = [("capture", capture)]
    for s, structure in enumerate(shape.structures):
        layer = structure.numel * b if ctx.sharded else 0
        working = batch_tokens * structure.widest_output * b
        hessians = sum(_hessian_bytes(g.columns, options.device_type) for g in structure.groups)
        owners = ctx.owners(s)
        mine = [g for g, o in zip(structure.groups, owners, strict=True) if o == rank]
        owned_h = sum(_hessian_bytes(g.columns, options.device_type) for g in mine)
        layers = [i for i, x in enumerate(shape.layer_structure) if x == s]
        where = f"layer {layers[0]}" + (f" (and {len(layers) - 1} like it)" if len(layers) > 1 else "")
        if options.true_sequential:
            # Every batch's forward waits inside the layer, holding what the meta forward measured per
            # token at its worst pause; the owners keep their units' results till the layer ends.
            working = math.ceil(ctx.per_rank[rank] * options.seq_len * structure.paused_bytes_per_token)
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
            phases += [
                (
                    f"Hessian forward, {where}",
                    {
                        "shards": shards,
                        "layer": layer,
                        "activations": activations,
                        "working set": working,
                        "Hessians": hessians,
                    },
                ),
                (
                    f"GPTQ, {where}",
                    {
                        "shards": shards,
                        "activations": activations,
                        "Hessians": hessians,
                        "owned weights": buffers,
                        "GPTQ workspace": workspace,
                    },
                ),
                (
                    f"propagate, {where}",
                    {"shards": shards, "layer": layer, "activations x2": 2 * activations, "working set": working},
                ),
            ]
        best.layer = max(best.layer, layer)
        best.working = max(best.working, working)
        best.hessians = max(best.hessians, hessians)
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


def plan(shape: ModelShape, options: PlanOptions, advise: bool = True) -> Plan:
    """Memory per rank, traffic, balance and time for `options`; with `advise`, what would make it fit."""
    ctx = _Context(shape, options)
    world, backend, b = options.world_size, options.backend, shape.element_size
    ranks = [_rank_memory(ctx, r) for r in range(world)]
    traffic, balance = [], []
    forward = xtx = gathers = gptq = 0.0
    mm, bw = options.matmul_tflops * 1e12, options.bandwidth_gbps * 1e9
    samples0 = ctx.per_rank[0]
    tokens = samples0 * options.seq_len
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
        layer_gather = (world - 1) * sum(_piece(p, world, backend) for p in structure.params) * b
        n_gathers = 0 if world == 1 else (passes if backend == "fsdp2" else passes * ctx.batches)
        traffic.append(LayerTraffic(hessian_reduce, weight_transfer, layer_gather, n_gathers))
        balance.append(ctx.assignments[s].balance if ctx.assignments[s] else 1.0)

        attention = samples0 * 2 * options.seq_len**2 * shape.attention_width
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
        time=TimeEstimate(forward, xtx, gathers, gptq),
        problems=list(ctx.problems),
    )
    if advise:
        if not result.fits:
            result.suggestions = _advice(result)
        if not options.offload_activations:
            other = plan(shape, replace(options, true_sequential=not options.true_sequential), advise=False)
            result.other_order = (other.time.total, other.peak)
    return result


def _fits(shape: ModelShape, options: PlanOptions) -> bool:
    peak, problems = peak_bytes(shape, options)
    return not problems and peak <= options.gpu_memory


def smallest_world_size(shape: ModelShape, options: PlanOptions, limit: int | None = None) -> int | None:
    """The smallest world size above `options.world_size` that fits (at most the sample count)."""
    limit = limit or options.samples
    for world in range(options.world_size + 1, limit + 1):
        if _fits(shape, replace(options, world_size=world)):
            return world
    return None


def most_samples(shape: ModelShape, options: PlanOptions) -> int | None:
    """The largest sample count below `options.samples` that fits at this world size."""
    low, high = options.world_size, options.samples - 1  # at least one sample per rank
    if high < low or peak_bytes(shape, replace(options, samples=low))[0] > options.gpu_memory:
        return None
    while low < high:  # peak grows with the samples: the largest count whose peak fits
        mid = (low + high + 1) // 2
        if peak_bytes(shape, replace(options, samples=mid))[0] <= options.gpu_memory:
            low = mid
        else:
            high = mid - 1
    for samples in range(low, options.world_size - 1, -1):  # and that rank_batches accepts
        if _fits(shape, replace(options, samples=samples)):
            return samples
    return None


def _advice(result: Plan) -> list[str]:
    shape, options = result.shape, result.options
    advice = []
    world = smallest_world_size(shape, options)
    if world is not None:
        peak = peak_bytes(shape, replace(options, world_size=world))[0]
        advice.append(f"more ranks: --world-size {world} fits (peak {_gib(peak)})")
    else:
        floor = _floor(result)
        advice.append(
            f"more ranks: no world size up to {options.samples} (one sample per rank) fits; what does not shrink "
            f"with more ranks already needs {_gib(floor)} on one rank"
        )
        structure = shape.structures[result.largest]
        if structure.groups:
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
        offload = replace(options, offload_activations=True)
        peak, problems = peak_bytes(shape, offload)
        if not problems and peak <= options.gpu_memory:
            advice.append(f"--offload-activations fits at --world-size {options.world_size} (peak {_gib(peak)})")
        else:
            both = smallest_world_size(shape, offload)
            tail = f"; with it, --world-size {both} fits" if both is not None else ""
            advice.append(f"--offload-activations alone does not fit (peak {_gib(peak)}){tail}")
    samples = most_samples(shape, options)
    if samples is not None:
        per_rank = math.ceil(samples / options.world_size)
        advice.append(f"fewer samples per rank: --samples {samples} ({per_rank} per rank) fits")
    else:
        advice.append("fewer samples per rank: does not fit even with one sample per rank")
    return advice


def _floor(result: Plan) -> int:
    """Bytes that do not shrink with more ranks: the largest peak with shards and activations taken out."""
    floor = 0
    for rank in result.ranks:
        parts = {k: v for k, v in rank.peak_parts.items() if k not in ("shards",) and not k.startswith("activations")}
        floor = max(floor, sum(parts.values()))
    return floor


# ------------------------------------------------------------------------------------------------ text


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '80G' (= GiB), '81920MiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 80GiB, 80GB, 81920MiB)")
    number, prefix, binary, unit = match.groups()
    power = "KMGT".find(prefix.upper()) + 1 if prefix else 0
    decimal = bool(prefix) and not binary and bool(unit)  # 'GB' is decimal; 'GiB' and bare 'G' are binary
    return int(float(number) * (1000 if decimal else 1024) ** power)


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


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
        f"run: {world} rank(s) x {_gib(o.gpu_memory)}, {o.backend}, {o.samples} samples x {o.seq_len} tokens "
        f"({result.samples_per_rank[0]} on rank 0 in {result.batches} forward call(s) per pass), "
        f"batch size {o.batch_size}{', activations offloaded' if o.offload_activations else ''}"
        f"{', true-sequential' if o.true_sequential else ''}",
    ]
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
        if structure.unquantized_params:
            lines.append(
                f"    not quantized (no nn.Linear target covers them): {', '.join(structure.unquantized)} - "
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
    passes = "1 pass" if ts else "2 passes"
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
            + (f"; {idle} of {world} rank(s) own no group and wait during GPTQ" if idle > 0 else "")
        )
    lines.append("")
    tm = result.time
    lines.append(
        f"estimated time {_seconds(tm.total)}: forward {_seconds(tm.forward)}, XᵀX {_seconds(tm.xtx)}, "
        f"layer all-gathers {_seconds(tm.gathers)}, GPTQ {_seconds(tm.gptq)}"
    )
    lines += [
        f"    at {o.matmul_tflops:g} matmul TFLOP/s, {o.cholesky_tflops:g} Cholesky TFLOP/s, {o.bandwidth_gbps:g} GB/s "
        "per rank (10⁹ bytes/s), for the rank with the most samples; per layer:",
        f"    forward = {passes} x (2·active params·tokens + 2·samples·seq²·heads·head_dim) / matmul",
        "    XᵀX = Σ groups 2·tokens·cols² / matmul;  all-gathers = bytes / bandwidth",
        (
            f"    GPTQ = Σ units k·cols³/Cholesky + rows/N·cols²/matmul + {o.column_latency_us:g} µs·cols "
            "+ (Hessian all-reduce + rows all-gather) / bandwidth, on every rank"
            if ts
            else f"    GPTQ = max(slowest owner's Σ k·cols³/Cholesky + rows·cols²/matmul + {o.column_latency_us:g} "
            "µs·cols, Hessian reduces + weight transfers / bandwidth)"
        ),
        "    (k = 1/3 with act-order static or one scale per channel, 4/3 with none/group)",
    ]
    if result.other_order is not None:
        seconds, peak = result.other_order
        other = "standard order" if ts else "--true-sequential"
        lines.append(f"{other}: estimated time {_seconds(seconds)}, peak {_gib(peak)}")
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


def plan_from_config(
    config_path: str | Path, options: PlanOptions, dtype: str = "bfloat16", group_size: int = 128
) -> Plan:
    """Load the shapes and plan in one call (`group_size` 0: one scale per channel)."""
    shape = load_model_shape(config_path, DTYPES[dtype], group_size or None)
    return plan(shape, options)


__all__ = [
    "ModelShape",
    "Plan",
    "PlanOptions",
    "format_plan",
    "load_model_shape",
    "parse_size",
    "peak_bytes",
    "plan",
    "plan_from_config",
    "reasons",
    "most_samples",
    "split_samples",
    "smallest_world_size",
]
