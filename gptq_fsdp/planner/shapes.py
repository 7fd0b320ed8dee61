"""The model as shapes, read off a weightless (meta-device) copy built from its HF config: parameters
outside the decoder layers, each distinct layer's parameters, targets and Hessian groups, and what a
paused true-sequential forward holds per token. How groups are found: docs/planner.md."""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from gptq_fsdp.compat import dispatch_mode, storage_key, tensor_leaves
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.model.capture import StopForward
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.model.layers import find_decoder_layers, routers, target_experts, target_modules, uncovered_matrices

PROBE_TOKENS = 4  # sequence length of the meta-device probe forward (any length gives the same groups)
# Siblings that read one input, for layers whose forward cannot run on meta tensors.
SIBLING_SETS = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


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
class ExpertShape:
    """One fused projection of a layer's MoE experts that GPTQ quantizes per expert
    (`model.experts.ExpertParam`): `num_experts` slices of [total_rows, columns], each a unit with a
    Hessian of its own, summed from the tokens routed to that expert."""

    module: str  # the experts module, relative to the layer: "mlp.experts"
    param_name: str  # "gate_up_proj" or "down_proj"
    members: tuple[str, ...]  # checkpoint names of a slice's rows: ("gate_proj", "up_proj"), ("w2",)
    num_experts: int
    rows: int  # of each member
    columns: int
    top_k: int  # experts each token is routed to (every expert when the config does not say)

    @property
    def total_rows(self) -> int:
        return self.rows * len(self.members)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_experts, self.total_rows, self.columns)


@dataclass(frozen=True)
class LayerShape:
    """Everything the planner needs from one distinct decoder-layer structure."""

    params: tuple[tuple[int, ...], ...]  # every parameter's shape
    groups: tuple[GroupShape, ...]
    active_params: float  # parameters a token passes through (MoE experts weighted by top-k / experts)
    widest_output: int  # largest output width of a forward (a group's stacked rows, or a fused weight)
    # Matrix parameters left in full precision, routers aside: no target covers them (fused experts GPTQ
    # cannot quantize), or the config ignores them.
    unquantized: tuple[str, ...]
    unquantized_params: int
    grouping: str  # "forward" (tensor identity in a meta forward) or "rule" (sibling names)
    # What one token of a true-sequential forward holds while paused before its worst Linear: measured
    # in the meta forward ("forward") or by the rule.
    paused_bytes_per_token: float
    experts: tuple[ExpertShape, ...] = ()  # fused MoE projections quantized per expert

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
    config_path: str | Path, dtype: torch.dtype = torch.bfloat16, config: GPTQConfig | None = None
) -> ModelShape:
    """Build the model from its HF config on the meta device and read off layers, targets and groups.

    The targets, ignored modules and group size (checked against every target's columns) are those of
    `config` (default: `GPTQConfig.from_options()`); fused MoE experts are found as the run finds
    them (`target_experts`), whatever the order (the plan says when true-sequential refuses them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        config = GPTQConfig.from_options()
    hf_config = AutoConfig.from_pretrained(str(config_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    per_layer = target_modules(model, config)
    fused = target_experts(model, replace(config, true_sequential=False))
    layers_name, layers = find_decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    outer = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_layers)

    calls = _probe_layer_calls(model, layers)
    hidden = int(calls[0][0][0].shape[-1]) if calls else int(hf_config.hidden_size)
    heads = getattr(hf_config, "num_attention_heads", 0) or 0
    head_dim = getattr(hf_config, "head_dim", None) or (hidden // heads if heads else 0)
    experts = next((getattr(hf_config, k) for k in EXPERT_COUNT_KEYS if getattr(hf_config, k, None)), None)
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    expert_fraction = top_k / experts if experts and top_k else 1.0
    never = set(routers(model))  # routers are left in full precision by design: not reported

    structures: list[LayerShape] = []
    index_of: dict[tuple, int] = {}
    layer_structure = []
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}."
        modules = {name[len(prefix) :]: module for name, module in per_layer[i].items()}
        units = tuple(
            ExpertShape(p.module_name[len(prefix) :], p.param_name, p.members, p.num_experts, p.rows, p.columns, k)
            for p in fused[i]
            for k in [top_k or p.num_experts]
        )
        # Not reported as left out: the routers, and the fused parameters quantized per expert.
        settled = {name[len(prefix) :] for name in never if name.startswith(prefix)}
        settled |= {f"{e.module}.{e.param_name}" for e in units}
        key = (tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()), tuple(modules), units)
        if key not in index_of:
            index_of[key] = len(structures)
            shape = _layer_shape(layer, modules, settled, calls, expert_fraction, hidden)
            structures.append(replace(shape, experts=units) if units else shape)
        layer_structure.append(index_of[key])
    return ModelShape(
        name=(getattr(hf_config, "architectures", None) or [type(model).__name__])[0],
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
    settled: set[str],
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
    unquantized = uncovered_matrices(layer, {*modules, *settled})
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
    made = NewTensors()
    paused = 0

    def at_pause(name: str) -> None:
        nonlocal paused
        paused = max(paused, made.bytes_alive(hooks))
        seen.add(name)
        if len(seen) == len(modules):
            raise StopForward

    args, kwargs = call
    with hooks.attached(), made:
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


class NewTensors(dispatch_mode()):
    """Sees every tensor the ops inside make; `bytes_alive` is what those still alive hold (each
    storage once), the `hooks`' own Hessian buffers aside: what a forward paused there holds.
    Weak references only: a tensor the forward has dropped no longer counts."""

    def __init__(self) -> None:
        super().__init__()
        self._made: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._made += [weakref.ref(t) for t in tensor_leaves(out)]
        return out

    def bytes_alive(self, hooks: HessianHooks) -> int:
        own = {storage_key(t) for g in hooks.groups for t in g.buffers}
        alive = {storage_key(t): t.untyped_storage().nbytes() for t in (ref() for ref in self._made) if t is not None}
        return sum(n for key, n in alive.items() if key not in own)


def _groups_by_rule(modules: dict[str, nn.Linear]) -> list[list[str]]:
    """Same parent, same in_features, names in one sibling set (q/k/v, gate/up) -> one group."""
    groups: dict[tuple, list[str]] = {}
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        sibling = next((s for s in SIBLING_SETS if leaf in s), None)
        key = (parent, module.in_features, sibling) if sibling else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())
