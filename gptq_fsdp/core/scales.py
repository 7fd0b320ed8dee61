"""Scales from a search over shrunk min-max ranges (the `mse` and `imatrix_mse` observers of
llm-compressor; `scheme.scale_search` reads which one a scheme asks for).

For each group of a weight (handed over as [group, ..., rows], as slices of Wᵀ hold it), every
candidate range p·[min, max] is turned into a scale and zero point by compressed-tensors' own
formula, the scale rounded to the model dtype as the checkpoint stores it; the group is quantized
and dequantized with it, and the candidate with the least error Σ_i c_i·|w_i − q(w_i)|^norm is kept
(c_i = 1, or column i's Hessian diagonal: the mean squared input that llm-compressor's imatrix
measures, up to a factor). Among equal errors the widest range wins, so min-max (p = 1, the first
candidate) is kept unless another is strictly better.

The error is taken in steps of the scale, |w/s + z − level|^norm times s^norm, with IEEE-exact
operations only (division, rounding, products, square roots: `norm` is a multiple of 1/2) and group
sums in a fixed pairwise order: a group's scale is the same bits on every device, at any thread
count, and whichever rows are searched with it (ranks that quantize shares of a weight's rows agree
with one process). All groups go at once, candidate by candidate, a bounded number of rows at a time.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams

from gptq_fsdp.core.scheme import ScaleSearch

# Elements of each of the two [group, ..., rows] work buffers (one chunk of rows): on a CPU the size that
# measured fastest (smaller chunks pay more per-op overhead: 2^18 was about 20 % slower); on a GPU large enough
# that kernel launches do not count (2 x 64 MiB).
CHUNK_ELEMENTS = {"cpu": 2**20}
DEVICE_CHUNK_ELEMENTS = 2**24


class ScaleSearcher:
    """`search` for one weight: its candidates on the weight's device, then `searcher(w)` per call."""

    def __init__(
        self, search: ScaleSearch, args: QuantizationArgs, dtype: torch.dtype, device: torch.device,
        qmin: float, qmax: float,
    ) -> None:  # fmt: skip
        self.search, self.args, self.dtype = search, args, dtype
        self.qmin, self.qmax = qmin, qmax
        self.shrinks = torch.tensor(search.shrinks, dtype=torch.float32, device=device)
        self.chunk = CHUNK_ELEMENTS.get(torch.device(device).type, DEVICE_CHUNK_ELEMENTS)

    def __call__(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (rounded to the model dtype, as fp32) and zero point of each group of `w`
        [group, ..., rows] (its first dim, as a slice of Wᵀ holds it; rows contiguous), [..., rows];
        `importance` (≥ 0, broadcast against `w` with one row) weights each element's error."""
        rows = w.shape[-1]
        scale = torch.empty(w.shape[1:], device=w.device)
        zero_point = torch.empty_like(scale)
        step = max(1, self.chunk // w[..., 0].numel())
        work = torch.empty(2, w[..., 0].numel() * min(step, rows), device=w.device)
        for r1 in range(0, rows, step):
            part = w[..., r1 : r1 + step]
            scales, zero_points = self.candidates(part)
            errors = torch.stack(
                [self.errors(part, s, z, importance, work) for s, z in zip(scales, zero_points, strict=True)]
            )
            best = errors.argmin(dim=0, keepdim=True)  # the first least error: the widest range among equals
            scale[..., r1 : r1 + step] = scales.gather(0, best)[0]
            zero_point[..., r1 : r1 + step] = zero_points.gather(0, best)[0]
        return scale, zero_point

    def candidates(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every candidate's scale and zero point for each group of `w` [group, ...]: [candidates, ...]."""
        shrinks = self.shrinks.view(-1, *[1] * (w.dim() - 1))
        scales, zero_points = calculate_qparams(w.amin(dim=0) * shrinks, w.amax(dim=0) * shrinks, self.args)
        return scales.to(self.dtype).float(), zero_points.round()

    def errors(
        self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, importance: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Σ c·|w − q(w)|^norm over each group of `w` [group, ...] with the qparams `scale`/`zero_point`
        [...]: the objective the search minimizes. `work`: two buffers of at least w's elements."""
        work = torch.empty(2, w.numel(), device=w.device) if work is None else work
        steps, levels = (buffer[: w.numel()].view(w.shape) for buffer in work)
        torch.div(w, scale, out=steps)
        if not self.args.symmetric:
            steps.add_(zero_point)
        torch.round(steps, out=levels).clamp_(self.qmin, self.qmax)
        error = power(steps.sub_(levels), self.search.norm, levels)  # |w/s + z − level|^norm, in steps
        if importance is not None:
            error.mul_(importance)
        return pairwise_sum(error) * power(scale.clone(), self.search.norm)  # a new tensor: `work` is reused


def power(x: torch.Tensor, norm: float, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """|x|^norm in place for `norm` a multiple of 1/2 (at least 1), by products and square roots
    (IEEE-exact operations, unlike a general power: the same bits on every device and layout), as
    few passes as it takes: x² by x·x (no |x|), x^2.5 = x²·√|x|, x³ = x²·|x|. `scratch`, of x's
    shape, may be overwritten."""
    squares, halves = divmod(round(2 * norm), 4)  # norm = 2·squares + halves/2
    if halves == 0 and squares & (squares - 1) == 0:  # x², x⁴, x⁸, ...: squared in place
        while squares:
            x.mul_(x)
            squares //= 2
        return x
    square = None
    if squares:
        square = torch.mul(x, x, out=scratch) if scratch is not None else x * x
    if halves == 0:
        x.copy_(square)
        squares -= 1
    else:
        x.abs_()
        if halves == 1:
            x.sqrt_()
        elif halves == 3:
            x.mul_(x.sqrt())
    for _ in range(squares):
        x.mul_(square)
    return x


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first dim in a fixed pairwise order, whatever the device, layout or thread count
    (in place: `x` is overwritten)."""
    n = len(x)
    while n > 1:
        half = n // 2
        x[:half] += x[n - half : n]
        n -= half
    return x[0]
