"""MoE experts as GPTQ targets.

transformers 5 stores a layer's experts fused (`@use_experts_implementation`): one 3-D parameter per
projection, `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I], not
nn.Linear. GPTQ quantizes each expert's slice: an `ExpertParam` names such a parameter, the
checkpoint names of its slices (from the model's own loading conversions, e.g. Qwen3-MoE
`experts.{E}.gate_proj` + `up_proj`, Mixtral `experts.{E}.w1` + `w3`), and `ExpertInputs` hands each
expert's inputs, as the model's own eager loop computes them, to a callback. The layer's output is
the model's: its experts run their own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gptq_fsdp import compat

FUSED = ("gate_up_proj", "down_proj")  # the fused projections, in the order an expert runs them


@dataclass(frozen=True, eq=False)
class ExpertParam:
    """One fused projection of a layer's experts: GPTQ runs on `weight[e]` for each expert e, whose
    rows are `members` (checkpoint leaf names, `rows` each) stacked."""

    module_name: str  # the experts module, "model.layers.1.mlp.experts"
    module: nn.Module
    param_name: str  # "gate_up_proj" or "down_proj"
    num_experts: int
    members: tuple[str, ...]  # ("gate_proj", "up_proj"), ("w1", "w3"), ("down_proj",), ...
    rows: int  # rows of each member
    columns: int

    @property
    def weight(self) -> torch.Tensor:
        """The fused parameter as the module holds it now (whole inside a layer's unsharded forwards)."""
        return getattr(self.module, self.param_name)

    def names(self, expert: int) -> list[str]:
        """The module names expert `expert`'s slice is saved under (in the model's in-memory layout)."""
        return [f"{self.module_name}.{expert}.{member}" for member in self.members]

    def label(self, expert: int | str) -> str:
        """'...experts.3.gate_proj+up_proj'; label('*') names all the experts' slices."""
        return f"{self.module_name}.{expert}.{'+'.join(self.members)}"


def expert_params(model: nn.Module, layer: nn.Module, prefix: str) -> list[ExpertParam]:
    """The fused expert projections of one decoder layer (`prefix`: its name with a trailing dot)
    that GPTQ can quantize: [gate; up] concatenated, not transposed, no bias, with checkpoint names
    that the model's loading conversions give (others stay unquantized, named by the warning)."""
    members = _member_names(model)
    found = []
    for name, module in layer.named_modules():
        if not (getattr(module, "is_concatenated", False) and not getattr(module, "is_transposed", True)):
            continue
        if getattr(module, "has_bias", True):
            continue
        for param_name in FUSED:
            param = getattr(module, param_name, None)
            leaves = members.get(param_name)
            if param is None or len(compat.whole_shape(param)) != 3 or leaves is None:
                continue
            experts, rows, columns = (int(n) for n in compat.whole_shape(param))
            if rows % len(leaves):
                continue
            found.append(
                ExpertParam(f"{prefix}{name}", module, param_name, experts, leaves, rows // len(leaves), columns)
            )
    return found


def _member_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Fused parameter -> the per-expert leaf names its checkpoint stores, from the loading
    converters: source `mlp.experts.*.gate_proj.weight` + `...up_proj.weight` -> `gate_up_proj`."""
    names = {}
    for target, sources in compat.expert_converters(model):
        param_name = target.rsplit(".", 1)[-1]
        leaves = tuple(s.split("*.", 1)[1].removesuffix(".weight") for s in sources)
        if param_name in FUSED and all(leaves):
            names[param_name] = leaves
    return names


class _ExpertLinears(TorchFunctionMode):
    """Sees every `F.linear` while the experts module runs: a call on `param[e]` of one of its fused
    parameters is expert e's projection, and its input (without padding tokens) goes to `on_input`.

    `kept` marks the tokens of the call that are not padding (None: all). The eager loop gathers
    expert e's tokens as `torch.where` orders them in the one-hot routing mask ([top-k, tokens]:
    by top-k slot, then token), so row i of its input is the token `torch.where` gives i-th."""

    def __init__(
        self, params: list[ExpertParam], on_input: Callable[[ExpertParam, int, torch.Tensor], None],
        top_k_index: torch.Tensor, kept: torch.Tensor | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.params, self.on_input = params, on_input
        self.top_k_index, self.kept = top_k_index, kept

    def _without_padding(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.kept is None:
            return x
        _, tokens = torch.where(self.top_k_index.T == expert)
        if tokens.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"expert {expert} got {x.shape[0]} rows for {tokens.shape[0]} routed tokens: this experts "
                "module does not gather its tokens as transformers' eager loop does, so padding cannot be left out"
            )
        return x[self.kept.to(x.device)[tokens]]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            for param in self.params:
                expert = _slice_of(param.weight, weight)
                if expert is not None:
                    self.on_input(param, expert, self._without_padding(expert, x))
                    break
        return func(*args, **kwargs)


def _slice_of(fused: torch.Tensor, weight: torch.Tensor) -> int | None:
    """e if `weight` is the view `fused[e]`, else None."""
    if weight.dim() != 2 or weight.shape != fused.shape[1:] or weight.stride() != fused.stride()[1:]:
        return None
    if weight.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr():
        return None
    offset = weight.storage_offset() - fused.storage_offset()
    return offset // fused.stride(0) if offset % fused.stride(0) == 0 else None


def local_experts(params: list[ExpertParam], local: dict[str, torch.Tensor]) -> list[ExpertParam]:
    """`params` (the fused projections of one experts module) on a shallow copy of that module that
    holds only `local[param_name]`, the slice of the experts one rank stores (views of its shards):
    its forward runs those experts, numbered from 0, and none of the module's hooks (`run_experts`
    calls `forward` itself)."""
    view = compat.unwrapped_copy(params[0].module, local)
    count = next(iter(local.values())).shape[0]
    view.__dict__["num_experts"] = count  # the eager loop's one-hot width
    return [ExpertParam(p.module_name, view, p.param_name, count, p.members, p.rows, p.columns) for p in params]


def run_experts(
    params: list[ExpertParam], hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    on_input: Callable[[ExpertParam, int, torch.Tensor], None] | None = None, kept: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The experts module of `params` run as the model runs it, eager per-expert loop, outside its
    hooks; with `on_input`, every expert projection's input rows (those `kept` marks) go to it."""
    module = params[0].module
    with compat.eager_experts(module), compat.plain_linear():
        if on_input is None:
            return module.forward(hidden_states, top_k_index, top_k_weights)
        with _ExpertLinears(params, on_input, top_k_index, kept):
            return module.forward(hidden_states, top_k_index, top_k_weights)


# Experts per synthetic routing in all-tokens calibration: the eager loop's one-hot mask is
# [tokens, chunk, E], so chunks bound it for models with hundreds of experts.
ALL_TOKENS_CHUNK = 8


@contextmanager
def expert_inputs(
    params: list[ExpertParam],
    on_input: Callable[[ExpertParam, int | None, torch.Tensor], None],
    kept_tokens: Callable[[], torch.Tensor | None] = lambda: None,
    all_tokens: bool = False,
) -> Iterator[None]:
    """While inside, each experts module of `params` runs its eager per-expert loop (the one that
    calls F.linear on each expert's slice; `grouped_mm`/`bmm` would hide them, and so would
    DeepSpeed's replacement of F.linear, put aside meanwhile) and every expert's
    projection input goes to `on_input(param, expert, rows)`, without the tokens that
    `kept_tokens()` (flat, over the forward's batch) marks as padding.

    With `all_tokens`, every expert sees every token: the module's input goes once to
    `on_input(param, None, rows)` for its first projection (gate/up: the same rows for every expert),
    then the module's own loop runs each expert on all tokens (routing every token to every expert,
    in chunks of experts, weights 0) for the later projections' inputs, and the output returned is the
    module's on the model's routing, seen by no one.

    The modules are called as transformers' experts are: (hidden_states [tokens, hidden],
    top_k_index [tokens, k], top_k_weights)."""
    modules = {id(p.module): p.module for p in params}
    saved = []
    for module in modules.values():
        mine = [p for p in params if p.module is module]

        def forward(hidden_states, top_k_index, top_k_weights, _original=module.forward, _mine=mine, _module=module):
            kept = kept_tokens()
            with compat.eager_experts(_module), compat.plain_linear():
                if not all_tokens:
                    with _ExpertLinears(_mine, on_input, top_k_index, kept):
                        return _original(hidden_states, top_k_index, top_k_weights)
                _through_every_expert(_original, _mine, on_input, hidden_states, top_k_weights.dtype, kept)
                return _original(hidden_states, top_k_index, top_k_weights)

        module.forward = forward
        saved.append(module)
    try:
        yield
    finally:
        for module in saved:
            del module.forward  # the class's forward again


def _through_every_expert(forward, params: list[ExpertParam], on_input, hidden_states, dtype, kept) -> None:
    """All-tokens calibration: the first projection's input (the module's, the same for every expert)
    once, then every token through every expert for the inputs of the others."""
    first = [p for p in params if p.param_name == FUSED[0]]
    for param in first:
        on_input(param, None, hidden_states if kept is None else hidden_states[kept.to(hidden_states.device)])
    later = [p for p in params if p.param_name != FUSED[0]]
    if not later:
        return
    tokens, experts = hidden_states.shape[0], params[0].num_experts
    for start in range(0, experts, ALL_TOKENS_CHUNK):
        chosen = torch.arange(start, min(start + ALL_TOKENS_CHUNK, experts), device=hidden_states.device)
        index = chosen.expand(tokens, -1)
        with _ExpertLinears(later, on_input, index, kept):
            forward(hidden_states, index, torch.zeros(index.shape, dtype=dtype, device=hidden_states.device))
