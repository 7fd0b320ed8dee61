"""What the planner takes and gives: `PlanOptions` (the run's `GPTQConfig` plus the planner's own
settings), the result types (`RankMemory`, `LayerTraffic`, `TimeEstimate`, `Plan`) and the split of
calibration samples over ranks. The model behind the numbers: docs/planner.md."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace

from gptq_fsdp.config import CalibrationConfig, GPTQConfig
from gptq_fsdp.data import CalibrationDataError, near_equal_shares, rank_batches
from gptq_fsdp.planner.shapes import ModelShape

BACKENDS = ("fsdp2", "zero3")
DEVICE_TYPES = ("cuda", "cpu")
_CONFIG_FIELDS = frozenset(f.name for f in fields(GPTQConfig))
_CALIBRATION_FIELDS = frozenset(f.name for f in fields(CalibrationConfig))


def _read(*path: str) -> property:
    """A read-only attribute that follows `path` from the options (`_read("config", "batch_size")`)."""
    return property(lambda self: functools.reduce(getattr, path, self))


@dataclass(frozen=True)
class PlanOptions:
    """The run being planned: its `config` (samples, sequence length, batch size, order, activation
    offload, scale form; `GPTQConfig` checks them) and what only the planner needs: ranks, memory per
    GPU, backend, where the run computes (the Hessian's block layout depends on it) and the rates of
    the time model. `bandwidth_gbps` is in GB/s (10⁹ bytes per second per rank)."""

    world_size: int
    gpu_memory: int  # bytes
    config: GPTQConfig = field(default_factory=GPTQConfig.from_options)
    backend: str = "fsdp2"
    device_type: str = "cuda"
    # Parameter shards at rest in host memory (FSDP2 CPUOffloadPolicy, ZeRO-3 offload_param), copied
    # to the GPU layer by layer.
    param_offload: bool = False
    matmul_tflops: float = 400.0
    cholesky_tflops: float = 20.0
    bandwidth_gbps: float = 200.0
    host_bandwidth_gbps: float = 25.0  # host <-> GPU copies of offloaded shards
    column_latency_us: float = 25.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"device_type must be one of {DEVICE_TYPES}, got {self.device_type!r}")
        for name in ("world_size", "gpu_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("matmul_tflops", "cholesky_tflops", "bandwidth_gbps", "host_bandwidth_gbps", "column_latency_us"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    # The run configuration's values the models read, by the config's own names.
    num_samples = _read("config", "calibration", "num_samples")
    max_seq_length = _read("config", "calibration", "max_seq_length")
    batch_size = _read("config", "batch_size")
    offload_activations = _read("config", "offload_activations")
    true_sequential = _read("config", "true_sequential")
    # Act-order static or one scale per channel (else act-order none: GPTQ also inverts its factor).
    static_scales = _read("config", "static_scales")

    @property
    def expert_parallel(self) -> bool:
        """Expert-parallel calibration (`config.expert_parallel`): each routed token travels to the rank
        storing its expert, which alone holds that expert's weights and Hessians."""
        return self.config.expert_parallel

    def with_(self, **changes) -> PlanOptions:
        """A copy with some values changed, each by its own name: a field of these options, of the
        `GPTQConfig` (`true_sequential=`, `offload_activations=`) or of its calibration (`num_samples=`)."""
        calibration = {k: changes.pop(k) for k in list(changes) if k in _CALIBRATION_FIELDS}
        config = {k: changes.pop(k) for k in list(changes) if k in _CONFIG_FIELDS}
        if calibration:
            config["calibration"] = replace(config.get("calibration", self.config.calibration), **calibration)
        if config:
            changes["config"] = replace(changes.get("config", self.config), **config)
        return replace(self, **changes)


@dataclass
class RankMemory:
    """Bytes one rank holds; per-layer items are the largest over the layers."""

    rank: int
    shards: int  # on the GPU (0 when offloaded to host memory: `host_shards`)
    layer: int
    activations: int  # at rest (x2 while propagating)
    working: int  # forward working set of one batch
    hessians: int  # all groups of the layer, every rank (fused MoE experts: every slice's too)
    hessians_owned: int
    owned_weights: int  # gather + scatter buffers (ZeRO-3 experts: one slice's result all-gather)
    workspace: int  # GPTQ of its largest owned group or expert slice
    peak: int
    peak_phase: str
    peak_parts: dict[str, int]
    expert_hessians: int = 0  # the part of `hessians` that is the expert slices'
    host_shards: int = 0  # parameter shards in host memory (param_offload)
    dispatch: int = 0  # expert-parallel send, receive and expert output buffers of one batch
    # One layer's fused experts on the rank while it runs: its stored share, plus the whole experts
    # when the layer is unsharded with them (not expert-parallel).
    expert_weights: int = 0


@dataclass
class LayerTraffic:
    """Bytes moved for one decoder layer (one structure)."""

    hessian_reduce: int  # float64 sums reduced to owners
    weight_transfer: int  # gathered to owners + scattered back
    layer_gather: int  # received by every rank per all-gather of the layer
    gathers: int  # all-gathers of the layer per layer
    expert_reduce: int = 0  # float64 sums of the expert slices, reduced to their owners
    expert_gather: int = 0  # ZeRO-3: the slices' int8 results, received per rank (padded: an upper bound)
    dispatch: int = 0  # expert-parallel: routed hidden states sent to their experts' ranks and back, per rank


@dataclass
class TimeEstimate:
    """Seconds for the whole model, by component (docs/planner.md)."""

    forward: float
    xtx: float
    gathers: float
    gptq: float  # GPTQ phases, transfers overlapped
    expert_gptq: float = 0.0  # the part of `gptq` that quantizes fused MoE experts
    dispatch: float = 0.0  # expert-parallel: routed hidden states to their experts' ranks and back

    @property
    def total(self) -> float:
        return self.forward + self.xtx + self.gathers + self.gptq + self.dispatch


@dataclass
class Plan:
    shape: ModelShape
    options: PlanOptions
    ranks: list[RankMemory]
    samples_per_rank: list[int]
    batches: int  # forward calls per rank per pass
    owners: list[list[int]]  # per structure: owner of each group
    balance: list[float]  # per structure: max/mean predicted load from assign_owners
    traffic: list[LayerTraffic]  # per structure
    time: TimeEstimate
    problems: list[str] = field(default_factory=list)  # the package would refuse this run
    suggestions: list[str] = field(default_factory=list)
    # The same run in the other order (true-sequential or standard): estimated seconds and peak bytes;
    # None where that order is refused (activation offload or fused MoE experts with true-sequential).
    other_order: tuple[float, int] | None = None
    # Per structure with fused MoE experts (else None): the owner of every expert slice, parameter by
    # parameter, expert by expert, and max/mean of the owners' predicted GPTQ load.
    expert_owners: list[list[int] | None] = field(default_factory=list)
    expert_balance: list[float | None] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak <= self.options.gpu_memory

    @property
    def largest(self) -> int:
        """Index of the largest layer structure (by parameter count)."""
        return max(range(len(self.shape.structures)), key=lambda s: self.shape.structures[s].numel)


def split_samples(samples: int, world: int, batch_size: int) -> tuple[list[int], int, list[int], list[str]]:
    """Samples, most forward calls of a rank, and largest batch of each rank, as `data.rank_batches`
    splits them (and its reason to refuse the split, if any)."""
    try:
        split = [rank_batches(samples, rank, world, batch_size) for rank in range(world)]
    except CalibrationDataError as error:  # planned as if each rank ran its near-equal share of the samples
        per_rank = near_equal_shares(samples, world)
        return per_rank, math.ceil(max(per_rank) / batch_size), [min(n, batch_size) for n in per_rank], [str(error)]
    return [sum(map(len, b)) for b in split], max(map(len, split)), [max(map(len, b)) for b in split], []
