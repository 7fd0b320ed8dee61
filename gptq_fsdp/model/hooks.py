"""Forward hooks that feed each target Linear's input into a Hessian sum while a decoder layer runs.

Linears that read the very same input tensor in a forward (q/k/v, gate/up) share one sum, found by
tensor identity in the first forward, so their common XᵀX is computed once.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from gptq_fsdp.core.hessian import HessianGroup
from gptq_fsdp.model.capture import StopForward
from gptq_fsdp.model.experts import FUSED, ExpertParam, expert_inputs


@dataclass
class _ForwardState:
    """What one forward's hooks need: the inputs seen so far (tensor identity), the padding mask.

    The inputs are held by weak references: a Linear that shares an input is called while that input
    is alive, and strong ones would keep every input of a paused true-sequential forward alive.
    """

    seen: list[tuple[weakref.ref, HessianGroup]] = field(default_factory=list)
    mask: torch.Tensor | None = None
    kept_rows: dict[torch.device, torch.Tensor] = field(default_factory=dict)  # unmasked token indices
    calls_open: bool = False  # recording the call order (first forward only)


class HessianHooks:
    """Accumulates one Hessian per distinct Linear input while a decoder layer runs forwards.

    Run each forward inside `with hooks.forward(attention_mask):` (or call `start_forward` first);
    tokens where the mask is 0 (padding) are left out. Inputs whose leading dims do not match the
    mask (e.g. MoE experts that see a gathered token subset) are taken whole.

    Only the Linears' inputs matter, not the layer's output: once the first forward has shown that
    every target runs exactly once, later forwards inside `forward()` stop right after the last
    target's input is taken (e.g. skipping down_proj's matmul); not in layers with `experts`.

    Each expert slice of the fused MoE parameters in `experts` gets a Hessian of its own
    (`expert_groups[param, e]`, all made up front on `device`, so that every rank holds the same
    ones whichever experts its tokens reach), from the tokens routed to it. With `all_tokens`, every
    expert is calibrated on every token: the first projection (gate/up), whose input is then the same
    for all experts, has one Hessian for all of them (`shared_groups[param]`).

    With `owned` (expert-parallel calibration), slice e of `param` gets a Hessian only where
    `e in owned(param)`, and the experts modules are left alone: their inputs come from whoever runs
    the experts, through `expert_input`.
    """

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        stop_early: bool = True,
        experts: list[ExpertParam] = (),
        device: torch.device | None = None,
        all_tokens: bool = False,
        owned: Callable[[ExpertParam], range] | None = None,
    ) -> None:
        self.modules = modules
        self.device = device
        self.experts = list(experts)
        self.all_tokens = all_tokens
        self.stop_early = stop_early and not self.experts
        shared = [p for p in self.experts if all_tokens and p.param_name == FUSED[0]]
        self.shared_groups = {p: HessianGroup([p.label("*")], p.columns, device) for p in shared}
        self.dispatched = owned is not None
        self.expert_groups = {
            (param, e): HessianGroup(param.names(e), param.columns, device)
            for param in self.experts
            if param not in self.shared_groups
            for e in (owned(param) if owned is not None else range(param.num_experts))
        }
        self.groups: list[HessianGroup] = []
        self._group_of: dict[str, HessianGroup] = {}
        # Per forward: true-sequential interleaves the batches' forwards, each in a greenlet (which has
        # a context of its own), so the state lives in a context variable.
        self._forward_state: ContextVar[_ForwardState] = ContextVar("hessian_hooks_forward")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.seconds = 0.0  # time spent accumulating XᵀX
        self._calls: list[str] = []  # targets in call order, during the first forward
        self._stop_after: str | None = None

    @property
    def _forward(self) -> _ForwardState:
        state = self._forward_state.get(None)
        if state is None:
            state = _ForwardState()
            self._forward_state.set(state)
        return state

    def start_forward(self, attention_mask: torch.Tensor | None) -> None:
        state = self._forward
        state.seen = []
        # Padding is found once per forward (the pipeline's masks live on the CPU): packed samples
        # need no mask work in the hooks, and padded ones an index_select by indices sent to the
        # device once per forward, not boolean indexing (a device sync) in every hook.
        state.mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        state.kept_rows = {} if state.mask is None else {torch.device("cpu"): state.mask.reshape(-1).nonzero()[:, 0]}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as [tokens, features] without the masked (padding) tokens."""
        rows = x.reshape(-1, x.shape[-1])
        state = self._forward
        if state.mask is None or x.dim() < 3 or x.shape[:2] != state.mask.shape:
            return rows
        if x.device not in state.kept_rows:
            state.kept_rows[x.device] = state.kept_rows[torch.device("cpu")].to(x.device)
        return rows.index_select(0, state.kept_rows[x.device])

    def group_of(self, name: str) -> HessianGroup:
        """The group whose sum holds `name`'s inputs (after its hook has run)."""
        return self._group_of[name]

    @contextmanager
    def forward(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        self.start_forward(attention_mask)
        first = not self._group_of
        self._forward.calls_open = first
        try:
            yield
        except StopForward:
            pass
        self._forward.calls_open = False
        if first and self.stop_early and sorted(self._calls) == sorted(self.modules):  # each target once
            self._stop_after = self._calls[-1]

    def _hook(self, name: str, module: nn.Linear, args: tuple) -> None:
        self._accumulate(name, module, args[0])
        if self._forward.calls_open:
            self._calls.append(name)
        elif name == self._stop_after:
            raise StopForward

    def _accumulate(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        for seen_input, group in self._forward.seen:
            if seen_input() is x:
                if name not in self._group_of:  # first forward: join the group reading this tensor
                    self._group_of[name] = group
                    group.names.append(name)
                return
        group = self._group_of.get(name)
        if group is None:
            group = HessianGroup([name], module.in_features, x.device)
            self._group_of[name] = group
            self.groups.append(group)
        self._forward.seen.append((weakref.ref(x), group))
        rows = self._rows(x)
        start = time.perf_counter()
        group.add(rows)
        self.seconds += time.perf_counter() - start

    def expert_input(self, param: ExpertParam, expert: int | None, rows: torch.Tensor) -> None:
        """Rows of expert `expert`'s input to `param` (None: the input shared by all its experts)."""
        start = time.perf_counter()
        group = self.shared_groups[param] if expert is None else self.expert_groups[param, expert]
        group.add(rows)
        self.seconds += time.perf_counter() - start

    def kept_tokens(self) -> torch.Tensor | None:
        """This forward's non-padding tokens, flat over its batch (None: all)."""
        mask = self._forward.mask
        return None if mask is None else mask.reshape(-1)

    @contextmanager
    def attached(self) -> Iterator[HessianHooks]:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._hook(n, m, a)))
        try:
            experts = [] if self.dispatched else self.experts
            with expert_inputs(experts, self.expert_input, self.kept_tokens, self.all_tokens):
                yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._forward.seen = []
