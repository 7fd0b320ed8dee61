"""Expert-parallel calibration (FSDP2): a layer's experts stay sharded while the layer runs, and every
routed token travels to the rank that stores its expert.

FSDP2 cuts a fused expert parameter [E, rows, columns] by dim 0, so each rank stores whole experts
(E = 8 on 3 ranks: 3, 3, 2). Each experts module is its own FSDP2 module (`apply_fully_shard` with
`expert_parallel`), so the layer's unshard leaves it sharded; during the layer's forwards it is
swapped for a dispatcher that, for each call, sends each expert's rows to the expert's rank, where
the model's own eager loop runs them on that rank's shard (and the Hessian hooks see their inputs),
and adds the returned rows up as the model does. No rank holds another rank's experts' weights or
Hessians.

The result equals one process bit for bit: the source cuts expert e's rows as the model's loop does
(`torch.where` order: by top-k slot, then token); the owner runs each source's rows in a call of
their own, so every projection has the one-process shape [tokens of e in that batch, columns], and
the source adds the weighted expert outputs into the layer's output expert by expert, in order.

Every exchange is a collective, so every rank makes as many experts calls per pass as the rank with
the most batches: a rank out of batches serves its experts to the others (`serve`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from gptq_fsdp.core.scheme import GPTQError
from gptq_fsdp.distributed import collectives
from gptq_fsdp.distributed.backend import Backend
from gptq_fsdp.distributed.fsdp2 import FSDP2Backend, row_counts
from gptq_fsdp.model.experts import ExpertParam, local_experts, run_experts

OnInput = Callable[[ExpertParam, int, torch.Tensor], None]


def check_expert_parallel(experts: list[list[ExpertParam]], backend: Backend) -> None:
    """Refuse a model that expert-parallel calibration cannot run on, before any forward."""
    modules = {id(p.module): p for layer in experts for p in layer}
    if not modules or backend.world_size == 1:
        return
    if not isinstance(backend, FSDP2Backend):
        raise GPTQError(
            "expert-parallel calibration needs each expert whole on one rank: FSDP2 (ZeRO-3's flat partitions "
            "cut through experts); drop expert_parallel (--expert-parallel) under ZeRO-3"
        )
    loose = [p.module_name for p in modules.values() if not isinstance(p.module, FSDPModule)]
    if loose:
        raise GPTQError(
            f"expert-parallel calibration keeps each experts module out of its layer's unshard, so each must be "
            f"an FSDP2 module of its own: {loose[0]}{f' and {len(loose) - 1} more' if len(loose) > 1 else ''} "
            "is not. fully_shard every experts module before its decoder layer (gptq_fsdp.distributed.launch."
            "apply_fully_shard(model, FSDPSettings(expert_parallel=True)) does; the CLI with --expert-parallel too)"
        )


@dataclass
class _Shard:
    """One experts module: the projections GPTQ quantizes (`params`; maybe not all of the module's),
    the same on a module of this rank's experts only (`local`), and the first expert of every rank."""

    params: list[ExpertParam]
    local: list[ExpertParam]
    starts: list[int]  # rank r stores experts starts[r] .. starts[r + 1] - 1
    parent: nn.Module
    attribute: str
    # What the first real call showed: a rank out of batches sends no rows, but of this width and dtypes.
    hidden: tuple[int, torch.dtype, torch.device] | None = None
    weights_dtype: torch.dtype | None = None
    mine: range = field(init=False)
    on_input: OnInput | None = None  # local expert numbers made global, while dispatching

    def __post_init__(self) -> None:
        rank = collectives.rank()
        self.mine = range(self.starts[rank], self.starts[rank + 1])

    @property
    def module(self) -> nn.Module:
        return self.params[0].module

    @property
    def num_experts(self) -> int:
        return self.params[0].num_experts


class ExpertParallel:
    """One decoder layer's experts, dispatched to their ranks while the layer runs (see the module
    doc). `params`: the fused projections to quantize; `calls`: the most forward calls any rank
    makes per pass; `device`: where the forwards run."""

    def __init__(
        self, layer: nn.Module, params: list[ExpertParam], backend: Backend, calls: int, device: torch.device
    ) -> None:
        self.calls = calls
        self.peak_bytes = 0  # most bytes of dispatch buffers held at once
        self.copied_bytes = 0  # the rank's experts copied to `device` (shards in host memory)
        self._shards: list[_Shard] = []
        self._stored: list[tuple[torch.Tensor, torch.Tensor]] = []  # (shard, its copy on the device)
        parents = {id(child): (parent, name) for parent in layer.modules() for name, child in parent.named_children()}
        world = backend.world_size
        for module in dict.fromkeys(p.module for p in params):  # each experts module once, in order
            mine = [p for p in params if p.module is module]
            counts = row_counts(mine[0].num_experts, world)
            starts = [sum(counts[:r]) for r in range(world + 1)]
            local = {}  # every parameter of the module (quantized or not): its experts run on them
            for name, param in module.named_parameters(recurse=False):
                stored = backend.local_part(param)
                local[name] = stored.to(device)  # a copy where the shards wait in host memory (CPUOffloadPolicy)
                if local[name] is not stored:
                    self._stored.append((stored, local[name]))
                    self.copied_bytes += stored.numel() * stored.element_size()
            self._shards.append(_Shard(mine, local_experts(mine, local), starts, *parents[id(module)]))
        self._kept_tokens: Callable[[], torch.Tensor | None] = lambda: None
        self._calls: list[int] = []  # the shards' calls in this pass, in order

    @property
    def modules(self) -> list[nn.Module]:
        """The experts modules kept sharded (and out of the layer) while dispatching."""
        return [shard.module for shard in self._shards]

    def owned(self, param: ExpertParam) -> range:
        """The experts of `param` whose rows this rank stores (and calibrates)."""
        return next(s.mine for s in self._shards if param in s.params)

    def local_weight(self, param: ExpertParam, expert: int) -> torch.Tensor:
        """This rank's rows of `param[expert]` (one of its own experts) as its experts run; after
        writing them, `store` puts them in the shards."""
        shard = next(s for s in self._shards if param in s.params)
        return shard.local[shard.params.index(param)].weight[expert - shard.mine.start]

    def store(self) -> None:
        """Copy the experts written on the device back into the shards in host memory, if any."""
        for stored, copy in self._stored:
            stored.copy_(copy)

    @contextmanager
    def dispatching(
        self, forwards: int, on_input: OnInput | None = None, kept_tokens: Callable[[], torch.Tensor | None] = None
    ) -> Iterator[None]:
        """Inside, the layer's experts modules dispatch their tokens; this rank runs `forwards` forward
        calls of the layer and, on leaving, serves the others' remaining ones. `on_input(param, expert,
        rows)` receives every input of this rank's experts' projections, without the tokens that
        `kept_tokens()` (flat over the forward's batch) marks as padding."""
        self._kept_tokens, self._calls = kept_tokens or (lambda: None), []
        for index, shard in enumerate(self._shards):
            shard.on_input = None if on_input is None else _globally(on_input, shard)
            setattr(shard.parent, shard.attribute, _Dispatcher(self, index))
        try:
            yield
            per_forward = self._calls[: len(self._calls) // forwards]  # every forward calls them alike
            for _ in range(self.calls - forwards):
                for index in per_forward:
                    self._serve(self._shards[index])
        finally:
            for shard in self._shards:
                setattr(shard.parent, shard.attribute, shard.module)

    def _serve(self, shard: _Shard) -> None:
        """One call's exchange with no tokens of this rank's own."""
        width, dtype, device = shard.hidden
        rows = torch.empty((0, width), dtype=dtype, device=device)
        counts = torch.zeros(shard.num_experts, dtype=torch.int64, device=device)
        self._exchange(shard, rows, torch.empty((0, 2), dtype=torch.float64, device=device), counts)

    def forward(
        self, index: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """What the experts module `index` returns for this call, its experts run where they are stored."""
        shard = self._shards[index]
        self._calls.append(index)
        tokens, device = hidden_states.shape[0], hidden_states.device
        shard.hidden = (hidden_states.shape[1], hidden_states.dtype, device)
        shard.weights_dtype = top_k_weights.dtype
        # Expert e's rows in the model's loop order: by top-k slot, then token (torch.where on [k, tokens]).
        flat = top_k_index.T.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token, slot = order % tokens, order // tokens
        counts = torch.bincount(flat, minlength=shard.num_experts)
        kept = self._kept_tokens()
        kept = torch.ones(tokens, device=device) if kept is None else kept.to(device)
        aux = torch.stack([top_k_weights[token, slot].double(), kept[token].double()], dim=1)
        returned = self._exchange(shard, hidden_states[token], aux, counts)
        output = torch.zeros_like(hidden_states)
        sizes = counts.tolist()
        for expert, rows in zip(token.split(sizes), returned.split(sizes), strict=True):
            if rows.shape[0]:
                output.index_add_(0, expert, rows)
        return output

    def _exchange(self, shard: _Shard, rows: torch.Tensor, aux: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send `rows` (with their routing weight and keep flag, `aux`) grouped by expert (`counts`
        each) to the experts' ranks, run the experts here on what arrives, and return this rank's
        rows' expert outputs, in the order sent."""
        every = collectives.all_gather_stacked(counts).tolist()  # [source rank][expert]
        mine, starts, world = shard.mine, shard.starts, len(shard.starts) - 1
        own = every[collectives.rank()]
        send = [sum(own[starts[r] : starts[r + 1]]) for r in range(world)]
        per_source = [every[s][mine.start : mine.stop] for s in range(world)]
        receive = [sum(c) for c in per_source]
        arrived = collectives.all_to_all_rows(rows, send, receive)
        arrived_aux = collectives.all_to_all_rows(aux, send, receive)
        outputs = torch.empty_like(arrived)
        start = 0
        for source_counts in per_source:  # each source's rows in a call of their own: one-process shapes
            end = start + sum(source_counts)
            if end > start:
                device = arrived.device
                index = torch.repeat_interleave(
                    torch.arange(len(mine), device=device), torch.tensor(source_counts, device=device)
                )[:, None]
                weights = arrived_aux[start:end, :1].to(shard.weights_dtype)
                kept = arrived_aux[start:end, 1].bool()
                outputs[start:end] = run_experts(shard.local, arrived[start:end], index, weights, shard.on_input, kept)
            start = end
        returned = collectives.all_to_all_rows(outputs, receive, send)
        held = [rows, aux, arrived, arrived_aux, outputs, returned]
        self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in held))
        return returned


def _globally(on_input: OnInput, shard: _Shard) -> OnInput:
    """`on_input` for the shard's module of local experts: its projections and expert numbers made global."""
    params = dict(zip(map(id, shard.local), shard.params, strict=True))
    return lambda local, expert, rows: on_input(params[id(local)], expert + shard.mine.start, rows)


class _Dispatcher(nn.Module):
    """Stands in for an experts module during the layer's forwards (no parameters of its own)."""

    def __init__(self, dispatch: ExpertParallel, index: int) -> None:
        super().__init__()
        self._call = lambda *args: dispatch.forward(index, *args)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self._call(hidden_states, top_k_index, top_k_weights)
