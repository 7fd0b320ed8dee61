"""Who runs GPTQ for which Hessian group (and who packs which unit for the checkpoint): cost models and
longest-processing-time packing."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

# Seconds of GPTQ on a [rows, cols] weight ~ a·cols³ (the factorization) + b·rows·cols² (block
# updates) + c·cols (per-column launch overhead) + d·rows·cols (column work). Fitted on the development machine's
# 2-core CPU, one thread, by benchmarks/gptq_cost_model.py (act-order static; within 20 % on
# 192..3072 x 576..2304); only the ratios matter for the packing.
CHOLESKY_COST = 5.7e-12
UPDATE_COST = 9.9e-12
COLUMN_OVERHEAD = 1.33e-5
ELEMENT_COST = 1.12e-8


def gptq_cost(rows: int, cols: int) -> float:
    return CHOLESKY_COST * cols**3 + UPDATE_COST * rows * cols**2 + COLUMN_OVERHEAD * cols + ELEMENT_COST * rows * cols


def packing_cost(rows: int, cols: int) -> float:
    """Packing a quantized weight for the checkpoint: one pass over its elements. True-sequential
    order splits GPTQ itself over all ranks, so there an owner only packs (and holds the result)."""
    return float(rows * cols)


@dataclass(frozen=True)
class Assignment:
    owners: list[int]  # owner rank of each group, in the input order
    order: list[int]  # group indices, most expensive first: every rank computes its groups in this order
    loads: list[float]  # predicted cost per rank

    @property
    def balance(self) -> float:
        """max / mean predicted load (1.0 is perfect)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean else 1.0


def assign_owners(
    shapes: list[tuple[int, int]], world_size: int, cost: Callable[[int, int], float] = gptq_cost
) -> Assignment:
    """Greedy LPT: the most expensive group (by `cost(rows, cols)`) goes to the least-loaded rank
    (ties: lowest rank)."""
    costs = [cost(rows, cols) for rows, cols in shapes]
    order = sorted(range(len(shapes)), key=lambda i: (-costs[i], i))
    heap = [(0.0, rank) for rank in range(world_size)]
    owners = [0] * len(shapes)
    loads = [0.0] * world_size
    for index in order:
        load, rank = heapq.heappop(heap)
        owners[index] = rank
        loads[rank] = load + costs[index]
        heapq.heappush(heap, (loads[rank], rank))
    return Assignment(owners, order, loads)
