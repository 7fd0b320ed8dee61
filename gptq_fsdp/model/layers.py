"""What to quantize in a model: its decoder layers, the target Linears in each, and the matrices
that no target covers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from compressed_tensors.utils import match_named_modules
from compressed_tensors.utils.match import match_name
from torch import nn

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.scheme import GPTQError, validate_args
from gptq_fsdp.model.experts import ExpertParam, expert_params

logger = logging.getLogger(__name__)


def _class_names(module: nn.Module) -> set[str]:
    """Names of the module's classes, so FSDP2's `FSDPLlamaDecoderLayer` still counts as a `LlamaDecoderLayer`."""
    return {cls.__name__ for cls in type(module).__mro__}


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the longest ModuleList of a `_no_split_modules` class."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _class_names(module[0]) & no_split
    ]
    if not candidates:
        raise GPTQError(
            f"no decoder layers found in {type(model).__name__}: "
            f"no ModuleList holds a class of its _no_split_modules {sorted(no_split)}"
        )
    return max(candidates, key=lambda c: len(c[1]))


def target_modules(model: nn.Module, config: GPTQConfig) -> list[dict[str, nn.Linear]]:
    """Target Linears per decoder layer (full module names), validated before any expensive work."""
    layers_name, layers = find_decoder_layers(model)
    per_layer: list[dict[str, nn.Linear]] = [{} for _ in layers]
    prefix = f"{layers_name}."
    gates = set(routers(model))
    matched = [(n, m) for n, m in match_named_modules(model, config.targets, config.ignore) if n not in gates]
    if not matched:
        raise GPTQError(
            f"targets {config.targets} (ignoring {config.ignore}) match no module of {type(model).__name__}"
        )
    for name, module in matched:
        if not isinstance(module, nn.Linear):
            raise GPTQError(
                f"{name}: only nn.Linear can be quantized, the targets also match a {type(module).__name__}"
            )
        index = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else ""
        if not index.isdigit():
            raise GPTQError(f"{name}: target outside the decoder layers ({layers_name}); add it to ignore")
        validate_args(config.weights, module.in_features, name)
        per_layer[int(index)][name] = module
    return per_layer


def target_experts(model: nn.Module, config: GPTQConfig) -> list[list[ExpertParam]]:
    """The fused MoE expert projections GPTQ quantizes, per decoder layer: every one `expert_params`
    finds, unless `config.ignore` names its experts module. They are targets under the "Linear"
    target (each expert is Linears in the checkpoint's layout, as compressed-tensors matches it) or a
    "re:" target matching the names their slices are saved under."""
    layers_name, layers = find_decoder_layers(model)
    per_layer = []
    for index, layer in enumerate(layers):
        kept = []
        for param in expert_params(model, layer, f"{layers_name}.{index}."):
            names = param.names(0)
            if any(match_name(param.module_name, ignored) for ignored in config.ignore):
                continue
            if not any(t == "Linear" or (t.startswith("re:") and match_name(names[0], t)) for t in config.targets):
                continue
            validate_args(config.weights, param.columns, param.label(0))
            kept.append(param)
        per_layer.append(kept)
    if not config.weights.symmetric and any(per_layer):
        raise GPTQError(
            "asymmetric MoE experts: transformers 5.24 cannot load per-expert weights with zero points (its "
            "conversion of them into the fused experts fails), so such a checkpoint would not reload; quantize "
            "symmetric, or ignore the experts modules (e.g. --ignore lm_head 're:.*experts$')"
        )
    if config.true_sequential and any(per_layer):
        raise GPTQError(
            "--true-sequential does not quantize fused MoE experts yet: use the standard order, or ignore the "
            f"experts modules (e.g. {per_layer[next(i for i, p in enumerate(per_layer) if p)][0].module_name})"
        )
    return per_layer


def uncovered_matrices(
    layer: nn.Module, covered: set[str], shape_of: Callable[[torch.Tensor], torch.Size] = lambda p: p.shape
) -> list[tuple[str, torch.Size]]:
    """The layer's matrix parameters (2-D and up; whole shapes by `shape_of`) that are not in
    `covered` and lie inside none of its modules (layer-relative names: the targets, the quantized
    fused expert parameters, the ignored modules and the routers): they stay as they are."""

    def inside_covered(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in covered for i in range(1, len(parts) + 1))

    return [
        (name, shape_of(p))
        for name, p in layer.named_parameters()
        if len(shape_of(p)) >= 2 and not inside_covered(name)
    ]


def routers(model: nn.Module) -> list[str]:
    """Full names of the MoE routers, left in full precision: transformers' `...TopKRouter` modules, and
    Linears of one output (Qwen2-MoE's `shared_expert_gate`, a per-token scalar gate that vLLM loads
    unquantized; no GPTQ target has a single row)."""
    return [
        name
        for name, module in model.named_modules()
        if any("Router" in c for c in _class_names(module))
        or (isinstance(module, nn.Linear) and module.out_features == 1)
    ]


def ignored_modules(model: nn.Module, config: GPTQConfig) -> set[str]:
    """Full names of the modules `config.ignore` matches (of any class)."""
    return {name for name, _ in match_named_modules(model, config.ignore)} if config.ignore else set()


def warn_uncovered(
    model: nn.Module,
    per_layer: list[dict[str, nn.Linear]],
    experts: list[list[ExpertParam]],
    config: GPTQConfig,
    shape_of: Callable[[torch.Tensor], torch.Size],
) -> None:
    """Warn when matrices inside the decoder layers would silently stay in full precision (whole
    shapes by `shape_of`: a sharded parameter's own shape may be its local piece)."""
    layers_name, layers = find_decoder_layers(model)
    ignored = {*ignored_modules(model, config), *routers(model)}
    ignored |= {f"{p.module_name}.{p.param_name}" for layer in experts for p in layer}
    uncovered: dict[str, torch.Size] = {}  # layer-relative name: shape in the first layer that has it
    total = left = 0
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}."
        covered = {n[len(prefix) :] for n in (*per_layer[index], *ignored) if n.startswith(prefix)}
        total += sum(shape_of(p).numel() for p in layer.parameters())
        for name, shape in uncovered_matrices(layer, covered, shape_of):
            uncovered.setdefault(name, shape)
            left += shape.numel()
    if uncovered:
        listed = ", ".join(f"{name} {list(shape)}" for name, shape in uncovered.items())
        logger.warning(
            "%.0f%% of the decoder layers' parameters stay unquantized: no target covers %s.%s "
            "Add their modules to the ignored ones to silence this.",
            100 * left / total,
            listed,
            " Fused 3-D MoE experts are quantized when their module gathers [gate; up] rows without a bias "
            "(transformers' Qwen3-MoE / Mixtral / DeepSeek-V3 layout) and the model's loading conversions name "
            "their per-expert tensors."
            if any(len(shape) > 2 for shape in uncovered.values())
            else "",
        )
