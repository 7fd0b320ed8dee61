"""Hessians of GPTQ: the running sum of XᵀX over calibration tokens, and H from it.

Sum first, divide once at the end (H = 2·ΣXᵀX / n): dividing per batch loses fp32 precision.
The sum keeps only the column blocks on and above the diagonal, in float64.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from gptq_fsdp.core.linalg import float32_matmul_precision

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
