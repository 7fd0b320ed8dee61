"""The sequential GPTQ loop: one decoder layer at a time, calibration inputs carried forward.

Per layer: hooks on, forward every calibration batch (accumulating Hessians), GPTQ every Hessian
group, write the quantized-dequantized weights back, forward again to make the next layer's inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from compressed_tensors.utils import match_named_modules
from torch import nn
from tqdm.auto import tqdm

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.data import CalibrationSet
from gptq_fsdp.gptq import GPTQError, GPTQResult, gptq_quantize, validate_args
from gptq_fsdp.hessian import HessianHooks

logger = logging.getLogger(__name__)


PHASES = ("capture", "forward", "hessian", "gptq", "propagate")


@dataclass
class ModuleRecord:
    """What GPTQ produced for one Linear; `scale`/`zero_point`/`g_idx` feed the checkpoint."""

    name: str
    layer: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor | None
    loss: float
    seconds: float  # GPTQ time of its Hessian group (shared by the group's members)
    damping: float
    group: list[str]


@dataclass
class QuantizationResult:
    config: GPTQConfig
    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    seconds: float = 0.0
    # Wall time per phase: capture, calibration forward, XᵀX (inside the forward), GPTQ, propagation.
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def table(self) -> str:
        """Per-module loss and time, one line each."""
        width = max([len(n) for n in self.modules] + [6])
        lines = [f"{'module':<{width}}  {'layer':>5}  {'loss':>12}  {'damp':>6}  {'gptq s':>7}"]
        for r in self.modules.values():
            lines.append(f"{r.name:<{width}}  {r.layer:>5}  {r.loss:>12.5g}  {r.damping:>6.3g}  {r.seconds:>7.3f}")
        lines.append(
            f"total wall time {self.seconds:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        )
        return "\n".join(lines)


class _StopForward(Exception):
    pass


class _InputRecorder(nn.Module):
    """Stands in for a decoder layer: records its call and passes hidden states through unchanged."""

    def __init__(self, store: list, is_last: bool) -> None:
        super().__init__()
        self.store, self.is_last = store, is_last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.store.append((args[1:], kwargs))
        if self.is_last:
            raise _StopForward
        return hidden


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers: the longest ModuleList of a `_no_split_modules` class."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and type(module[0]).__name__ in no_split
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
    matched = list(match_named_modules(model, config.targets, config.ignore))
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


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """First-layer hidden states per batch, and every layer's other call arguments per batch.

    Each layer is swapped for a recorder, so the model runs only its embeddings; per-layer arguments
    matter because some families give layers different masks/rotary tables (e.g. sliding windows).
    """
    calls: list[list] = [[] for _ in layers]
    originals = list(layers)
    hidden: list[torch.Tensor] = []

    def keep_hidden(module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])

    for i in range(len(layers)):
        layers[i] = _InputRecorder(calls[i], is_last=i == len(layers) - 1)
    handle = layers[0].register_forward_pre_hook(keep_hidden, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for input_ids, attention_mask in batches:
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    per_layer_calls = [[(args, kwargs) for args, kwargs in layer_calls] for layer_calls in calls]
    return hidden, per_layer_calls


def _quantize_group(
    names: list[str], modules: dict[str, nn.Linear], hessian: torch.Tensor, config: GPTQConfig
) -> tuple[GPTQResult, float]:
    """GPTQ on the rows of every module of one Hessian group at once (GPTQ is row-separable)."""
    start = time.perf_counter()
    weight = torch.cat([modules[n].weight for n in names]) if len(names) > 1 else modules[names[0]].weight
    result = gptq_quantize(
        weight,
        hessian,
        config.weights,
        dampening_frac=config.dampening_frac,
        block_size=config.block_size,
        name=", ".join(names),
    )
    return result, time.perf_counter() - start


@torch.no_grad()
def quantize_model(model: nn.Module, calibration: CalibrationSet, config: GPTQConfig) -> QuantizationResult:
    """Quantize `model` in place with GPTQ, layer by layer, and return what the checkpoint needs."""
    start = time.perf_counter()
    per_layer = target_modules(model, config)
    _, layers = find_decoder_layers(model)
    indices = list(range(len(calibration)))
    batches = [calibration.batch(indices[i : i + config.batch_size]) for i in range(0, len(indices), config.batch_size)]
    masks = [mask for _, mask in batches]
    result = QuantizationResult(config)

    was_training = model.training
    model.eval()
    clock = time.perf_counter()
    hidden, layer_calls = capture_layer_inputs(model, layers, batches)
    result.phases["capture"] += time.perf_counter() - clock
    progress = tqdm(total=len(layers), desc="GPTQ layers", unit="layer")
    for index, layer in enumerate(layers):
        modules = per_layer[index]
        device = next(layer.parameters()).device
        hooks = HessianHooks(modules)
        clock = time.perf_counter()
        with hooks.attached():
            for x, mask, (args, kwargs) in zip(hidden, masks, layer_calls[index], strict=True):
                hooks.start_forward(mask)
                layer(x.to(device), *args, **kwargs)
        result.phases["forward"] += time.perf_counter() - clock - hooks.seconds
        result.phases["hessian"] += hooks.seconds
        for group in hooks.groups:
            hessian = group.hessian()
            group.release()
            gptq, seconds = _quantize_group(group.names, modules, hessian, config)
            result.phases["gptq"] += seconds
            del hessian
            row = 0
            for name in group.names:
                weight = modules[name].weight
                rows = slice(row, row + weight.shape[0])
                row += weight.shape[0]
                weight.copy_(gptq.weight[rows])
                result.modules[name] = ModuleRecord(
                    name=name,
                    layer=index,
                    scale=gptq.scale[rows],
                    zero_point=gptq.zero_point[rows],
                    g_idx=gptq.g_idx,
                    loss=float(gptq.row_losses[rows].sum()),
                    seconds=seconds,
                    damping=gptq.damping,
                    group=list(group.names),
                )
        clock = time.perf_counter()
        hidden = [
            _layer_output(layer(x.to(device), *args, **kwargs))
            for x, (args, kwargs) in zip(hidden, layer_calls[index], strict=True)
        ]
        layer_calls[index] = []
        result.phases["propagate"] += time.perf_counter() - clock
        loss = sum(result.modules[n].loss for n in modules)
        progress.set_postfix(loss=f"{loss:.4g}")
        progress.update()
    progress.close()
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result
