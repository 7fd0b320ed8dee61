"""Numerical building blocks of GPTQ: the fp32 matmul precision switch, the one-Cholesky factor, a
blocked CPU Cholesky, GPTQ's column loop and its CUDA-graph replay. Tensor math only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torch.set_float32_matmul_precision's values: "highest" is IEEE fp32; "high" allows TF32 (GPU);
# "medium" also allows bf16 products with fp32 accumulation (GPU, and CPUs with AMX/AVX512-BF16).
MATMUL_PRECISIONS = ("highest", "high", "medium")

# Columns per run inside a block (quantize_columns): on the development machine's CPU 16 was fastest for 288..3072
# rows (3072 rows: 34 instead of 48 µs per column).
SUB_BLOCK = 16


@contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """`torch.set_float32_matmul_precision(precision)` inside the block, the previous value after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def reversed_hessian_factor(reversed_hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor L of J·(H + λI)·J, given J·H·J (J reverses the order of the columns),
    λ = damping · mean(diag H).

    Raises LinAlgError. With V = J·L·J, an upper triangle, H + λI = V·Vᵀ and V = U⁻¹ for GPTQ's
    usual factor U = chol_upper((H + λI)⁻¹), so GPTQ runs on this one Cholesky (cols³/3 flops)
    instead of Cholesky, inverse and Cholesky again (4·cols³/3). The Hessian is damped in place and
    restored (so a retry can use more damping); besides it, one [cols, cols] result.
    """
    diagonal = reversed_hessian.diagonal().clone()
    reversed_hessian.diagonal().add_(damping * torch.mean(diagonal))
    try:
        return cholesky(reversed_hessian)
    finally:
        reversed_hessian.diagonal().copy_(diagonal)


# Above this many columns the CPU factorization goes by diagonal blocks of CHOLESKY_BLOCK columns.
BLOCKED_CHOLESKY_FROM = 1024
CHOLESKY_BLOCK = 384


def cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite matrix (raises LinAlgError).

    On the CPU, torch.linalg.cholesky zeroes the upper triangle of LAPACK's column-major result in
    a slow strided pass (one thread, 1536 columns: 26 of its 34 ms). Large matrices are therefore
    factored a block of columns at a time (right-looking: the diagonal block's Cholesky, the panel
    below it by a triangular solve, the trailing update by one product): 1536 columns in 18 ms.
    """
    columns = matrix.shape[-1]
    if matrix.device.type != "cpu" or columns < BLOCKED_CHOLESKY_FROM:
        return torch.linalg.cholesky(matrix)
    factor = matrix.clone()
    for start in range(0, columns, CHOLESKY_BLOCK):
        end = min(start + CHOLESKY_BLOCK, columns)
        diagonal = torch.linalg.cholesky(factor[start:end, start:end])
        factor[start:end, start:end] = diagonal
        if end < columns:
            panel = torch.linalg.solve_triangular(diagonal.mT, factor[end:, start:end], upper=True, left=False)
            factor[end:, start:end] = panel
            factor[end:, end:].addmm_(panel, panel.mT, alpha=-1)
    return factor.tril_()


def quantize_columns(
    W1: torch.Tensor,
    source1: torch.Tensor,
    Q1: torch.Tensor,
    D1: torch.Tensor,
    feedback1: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    qmin: float,
    qmax: float,
    columns: range,
) -> None:
    """GPTQ's column loop inside one block (Wᵀ layout: W1[i] is column i, for all rows).

    Column i of `W1`, with the feedback of all earlier columns added, is quantized with its row of
    `scales`/`zero_points` (None: symmetric, all zero): `Q1[i]` gets its levels less the zero points
    (integers; the caller multiplies by the scales), `D1[i]` = `source1[i]` - its dequantized values,
    which go into the block's later columns j through `feedback1[i, j]`. Two forms give the same
    columns (W1[i] as reached, and so Q1):
    - GPTQ's usual one, with U = chol_upper(H⁻¹): source = W1 (as reached), feedback = -U[i, j] / U[i, i];
    - with V = U⁻¹ (H = V·Vᵀ, from one Cholesky; Chen et al., 2025, GPTQ as Babai's nearest plane):
      source = the original weight, feedback = V[i, j] / V[j, j].
    Rows are independent.
    """
    # Per-column views made in one call each (indexing one at a time costs more than the math here):
    # each column is 5 small ops (6 with zero points), so on a CPU the loop is bound by their overhead.
    w, source, q, d, scale = (t.unbind(0) for t in (W1, source1, Q1, D1, scales))
    zero_point = zero_points.unbind(0) if zero_points is not None else None
    # The feedback goes column by column only inside runs of SUB_BLOCK columns, and to the rest of the
    # block as one product per run: the per-column update stays small however many rows there are.
    for j1 in range(columns.start, columns.stop, SUB_BLOCK):
        j2 = min(j1 + SUB_BLOCK, columns.stop)
        # Each column updates the whole run with its feedback row zeroed on and before the diagonal:
        # columns already quantized get x + 0 = x, and no per-column slices are needed.
        run, feedback = W1[j1:j2], feedback1[j1:j2, j1:j2].triu(1).unbind(0)
        for i in range(j1, j2):
            if zero_point is None:
                torch.div(w[i], scale[i], out=q[i]).round_().clamp_(qmin, qmax)
            else:
                torch.addcdiv(zero_point[i], w[i], scale[i], out=q[i]).round_().clamp_(qmin, qmax)
                q[i].sub_(zero_point[i])
            torch.addcmul(source[i], q[i], scale[i], value=-1, out=d[i])  # source - level·scale, one rounding
            if i + 1 < j2:
                run.addr_(feedback[i - j1], d[i])
        W1[j2:].addmm_(feedback1[j1:j2, j2:].T, D1[j1:j2])


class ColumnLoopGraph:
    """`quantize_columns` over one whole block, captured once as a CUDA graph and replayed per block.

    The loop is a handful of tiny kernels per column, so on a GPU it is bound by kernel launches (an
    H200 took 110-150 µs per column eagerly). The graph reads and writes fixed buffers: each block's
    inputs are copied in and its results read out.
    """

    def __init__(self, block: int, rows: int, device: torch.device, qmin: float, qmax: float, symmetric: bool) -> None:
        self.W1, self.source1, self.Q1, self.D1, self.scales = (
            torch.zeros(block, rows, device=device) for _ in range(5)
        )
        self.zero_points = None if symmetric else torch.zeros(block, rows, device=device)
        self.feedback1 = torch.zeros(block, block, device=device)
        self.qmin, self.qmax = qmin, qmax
        self.graph: torch.cuda.CUDAGraph | None = None

    def _loop(self) -> None:
        quantize_columns(
            self.W1, self.source1, self.Q1, self.D1, self.feedback1, self.scales, self.zero_points,
            self.qmin, self.qmax, range(len(self.W1)),
        )  # fmt: skip

    def _capture(self) -> None:
        # Warm up on a side stream first (kernel loading must not happen during capture); the real
        # inputs are copied in again afterwards.
        side = torch.cuda.Stream(self.W1.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._loop()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: collectives of a sharded run may be in flight, polled by other threads.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._loop()

    def run(
        self, W1: torch.Tensor, source1: torch.Tensor, feedback1: torch.Tensor, scales: torch.Tensor,
        zero_points: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """`quantize_columns` on the block: updates `W1` in place and returns its levels less the zero
        points and its differences (Q1, D1), valid until the next run."""
        if self.graph is None:
            with torch.cuda.device(self.W1.device):
                self._capture()
        for buffer, value in (
            (self.W1, W1), (self.source1, source1), (self.feedback1, feedback1), (self.scales, scales),
            (self.zero_points, zero_points),
        ):  # fmt: skip
            if buffer is not None:
                buffer.copy_(value)
        self.graph.replay()
        W1.copy_(self.W1)
        return self.Q1, self.D1
