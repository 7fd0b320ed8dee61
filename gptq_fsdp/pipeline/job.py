"""One decoder layer's work, as both orders (standard.py, true_sequential.py) see it: where the
calibration activations wait, the clock of the phases, and the layer's job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.distributed import Backend
from gptq_fsdp.distributed.expert_parallel import ExpertParallel
from gptq_fsdp.model.capture import layer_output
from gptq_fsdp.model.experts import ExpertParam
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.pipeline.results import MemoryStats, QuantizationResult


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


class Clock:
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


@dataclass
class Run:
    """What every layer of a run shares."""

    config: GPTQConfig
    result: QuantizationResult
    store: ActivationStore
    clock: Clock
    masks: list[torch.Tensor]  # attention mask of each of this rank's batches
    # True-sequential: the GPTQ units (Hessian groups) of the first layer of each kind.
    units_of: dict[tuple, list[tuple[str, ...]]] = field(default_factory=dict)

    @property
    def backend(self) -> Backend:
        return self.result.backend

    @property
    def memory(self) -> MemoryStats:
        return self.result.memory


@dataclass
class LayerJob:
    """One decoder layer of a run, with its inputs for every batch of this rank."""

    run: Run
    index: int
    layer: nn.Module
    prefix: str  # the layer's own name, "model.layers.3."
    modules: dict[str, nn.Linear]  # its targets, by full name
    hidden: list[torch.Tensor]  # its input per batch
    calls: list[tuple[tuple, dict]]  # its other call arguments per batch
    experts: list[ExpertParam] = field(default_factory=list)  # its fused MoE projections to quantize
    # Expert-parallel calibration: the experts stay sharded and their tokens travel to them.
    dispatch: ExpertParallel | None = None

    @contextmanager
    def measured(self) -> Iterator[None]:
        """Inside the layer's forward its parameters are whole (FSDP2 has unsharded them): count the copy."""
        backend, memory = self.run.backend, self.run.memory

        def measure(layer: nn.Module, args) -> None:
            if backend.copies_weights:
                # Dispatched experts modules are swapped out of the layer (parameters: none) meanwhile.
                unsharded = sum(backend.weight_shape(p).numel() * p.element_size() for p in layer.parameters())
                memory.layer_unsharded_bytes = max(memory.layer_unsharded_bytes, unsharded)

        stored = sum(backend.local_part(p.weight).numel() * p.weight.element_size() for p in self.experts)
        whole = sum(backend.weight_shape(p.weight).numel() * p.weight.element_size() for p in self.experts)
        if self.dispatch is not None:  # its own experts, and their copy on the device if they wait in host memory
            stored += self.dispatch.copied_bytes
        elif backend.copies_weights:  # the layer's unshard makes the whole experts
            stored += whole
        memory.expert_weight_bytes = max(memory.expert_weight_bytes, stored)

        handle = self.layer.register_forward_pre_hook(measure)
        try:
            yield
        finally:
            handle.remove()

    def account(self, hooks: HessianHooks) -> None:
        """The Hessians' bytes, and their XᵀX time moved from the forward phase to its own."""
        memory, phases = self.run.memory, self.run.result.phases
        groups = [*hooks.groups, *hooks.expert_groups.values(), *hooks.shared_groups.values()]
        memory.hessian_bytes = max(memory.hessian_bytes, sum(g.nbytes for g in groups))
        expert_groups = [*hooks.expert_groups.values(), *hooks.shared_groups.values()]
        memory.expert_hessian_bytes = max(memory.expert_hessian_bytes, sum(g.nbytes for g in expert_groups))
        phases["forward"] -= hooks.seconds
        phases["hessian"] += hooks.seconds

    @contextmanager
    def experts_dispatched(self, hooks: HessianHooks | None = None) -> Iterator[None]:
        """Expert-parallel: inside, the layer's experts run on their ranks (feeding `hooks`); this rank
        runs one forward per batch inside, and on leaving serves the other ranks' remaining ones."""
        if self.dispatch is None:
            yield
            return
        on_input, kept = (hooks.expert_input, hooks.kept_tokens) if hooks is not None else (None, None)
        with self.dispatch.dispatching(len(self.hidden), on_input, kept):
            yield
        self.run.memory.dispatch_bytes = max(self.run.memory.dispatch_bytes, self.dispatch.peak_bytes)

    def forward(self, b: int) -> torch.Tensor:
        """Batch b's output of the layer, kept where the store keeps activations."""
        store = self.run.store
        args, kwargs = self.calls[b]
        return store.keep(layer_output(self.layer(store.fetch(self.hidden[b]), *args, **kwargs)))

    def unsharded(self) -> AbstractContextManager[None]:
        """The layer's parameters whole for its forwards, but for the experts that stay sharded."""
        return self.run.backend.layer_unsharded(self.layer, self.dispatch.modules if self.dispatch else ())

    def propagate(self) -> list[torch.Tensor]:
        """The layer's outputs for every batch: the next layer's inputs."""
        with self.run.clock("propagate"), self.unsharded(), self.experts_dispatched():
            outputs = [self.forward(b) for b in range(len(self.hidden))]
            self.run.store.settle()
        return outputs
