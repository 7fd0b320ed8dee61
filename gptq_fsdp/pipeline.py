"""The sequential GPTQ loop: one decoder layer at a time, calibration inputs carried forward.

Per layer: hooks on, forward every calibration batch (accumulating Hessians), GPTQ every Hessian
group, write the quantized-dequantized weights back, forward again to make the next layer's inputs.
With `true_sequential`, one forward per layer instead: each Linear is quantized inside it, right
before it runs, from inputs the Linears before it produced already quantized.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import greenlet
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.utils import match_named_modules
from torch import nn
from tqdm.auto import tqdm

from gptq_fsdp import faults
from gptq_fsdp.backends import Backend, detect_backend, unwrap_engine
from gptq_fsdp.comm import Pending
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.data import CalibrationSet, rank_batches
from gptq_fsdp.gptq import (
    GPTQError,
    GPTQResult,
    dequantize,
    float32_matmul_precision,
    gptq_quantize,
    validate_args,
)
from gptq_fsdp.hessian import HessianGroup, HessianHooks, hessian_from_sum
from gptq_fsdp.resume import LayerState, run_identity
from gptq_fsdp.schedule import assign_owners, packing_cost

logger = logging.getLogger(__name__)


PHASES = ("capture", "forward", "hessian", "wait", "gptq", "propagate")


@dataclass
class ModuleRecord:
    """What GPTQ produced for one Linear. `packed` (the checkpoint tensors) lives on its owner only."""

    name: str
    layer: int
    owner: int
    loss: float
    seconds: float  # GPTQ time of its Hessian group (shared by the group's members)
    damping: float
    group: list[str]
    packed: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class MemoryStats:
    """Bytes this rank held, measured from the tensors themselves (parameters and GPTQ inputs)."""

    shard_bytes: int = 0  # this rank's parameter storage at rest
    layer_unsharded_bytes: int = 0  # largest whole-layer copy made for a forward (0 when nothing is copied)
    owned_weight_bytes: int = 0  # most bytes of gathered weight copies held at once for GPTQ
    hessian_bytes: int = 0  # most bytes of Hessian sums held at once
    activation_bytes: int = 0  # calibration hidden states on the compute device while a layer runs
    peak_rss_bytes: int = 0  # process peak resident set size

    @property
    def parameter_peak_bytes(self) -> int:
        return self.shard_bytes + self.layer_unsharded_bytes + self.owned_weight_bytes


@dataclass
class QuantizationResult:
    config: GPTQConfig
    backend: Backend
    quantized: list[str] = field(default_factory=list)  # every quantized Linear, on every rank
    modules: dict[str, ModuleRecord] = field(default_factory=dict)  # this rank's; all of them on rank 0 at the end
    seconds: float = 0.0
    # Wall time per phase: capture, calibration forward, XᵀX (inside the forward), waiting for
    # collectives, GPTQ, propagation forward.
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    timeline: list[dict] = field(default_factory=list)  # this rank's (layer, group, event, start, end)
    memory: MemoryStats = field(default_factory=MemoryStats)
    memory_per_rank: list[MemoryStats] = field(default_factory=list)  # on rank 0
    state: LayerState | None = None  # per-layer resume state, cleared once the checkpoint is saved

    def memory_report(self) -> str:
        mib = 2**20
        lines = [
            "rank  shards MiB  +layer MiB  +owned W MiB  = params peak MiB  Hessians MiB  activations MiB  peak RSS MiB"
        ]
        for rank, m in enumerate(self.memory_per_rank or [self.memory]):
            lines.append(
                f"{rank:>4}  {m.shard_bytes / mib:>10.1f}  {m.layer_unsharded_bytes / mib:>10.1f}  "
                f"{m.owned_weight_bytes / mib:>12.1f}  {m.parameter_peak_bytes / mib:>16.1f}  "
                f"{m.hessian_bytes / mib:>12.1f}  {m.activation_bytes / mib:>15.1f}  {m.peak_rss_bytes / mib:>12.1f}"
            )
        return "\n".join(lines)

    def table(self) -> str:
        """Per-module loss and time, one line each."""
        width = max([len(n) for n in self.modules] + [6])
        lines = [f"{'module':<{width}}  {'layer':>5}  {'owner':>5}  {'loss':>12}  {'damp':>6}  {'gptq s':>7}"]
        for r in sorted(self.modules.values(), key=lambda r: self.quantized.index(r.name)):
            lines.append(
                f"{r.name:<{width}}  {r.layer:>5}  {r.owner:>5}  {r.loss:>12.5g}  {r.damping:>6.3g}  {r.seconds:>7.3f}"
            )
        lines.append(
            f"total wall time {self.seconds:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        )
        return "\n".join(lines)


class LayerError(RuntimeError):
    """Quantizing a decoder layer failed; the message names the rank and the layer."""


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


def uncovered_matrices(
    layer: nn.Module, covered: set[str], shape_of: Callable[[torch.Tensor], torch.Size] = lambda p: p.shape
) -> list[tuple[str, torch.Size]]:
    """The layer's matrix parameters (2-D and up; whole shapes by `shape_of`) inside none of the
    `covered` modules (layer-relative names: the targets and the ignored): they stay as they are.
    In transformers 5.x, MoE experts are such 3-D parameters, and routers such 2-D ones."""

    def inside_covered(name: str) -> bool:
        parts = name.split(".")[:-1]
        return any(".".join(parts[:i]) in covered for i in range(1, len(parts) + 1))

    return [
        (name, shape_of(p))
        for name, p in layer.named_parameters()
        if len(shape_of(p)) >= 2 and not inside_covered(name)
    ]


def ignored_modules(model: nn.Module, config: GPTQConfig) -> set[str]:
    """Full names of the modules `config.ignore` matches (of any class)."""
    return {name for name, _ in match_named_modules(model, config.ignore)} if config.ignore else set()


def _warn_uncovered(
    model: nn.Module,
    layers_name: str,
    layers: nn.ModuleList,
    per_layer: list[dict[str, nn.Linear]],
    config: GPTQConfig,
    backend: Backend,
) -> None:
    """Warn when matrices inside the decoder layers would silently stay in full precision."""
    ignored = ignored_modules(model, config)
    uncovered: dict[str, torch.Size] = {}  # layer-relative name: shape in the first layer that has it
    total = left = 0
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}."
        covered = {n[len(prefix) :] for n in (*per_layer[index], *ignored) if n.startswith(prefix)}
        total += sum(backend.weight_shape(p).numel() for p in layer.parameters())
        for name, shape in uncovered_matrices(layer, covered, backend.weight_shape):
            uncovered.setdefault(name, shape)
            left += shape.numel()
    if uncovered:
        listed = ", ".join(f"{name} {list(shape)}" for name, shape in uncovered.items())
        logger.warning(
            "%.0f%% of the decoder layers' parameters stay unquantized: no nn.Linear target covers %s.%s "
            "Add their modules to the ignored ones to silence this.",
            100 * left / total,
            listed,
            " In transformers 5.x MoE experts are fused 3-D parameters, not nn.Linear."
            if any(len(shape) > 2 for shape in uncovered.values())
            else "",
        )


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ActivationStore:
    """Where the calibration hidden states wait between layers.

    In place (default) they stay on the compute device: the rank's whole calibration slice, twice
    while a layer maps inputs to outputs. Offloaded they wait in CPU memory (pinned on an
    accelerator): each batch is copied to the device just before its forward and its output copied
    back right after (non-blocking; one sync per layer), so the device holds one batch in and one out.
    """

    def __init__(self, device: torch.device, offload: bool) -> None:
        self.device, self.offload = device, offload
        self._pinned = offload and device.type != "cpu"

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return x
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self._pinned)
        return host.copy_(x, non_blocking=self._pinned)

    def fetch(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=self._pinned)

    def settle(self) -> None:
        """Wait for the non-blocking copies to host, so the stored tensors may be read there."""
        if self._pinned:
            torch.accelerator.synchronize(self.device)

    def device_bytes(self, hidden: list[torch.Tensor]) -> int:
        """Bytes of calibration activations on the device while a layer maps inputs to outputs."""
        sizes = [x.numel() * x.element_size() for x in hidden]
        return 2 * (max(sizes, default=0) if self.offload else sum(sizes))


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


class _Clock:
    """Adds wall time to a phase and, when asked, logs the interval on the timeline."""

    def __init__(self, result: QuantizationResult, start: float) -> None:
        self.result, self.start = result, start

    @contextmanager
    def __call__(self, phase: str, **event):
        begin = time.perf_counter()
        yield
        end = time.perf_counter()
        self.result.phases[phase] += end - begin
        if event:
            self.result.timeline.append({**event, "event": phase, "start": begin - self.start, "end": end - self.start})


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration: CalibrationSet,
    config: GPTQConfig,
    backend: Backend | None = None,
    *,
    state_dir: str | Path | None = None,
    resume: bool = False,
) -> QuantizationResult:
    """Quantize `model` in place with GPTQ, layer by layer, and return what the checkpoint needs.

    Under a sharded backend every rank calls this with the same `calibration`; each rank runs its own
    slice of it, Hessians are summed on each group's owner, the owner runs GPTQ and every rank's
    shard receives the quantized-dequantized weight. With `state_dir`, each rank records its state
    after every layer; `resume=True` continues from the last layer all ranks recorded.
    """
    start = time.perf_counter()
    model = unwrap_engine(model)
    backend = backend or detect_backend(model)
    rank, world = backend.rank, backend.world_size
    per_layer = target_modules(model, config)
    layers_name, layers = find_decoder_layers(model)
    if rank == 0:
        _warn_uncovered(model, layers_name, layers, per_layer, config, backend)
    batches = [calibration.batch(b) for b in rank_batches(len(calibration), rank, world, config.batch_size)]
    masks = [mask for _, mask in batches]
    result = QuantizationResult(config, backend, quantized=[n for modules in per_layer for n in modules])
    clock = _Clock(result, start)

    was_training = model.training
    model.eval()
    backend.prepare(model)
    weights = check_weights(model, backend)
    if state_dir is not None:
        result.state = LayerState(
            state_dir, backend, run_identity(config, calibration, world, result.quantized, weights)
        )
        result.state.check() if resume else result.state.start_over()
    memory = result.memory
    memory.shard_bytes = sum(backend.local_part(p).numel() * p.element_size() for p in model.parameters())
    with float32_matmul_precision(config.matmul_precision):
        with clock("capture"):
            hidden, layer_calls = capture_layer_inputs(model, layers, batches)
            backend.reshard(model)
            store = ActivationStore(hidden[0].device, config.offload_activations)
            hidden = [store.keep(x) for x in hidden]
            store.settle()
            memory.activation_bytes = store.device_bytes(hidden)
        progress = tqdm(total=len(layers), desc="GPTQ layers", unit="layer", disable=rank != 0)
        units_of: dict[tuple, list[tuple[str, ...]]] = {}  # true-sequential: GPTQ units per kind of layer
        first = 0
        if result.state is not None and resume:
            first, hidden = _resume(result, per_layer, layers, hidden, layer_calls, store, clock)
            progress.update(first)
        for index, layer in enumerate(layers):
            if index < first:
                layer_calls[index] = []
                continue
            faults.at_layer(rank, index, hidden)
            try:
                if config.true_sequential:
                    hidden = _run_layer_true_sequential(
                        index, layer, per_layer[index], hidden, masks, layer_calls[index], config, result, store,
                        clock, f"{layers_name}.{index}.", units_of,
                    )  # fmt: skip
                else:
                    hidden = _run_layer(
                        index, layer, per_layer[index], hidden, masks, layer_calls[index], config, result, store,
                        clock, propagate=index < len(layers) - 1,
                    )  # fmt: skip
            except Exception as error:
                raise LayerError(f"rank {rank} failed at layer {index} ({type(error).__name__}): {error}") from error
            layer_calls[index] = []
            if result.state is not None:
                owned = {n: result.modules[n] for n in per_layer[index] if n in result.modules}
                result.state.save(index, {n: r for n, r in owned.items() if r.owner == rank})
            if world == 1:  # with several ranks each one only knows the losses of the groups it owns
                progress.set_postfix(loss=f"{sum(result.modules[n].loss for n in per_layer[index]):.4g}")
            progress.update()
        progress.close()
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    memory.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Rank 0 gets every record's summary (not the packed tensors) and every rank's memory.
    summaries = backend.gather_objects(([replace(r, packed={}) for r in result.modules.values()], memory))
    if summaries is not None:
        result.memory_per_rank = [m for _, m in summaries]
        result.modules.update({r.name: r for records, _ in summaries for r in records if r.name not in result.modules})
    return result


def check_weights(model: nn.Module, backend: Backend) -> str:
    """Refuse a model with NaN or inf weights, naming the parameters, before any forward; return a
    digest of every parameter's float64 sum and absolute sum over all shards, with its dtype, the
    same on every rank (resume state records it). One pass over the weights, no copy of them; a
    float64 sum of finite 16/32-bit values cannot overflow, so a non-finite sum means a non-finite value."""
    names = [name for name, _ in model.named_parameters()]
    per_param = [
        torch.stack([part.sum(dtype=torch.float64), torch.linalg.vector_norm(part, 1, dtype=torch.float64)])
        for part in (backend.local_part(p) for _, p in model.named_parameters())
    ]
    sums = torch.stack([s.to(per_param[0].device) for s in per_param]).cpu()  # one host sync
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    every_rank = backend.gather_all(sums.tolist())
    broken = [
        name for i, name in enumerate(names) if not all(torch.isfinite(torch.tensor(r[i])).all() for r in every_rank)
    ]
    if broken:
        listed = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise GPTQError(f"the model's weights hold NaN or inf values in {len(broken)} parameter(s): {listed}")
    return hashlib.sha256(repr((dtypes, every_rank)).encode()).hexdigest()[:16] + f" ({', '.join(dtypes)})"


def _resume(
    result: QuantizationResult,
    per_layer: list[dict[str, nn.Linear]],
    layers: nn.ModuleList,
    hidden: list[torch.Tensor],
    layer_calls: list[list[tuple[tuple, dict]]],
    store: ActivationStore,
    clock: _Clock,
) -> tuple[int, list[torch.Tensor]]:
    """Restore the layers every rank recorded; the first layer to quantize and its inputs."""
    assert result.state is not None
    finished, records = result.state.load()
    if finished < 0:
        return 0, hidden
    all_modules = {name: module for modules in per_layer for name, module in modules.items()}
    result.state.restore_weights(records, all_modules, result.config.scheme)
    result.modules.update(records)
    logger.info("resuming after layer %d", finished)
    for index in range(finished + 1):  # recompute the inputs of the first unfinished layer
        hidden = _propagate(layers[index], hidden, layer_calls[index], store, result.backend, clock)
        layer_calls[index] = []
    return finished + 1, hidden


def _propagate(
    layer: nn.Module,
    hidden: list[torch.Tensor],
    calls: list[tuple[tuple, dict]],
    store: ActivationStore,
    backend: Backend,
    clock: _Clock,
) -> list[torch.Tensor]:
    """The layer's outputs for every batch: the next layer's inputs."""
    with clock("propagate"), backend.layer_unsharded(layer):
        outputs = [
            store.keep(_layer_output(layer(store.fetch(x), *args, **kwargs)))
            for x, (args, kwargs) in zip(hidden, calls, strict=True)
        ]
        store.settle()
    return outputs


def _run_layer(
    index: int,
    layer: nn.Module,
    modules: dict[str, nn.Linear],
    hidden: list[torch.Tensor],
    masks: list[torch.Tensor],
    calls: list[tuple[tuple, dict]],
    config: GPTQConfig,
    result: QuantizationResult,
    store: ActivationStore,
    clock: _Clock,
    propagate: bool = True,
) -> list[torch.Tensor]:
    """Calibrate, quantize and propagate one decoder layer; returns the next layer's inputs ([] when
    not `propagate`: the last layer's outputs are not needed)."""
    backend, memory = result.backend, result.memory
    hooks = HessianHooks(modules)
    measure = layer.register_forward_pre_hook(lambda m, a: _measure_layer(m, memory, backend))
    with clock("forward"), hooks.attached(), backend.layer_unsharded(layer):
        for x, mask, (args, kwargs) in zip(hidden, masks, calls, strict=True):
            with hooks.forward(mask):
                layer(store.fetch(x), *args, **kwargs)
    measure.remove()
    memory.hessian_bytes = max(memory.hessian_bytes, sum(g.nbytes for g in hooks.groups))
    result.phases["forward"] -= hooks.seconds
    result.phases["hessian"] += hooks.seconds
    _quantize_layer(index, hooks.groups, modules, config, backend, result, clock)
    if not propagate:
        return []
    return _propagate(layer, hidden, calls, store, backend, clock)


def _run_layer_true_sequential(
    index: int,
    layer: nn.Module,
    modules: dict[str, nn.Linear],
    hidden: list[torch.Tensor],
    masks: list[torch.Tensor],
    calls: list[tuple[tuple, dict]],
    config: GPTQConfig,
    result: QuantizationResult,
    store: ActivationStore,
    clock: _Clock,
    prefix: str,
    units_of: dict[tuple, list[tuple[str, ...]]],
) -> list[torch.Tensor]:
    """One forward of the layer per batch, quantizing each Linear right before it runs.

    A Linear's Hessian is summed from the inputs it gets in these forwards, which the Linears before
    it produced already quantized (GPTQ's "true sequential"); the forwards' outputs are therefore the
    next layer's inputs, with no second pass. Every batch's forward pauses before a Linear that is
    not quantized yet (`_PausableForwards`); once all of them wait there, its Hessian is complete and
    the Linear is quantized, then they go on. Linears that read one input share its XᵀX and, from the
    second layer of a kind on (`units_of` remembers the first one's groups), one GPTQ call. `prefix`
    is the layer's own name ("model.layers.3.").

    Every rank reaches the Linears in the same order, so the collectives line up: a Hessian sum is
    all-reduced, every rank runs GPTQ on its share of the unit's rows of the whole weights the
    forward holds and all-gathers the rest into its whole copy; the unit's owner packs it for the
    checkpoint (LPT over the layer's units by packing cost: here packing is all an owner does). Once
    the layer is sharded again each rank stores its own piece.
    """
    backend, memory, rank = result.backend, result.memory, result.backend.rank
    kind = (type(layer).__name__, tuple(n[len(prefix) :] for n in modules))
    units = [tuple(prefix + n for n in unit) for unit in units_of.get(kind, [])]
    units += [(n,) for n in modules if not any(n in unit for unit in units)]
    unit_of = {name: unit for unit in units for name in unit}
    shapes = [(sum(backend.weight_shape(modules[n].weight)[0] for n in u), modules[u[0]].in_features) for u in units]
    owner_of = dict(zip(units, assign_owners(shapes, backend.world_size, packing_cost).owners, strict=True))
    hooks = HessianHooks(modules, stop_early=False)
    summed: set[int] = set()  # Hessian groups whose sum every rank holds
    pieces: dict[str, torch.Tensor | None] = {}
    owned: list[tuple] = []  # _record's arguments for the units this rank packs

    def quantize(unit: tuple[str, ...]) -> None:
        group = hooks.group_of(unit[0])
        if id(group) not in summed:
            with clock("wait", layer=index, group=", ".join(unit), step="hessian"):
                backend.all_reduce(group.sum)
                group.tokens = backend.sum_ints([group.tokens])[0]
            summed.add(id(group))
        weights = [modules[n].weight.detach() for n in unit]  # whole: the layer is unsharded for these forwards
        rows = [w.shape[0] for w in weights]
        # GPTQ is separable by rows given H: each rank quantizes a share of them (the factorization of
        # H is repeated on every rank), then every rank gets all of them.
        split = backend.world_size > 1 and sum(rows) >= backend.world_size  # else every rank does all rows
        counts = _shares(sum(rows), backend.world_size)
        mine = slice(sum(counts[:rank]), sum(counts[: rank + 1])) if split else slice(None)
        with clock("gptq", layer=index, group=", ".join(unit)):
            start = time.perf_counter()
            stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
            part = gptq_quantize(
                stacked[mine],
                hessian_from_sum(group.sum, group.tokens, group.columns),
                config.weights,
                dampening_frac=config.dampening_frac,
                block_size=config.block_size,
                name=", ".join(unit),
                overwrite_hessian=True,
            )
            seconds = time.perf_counter() - start
        gptq = part
        if split:
            with clock("wait", layer=index, group=", ".join(unit), step="rows"):
                gptq = _all_gather_rows(part, counts, backend)
        if owner_of[unit] == rank:  # packs the unit's modules for the checkpoint, once the forwards are done
            owned.append((index, list(unit), rows, gptq, seconds, config, rank, result))
        for name, weight, full in zip(unit, weights, gptq.weight.split(rows), strict=True):
            weight.copy_(full)
            pieces[name] = backend.piece_of(modules[name].weight, weight)

    def forward(b: int) -> torch.Tensor:
        with hooks.forward(masks[b]):
            args, kwargs = calls[b]
            return store.keep(_layer_output(layer(store.fetch(hidden[b]), *args, **kwargs)))

    def pause_before(name: str) -> None:
        if unit_of[name][0] not in pieces:
            forwards.pause(unit_of[name])

    measure = layer.register_forward_pre_hook(lambda m, a: _measure_layer(m, memory, backend))
    with clock("forward"), hooks.attached(), backend.layer_unsharded(layer):
        # Registered after the Hessian hooks: a Linear's input is summed before the forward pauses.
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: pause_before(n)) for n, m in modules.items()]
        # All forwards also wait at the layer's end, before its other forward hooks: FSDP2's post-forward
        # of one batch may reshard the layer, which the others must not see mid-forward.
        handles.append(layer.register_forward_hook(lambda m, a, o: forwards.pause(_LAYER_END), prepend=True))
        forwards = _PausableForwards(len(hidden), forward)
        try:
            while waiting := forwards.run_all():
                if len(waiting) != 1:
                    raise RuntimeError(f"the forwards of one layer paused at different points: {sorted(waiting)}")
                point = waiting.pop()
                if point != _LAYER_END:
                    begin = time.perf_counter()
                    quantize(point)
                    result.phases["forward"] -= time.perf_counter() - begin
        finally:
            forwards.close()
            for handle in handles:
                handle.remove()
        store.settle()
    measure.remove()
    units_of.setdefault(kind, [tuple(n[len(prefix) :] for n in g.names) for g in hooks.groups])
    memory.hessian_bytes = max(memory.hessian_bytes, sum(g.nbytes for g in hooks.groups))
    for group in hooks.groups:
        group.release()
    for name, piece in pieces.items():
        backend.write_piece(modules[name].weight, piece)
    with clock("gptq"):  # off the path the other ranks wait on between units
        for record in owned:
            _record(*record)
    result.phases["forward"] -= hooks.seconds
    result.phases["hessian"] += hooks.seconds
    return forwards.outputs


_LAYER_END = ("<end of the layer's forward>",)


class _PausableForwards:
    """`forward(b)` for every batch b, each in a greenlet of its own, one running at a time.

    A forward that calls `pause(point)` stops there; `run_all()` lets every unfinished forward run
    until it pauses or ends and returns the points they wait at, so the caller can do what they wait
    for (quantize a Linear whose Hessian is now complete) and call `run_all()` again. Batches keep
    their own size, so the forwards run as fast as in the standard order, while every batch's
    activations stay alive until its forward ends. Greenlets, not threads: they share the caller's
    OS thread, so torch keeps one OpenMP pool (a thread per batch gives each its own, and with more
    pool threads than cores OpenMP stops spinning: GPTQ's small ops ran 2x slower on 2 cores).
    """

    def __init__(self, count: int, forward: Callable[[int], torch.Tensor]) -> None:
        self.outputs: list[torch.Tensor] = [torch.empty(0)] * count
        self._waiting: list = [None] * count
        self._finished = [False] * count
        self._caller = greenlet.getcurrent()
        self._forwards = [greenlet.greenlet(functools.partial(self._run, b, forward)) for b in range(count)]
        self._batch_of = {g: b for b, g in enumerate(self._forwards)}

    def _run(self, b: int, forward: Callable[[int], torch.Tensor]) -> None:
        self.outputs[b] = forward(b)
        self._finished[b] = True

    def pause(self, point) -> None:
        """Inside a forward: stop here until the caller's next `run_all()`."""
        b = self._batch_of[greenlet.getcurrent()]
        self._waiting[b] = point
        self._caller.switch()
        self._waiting[b] = None

    def run_all(self) -> set:
        """Run every unfinished forward until it pauses or ends (its errors are raised here); the
        points the paused ones wait at."""
        for b, forward in enumerate(self._forwards):
            if not self._finished[b]:
                forward.switch()
        return {point for point in self._waiting if point is not None}

    def close(self) -> None:
        """Unwind the forwards still paused (after an error elsewhere)."""
        for forward in self._forwards:
            if not forward.dead:
                forward.throw(greenlet.GreenletExit)


def _measure_layer(layer: nn.Module, memory: MemoryStats, backend: Backend) -> None:
    """Inside the layer's forward its parameters are whole (FSDP2 has unsharded them): count the copy."""
    if backend.copies_weights:
        unsharded = sum(backend.weight_shape(p).numel() * p.element_size() for p in layer.parameters())
        memory.layer_unsharded_bytes = max(memory.layer_unsharded_bytes, unsharded)


def _quantize_layer(
    index: int,
    groups: list[HessianGroup],
    modules: dict[str, nn.Linear],
    config: GPTQConfig,
    backend: Backend,
    result: QuantizationResult,
    clock: _Clock,
) -> None:
    """Sum each group's Hessian on its owner, GPTQ there, write the result into every rank's shard.

    All reduces and gathers are posted first, so while an owner runs GPTQ on one group the
    transfers of its next groups are in flight; scatters are posted in the same global order.
    """
    rank = backend.rank
    rows_of = {n: backend.weight_shape(modules[n].weight)[0] for g in groups for n in g.names}
    shapes = [(sum(rows_of[n] for n in g.names), g.columns) for g in groups]
    assignment = assign_owners(shapes, backend.world_size)
    logger.debug(
        "layer %d owners %s, predicted balance (max/mean) %.3f",
        index,
        {", ".join(g.names): o for g, o in zip(groups, assignment.owners, strict=True)},
        assignment.balance,
    )
    tokens = backend.sum_ints([g.tokens for g in groups])
    hessians: list[Pending | None] = [
        backend.reduce(g.sum, owner) for g, owner in zip(groups, assignment.owners, strict=True)
    ]
    weights = [
        [backend.gather_weight(modules[n].weight, owner) for n in g.names]
        for g, owner in zip(groups, assignment.owners, strict=True)
    ]
    scatters: list[Pending] = []
    held = 0  # bytes of gathered weights this rank holds (all its groups' transfers are in flight at once)
    for gi, owner in enumerate(assignment.owners):
        if owner == rank:
            held += sum(rows_of[n] * groups[gi].columns * modules[n].weight.element_size() for n in groups[gi].names)
    if backend.copies_weights:
        result.memory.owned_weight_bytes = max(result.memory.owned_weight_bytes, held)
    for gi in assignment.order:
        group, owner = groups[gi], assignment.owners[gi]
        fulls: list[torch.Tensor | None] = [None] * len(group.names)
        if owner == rank:
            event = {"layer": index, "group": gi}
            with clock("wait", **event):
                hessian_sum = hessians[gi].wait()
                parts = [p.wait() for p in weights[gi]]
            hessians[gi], weights[gi] = None, []  # the pendings hold the buffers: drop them with the locals
            with clock("gptq", **event):
                begin = time.perf_counter()
                hessian = hessian_from_sum(hessian_sum, tokens[gi], group.columns)
                del hessian_sum
                group.release()  # the float64 sum (twice the fp32 H) is not needed during GPTQ
                gptq = gptq_quantize(
                    torch.cat(parts) if len(parts) > 1 else parts[0],
                    hessian,
                    config.weights,
                    dampening_frac=config.dampening_frac,
                    block_size=config.block_size,
                    name=", ".join(group.names),
                    overwrite_hessian=True,  # GPTQ's working copy: one [cols, cols] fewer
                )
                del hessian, parts
                rows = [rows_of[n] for n in group.names]
                seconds = time.perf_counter() - begin
                fulls = _record(index, group.names, rows, gptq, seconds, config, rank, result)
        else:  # this rank's partial sum and its piece of the weight have been sent: free them now
            with clock("wait"):
                for pending in [hessians[gi], *weights[gi]]:
                    pending.wait()
            hessians[gi], weights[gi] = None, []
        group.release()
        for name, full in zip(group.names, fulls, strict=True):
            scatters.append(backend.scatter_weight(modules[name].weight, full, owner))
    with clock("wait"):
        for pending in scatters:
            pending.wait()


def _shares(rows: int, world: int) -> list[int]:
    """Near-equal row counts per rank."""
    base, extra = divmod(rows, world)
    return [base + (r < extra) for r in range(world)]


def _all_gather_rows(part: GPTQResult, counts: list[int], backend: Backend) -> GPTQResult:
    """The whole unit's result on every rank from each rank's rows (`counts`), in one collective.

    The weight travels as its int8 levels (a quarter of fp32's bytes) and is dequantized on arrival,
    bit for bit what its rank computed; the other fields ride along as bytes.
    """
    fields = [part.levels, part.zero_point, part.scale.float(), part.row_losses[:, None]]
    widths = [f.shape[1] * f.element_size() for f in fields]
    whole = backend.all_gather_rows(torch.cat([f.view(torch.int8) for f in fields], dim=1), counts)
    levels, zero_point, scale, losses = (
        f.contiguous().view(like.dtype) for f, like in zip(whole.split(widths, dim=1), fields, strict=True)
    )
    scale = scale.to(part.scale.dtype)
    start, end = sum(counts[: backend.rank]), sum(counts[: backend.rank + 1])
    weight = torch.empty(levels.shape, dtype=part.weight.dtype, device=levels.device)
    weight[start:end] = part.weight
    for others in (slice(0, start), slice(end, len(levels))):
        if others.stop > others.start:
            weight[others] = dequantize(levels[others], scale[others], zero_point[others], part.g_idx, weight.dtype)
    return GPTQResult(weight, levels, scale, zero_point, part.g_idx, row_losses=losses[:, 0], damping=part.damping)


def _record(
    index: int, names: list[str], rows: list[int], gptq: GPTQResult, seconds: float, config: GPTQConfig,
    rank: int, result: QuantizationResult,
) -> list[torch.Tensor]:  # fmt: skip
    """Split a group's GPTQ result back into its modules and pack each for the checkpoint."""
    fulls, row = [], 0
    for name, count in zip(names, rows, strict=True):
        part = slice(row, row + count)
        row += count
        weight, scale, zero_point = gptq.weight[part], gptq.scale[part], gptq.zero_point[part]
        fulls.append(weight)
        # The packer re-quantizes the weight it is handed: give it fp32 values, from which every level
        # comes back exactly (in bf16, 8-bit levels times the scale do not all survive the rounding).
        exact = (
            weight
            if weight.dtype == torch.float32
            else dequantize(gptq.levels[part], scale, zero_point, gptq.g_idx, torch.float32)
        )
        state = {"weight": exact, "weight_scale": scale, "weight_zero_point": zero_point}
        packed = PackedQuantizationCompressor.compress(state, config.scheme)
        if gptq.g_idx is not None:
            packed["weight_g_idx"] = gptq.g_idx
        result.modules[name] = ModuleRecord(
            name=name,
            layer=index,
            owner=rank,
            loss=float(gptq.row_losses[part].sum()),
            seconds=seconds,
            damping=gptq.damping,
            group=list(names),
            packed={k: v.cpu() for k, v in packed.items()},
        )
    return fulls
