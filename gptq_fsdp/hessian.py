"""Hessian accumulation: forward pre-hooks that sum XᵀX over calibration tokens.

Sum first, divide once at the end (H = 2·ΣXᵀX / n): dividing per batch loses fp32 precision.
Linears that read the very same input tensor in a forward (q/k/v, gate/up) share one accumulator,
found by tensor identity in the first forward, so their common XᵀX is computed once.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from gptq_fsdp.gptq import float32_matmul_precision

# Matmul precision that represents these input dtypes exactly (see HessianGroup.add).
LOSSLESS_PRECISION = {torch.bfloat16: "medium", torch.float16: "high"}


@dataclass
class HessianGroup:
    """Linears reading one input, with the running sum of XᵀX and the token count.

    `sum` holds only the column blocks on and above the diagonal (`upper_blocks`), one after another,
    in float64: half the memory and traffic of the whole symmetric matrix for wide inputs (10 of 16
    blocks at 4 blocks a side). `hessian()` / `hessian_from_sum` build the whole matrix in fp32.
    """

    names: list[str]
    columns: int
    device: torch.device
    sum: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self._blocks = upper_blocks(self.columns, self.device.type)
        self.sum = torch.zeros(packed_size(self._blocks), dtype=torch.float64, device=self.device)
        self._sums = block_views(self.sum, self._blocks)
        width = max(b - a for a, b, _, _ in self._blocks)
        self._product = torch.empty(width, width, dtype=torch.float32, device=self.device)  # one block's XᵀX

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of `x` [tokens, columns]: XᵀX in fp32, summed over batches in float64.

        The float64 sum makes the result independent of summation order (to fp32 rounding), so a
        run that splits the batches over ranks gets the same Hessian as one process. XᵀX is
        symmetric: only the blocks on and above the diagonal are multiplied and kept.

        16-bit activations are exactly representable in the reduced-precision matmul inputs (bf16 in
        bf16, fp16 in TF32), so their products go through the fast units with fp32 accumulation and
        lose nothing; fp32 activations use the ambient `torch.get_float32_matmul_precision()`.
        16-bit inputs are up-cast one column block at a time (the matmul needs fp32 inputs on CPU).
        """
        if x.device.type == "cuda" and x.dtype in LOSSLESS_PRECISION:
            self._add_16bit_cuda(x)
            return
        precision = LOSSLESS_PRECISION.get(x.dtype, torch.get_float32_matmul_precision())
        with float32_matmul_precision(precision):
            for (a, b, c, d), total in zip(self._blocks, self._sums, strict=True):
                if c == a:  # a row of blocks starts on the diagonal: one column block up-cast at a time
                    left = x[:, a:b].float()
                block = self._product[: b - a, : d - c]
                torch.mm(left.T, left if c == a else x[:, c:d].float(), out=block)
                total += block
        self.tokens += x.shape[0]

    def _add_16bit_cuda(self, x: torch.Tensor) -> None:
        """CUDA: 16-bit inputs straight into the tensor cores with an fp32 result (cuBLAS accumulates
        in fp32), no up-cast copy at all."""
        for (a, b, c, d), total in zip(self._blocks, self._sums, strict=True):
            block = self._product[: b - a, : d - c]
            torch.mm(x[:, a:b].T, x[:, c:d], out_dtype=torch.float32, out=block)
            total += block
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return hessian_from_sum(self.sum, self.tokens, self.columns)

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the group allocates: the float64 sum and the fp32 block scratch."""
        return self.sum, self._product

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def release(self) -> None:
        self.sum = self._product = torch.empty(0)
        self._sums = []


def upper_blocks(columns: int, device_type: str) -> list[tuple[int, int, int, int]]:
    """The blocks [a:b, c:d] on and above the diagonal of a [columns, columns] matrix cut by
    `column_blocks`, row of blocks by row of blocks: how `HessianGroup.sum` lays them out."""
    bounds = column_blocks(columns, device_type)
    return [(a, b, c, d) for i, (a, b) in enumerate(bounds) for c, d in bounds[i:]]


def packed_size(blocks: list[tuple[int, int, int, int]]) -> int:
    return sum((b - a) * (d - c) for a, b, c, d in blocks)


def block_views(packed: torch.Tensor, blocks: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    """`packed` (flat) seen as its blocks, each [b - a, d - c]."""
    sizes = [(b - a) * (d - c) for a, b, c, d in blocks]
    return [v.view(b - a, d - c) for v, (a, b, c, d) in zip(packed.split(sizes), blocks, strict=True)]


def unpack_symmetric(packed: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole symmetric [columns, columns] matrix in `dtype` from a `HessianGroup.sum`."""
    blocks = upper_blocks(columns, packed.device.type)
    if packed.numel() != packed_size(blocks):
        raise ValueError(f"{packed.numel()} values are not the upper blocks of a {columns}-column matrix")
    whole = torch.empty(columns, columns, dtype=dtype, device=packed.device)
    for (a, b, c, d), block in zip(blocks, block_views(packed, blocks), strict=True):
        whole[a:b, c:d] = block
        if c != a:
            whole[c:d, a:b] = whole[a:b, c:d].T
    return whole


def hessian_from_sum(total: torch.Tensor, tokens: int, columns: int) -> torch.Tensor:
    """H = 2·XᵀX / n in fp32 from a `HessianGroup.sum` (no float64 temporary). No tokens: all zeros,
    every column dead."""
    return unpack_symmetric(total, columns, torch.float32).mul_(2.0 / max(tokens, 1))


class _InputsTaken(Exception):
    """Raised inside a layer's forward once the last target's input has been taken."""


# Column block of the symmetric XᵀX: 384 measured best on CPU for 576..1536 columns. On accelerators
# larger blocks keep the number of kernel launches small (4096: an H200 ran 16384 x 8192, two blocks,
# in 2.5 ms, the full product's equivalent of 880 TFLOP/s; other widths not compared).
CPU_SYMMETRIC_BLOCK = 384
ACCELERATOR_SYMMETRIC_BLOCK = 4096


def column_blocks(columns: int, device_type: str) -> list[tuple[int, int]]:
    """[start, end) column blocks of about the device's block width covering `columns`."""
    width = CPU_SYMMETRIC_BLOCK if device_type == "cpu" else ACCELERATOR_SYMMETRIC_BLOCK
    count = max(1, round(columns / width))
    edges = [columns * i // count for i in range(count + 1)]
    return list(itertools.pairwise(edges))


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
    target's input is taken (e.g. skipping down_proj's matmul).
    """

    def __init__(self, modules: dict[str, nn.Linear], stop_early: bool = True) -> None:
        self.modules = modules
        self.stop_early = stop_early
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
        except _InputsTaken:
            pass
        self._forward.calls_open = False
        if first and self.stop_early and sorted(self._calls) == sorted(self.modules):  # each target once
            self._stop_after = self._calls[-1]

    def _hook(self, name: str, module: nn.Linear, args: tuple) -> None:
        self._accumulate(name, module, args[0])
        if self._forward.calls_open:
            self._calls.append(name)
        elif name == self._stop_after:
            raise _InputsTaken

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

    @contextmanager
    def attached(self) -> Iterator[HessianHooks]:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._hook(n, m, a)))
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._forward.seen = []
