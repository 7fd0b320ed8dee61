"""GPTQ's "true sequential" order: one forward of the layer per batch, quantizing each Linear
inside it, right before it runs, from inputs that the Linears before it produced already quantized.

Every batch's forward pauses before a Linear that is not quantized yet (`PausableForwards`); once
all of them wait there, its Hessian is complete and the Linear is quantized, then they go on. The
forwards' outputs are the next layer's inputs, with no second pass.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import greenlet
import torch

from gptq_fsdp.distributed import collectives
from gptq_fsdp.distributed.schedule import assign_owners, packing_cost
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.pipeline.job import LayerJob
from gptq_fsdp.pipeline.owners import quantize_rows_everywhere

LAYER_END = ("<end of the layer's forward>",)


def run_layer(job: LayerJob) -> list[torch.Tensor]:
    """One forward of the layer per batch, quantizing each Linear right before it runs.

    Linears that read one input share its XᵀX and, from the second layer of a kind on
    (`Run.units_of` remembers the first one's groups), one GPTQ call. Every rank reaches the Linears
    in the same order, so the collectives line up: a Hessian sum is all-reduced, every rank runs
    GPTQ on its share of the unit's rows (`quantize_rows_everywhere`); the unit's owner packs it
    for the checkpoint (LPT over the layer's units by packing cost: here packing is all an owner
    does). Once the layer is sharded again each rank stores its own piece.
    """
    run, modules, prefix = job.run, job.modules, job.prefix
    backend, clock, rank = run.backend, run.clock, run.backend.rank
    kind = (type(job.layer).__name__, tuple(n[len(prefix) :] for n in modules))
    units = [tuple(prefix + n for n in unit) for unit in run.units_of.get(kind, [])]
    units += [(n,) for n in modules if not any(n in unit for unit in units)]
    unit_of = {name: unit for unit in units for name in unit}
    shapes = [(sum(backend.weight_shape(modules[n].weight)[0] for n in u), modules[u[0]].in_features) for u in units]
    owner_of = dict(zip(units, assign_owners(shapes, backend.world_size, packing_cost).owners, strict=True))
    hooks = HessianHooks(modules, stop_early=False)
    summed: set[int] = set()  # Hessian groups whose sum every rank holds
    pieces: dict[str, torch.Tensor | None] = {}
    owned: list[tuple] = []  # `QuantizationResult.record`'s arguments for the units this rank packs

    def quantize(unit: tuple[str, ...]) -> None:
        group = hooks.group_of(unit[0])
        if id(group) not in summed:
            with clock("wait", layer=job.index, group=", ".join(unit), step="hessian"):
                collectives.all_reduce(group.sum)
                group.tokens = collectives.sum_ints([group.tokens])[0]
            summed.add(id(group))
        gptq, seconds = quantize_rows_everywhere(job, unit, group)
        weights = [modules[n].weight.detach() for n in unit]
        rows = [w.shape[0] for w in weights]
        if owner_of[unit] == rank:  # packs the unit's modules for the checkpoint, once the forwards are done
            owned.append((job.index, list(unit), rows, gptq, seconds, group.tokens))
        for name, weight, full in zip(unit, weights, gptq.weight.split(rows), strict=True):
            weight.copy_(full)
            pieces[name] = backend.piece_of(modules[name].weight, weight)

    def forward(b: int) -> torch.Tensor:
        with hooks.forward(run.masks[b]):
            return job.forward(b)

    def pause_before(name: str) -> None:
        if unit_of[name][0] not in pieces:
            forwards.pause(unit_of[name])

    with job.measured(), clock("forward"), hooks.attached(), backend.layer_unsharded(job.layer):
        # Registered after the Hessian hooks: a Linear's input is summed before the forward pauses.
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: pause_before(n)) for n, m in modules.items()]
        # All forwards also wait at the layer's end, before its other forward hooks: FSDP2's post-forward
        # of one batch may reshard the layer, which the others must not see mid-forward.
        handles.append(job.layer.register_forward_hook(lambda m, a, o: forwards.pause(LAYER_END), prepend=True))
        forwards = PausableForwards(len(job.hidden), forward)
        try:
            while waiting := forwards.run_all():
                if len(waiting) != 1:
                    raise RuntimeError(f"the forwards of one layer paused at different points: {sorted(waiting)}")
                point = waiting.pop()
                if point != LAYER_END:
                    begin = time.perf_counter()
                    quantize(point)
                    run.result.phases["forward"] -= time.perf_counter() - begin
        finally:
            forwards.close()
            for handle in handles:
                handle.remove()
        run.store.settle()
    run.units_of.setdefault(kind, [tuple(n[len(prefix) :] for n in g.names) for g in hooks.groups])
    job.account(hooks)
    for group in hooks.groups:
        group.release()
    for name, piece in pieces.items():
        backend.write_piece(modules[name].weight, piece)
    with clock("gptq"):  # off the path the other ranks wait on between units
        for record in owned:
            run.result.record(*record)
    return forwards.outputs


class PausableForwards:
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
