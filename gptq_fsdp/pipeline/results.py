"""What a run produced: per-module records (with the packed checkpoint tensors on their owners),
time per phase, memory per rank, and the tables printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.gptq import GPTQResult
from gptq_fsdp.distributed import Backend
from gptq_fsdp.io.packing import pack_modules
from gptq_fsdp.io.resume import LayerState

PHASES = ("capture", "forward", "hessian", "wait", "gptq", "propagate")


@dataclass
class ModuleRecord:
    """What GPTQ produced for one Linear or one expert's slice of a fused MoE parameter. `packed`
    (the checkpoint tensors) lives on its owner only."""

    name: str
    layer: int
    owner: int
    loss: float
    seconds: float  # GPTQ time of its Hessian group (shared by the group's members)
    damping: float
    group: list[str]
    packed: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    tokens: int = 0  # calibration tokens its Hessian was summed over (all ranks)
    # "own": its inputs' Hessian; "pooled": an expert with too few tokens, quantized with the Hessian of
    # the same projection over all of its layer's routed tokens (pipeline/owners.py)
    hessian: str = "own"


@dataclass
class MemoryStats:
    """Bytes this rank held, measured from the tensors themselves (parameters and GPTQ inputs)."""

    shard_bytes: int = 0  # this rank's parameter storage at rest
    layer_unsharded_bytes: int = 0  # largest whole-layer copy made for a forward (0 when nothing is copied)
    owned_weight_bytes: int = 0  # most bytes of gathered weight copies held at once for GPTQ
    hessian_bytes: int = 0  # most bytes of Hessian sums held at once
    activation_bytes: int = 0  # calibration hidden states on the compute device while a layer runs
    # MoE experts, per layer (most at once): the expert weights on this rank while the layer runs (its
    # stored rows plus the whole copy a forward unshards), their Hessian sums (part of hessian_bytes),
    # and expert-parallel dispatch buffers (tokens sent, received, expert outputs both ways).
    expert_weight_bytes: int = 0
    expert_hessian_bytes: int = 0
    dispatch_bytes: int = 0
    peak_rss_bytes: int = 0  # process peak resident set size

    @property
    def parameter_peak_bytes(self) -> int:
        return self.shard_bytes + self.layer_unsharded_bytes + self.owned_weight_bytes


@dataclass
class QuantizationResult:
    config: GPTQConfig
    backend: Backend
    quantized: list[str] = field(default_factory=list)  # every quantized Linear and expert slice, on every rank
    fused: list[str] = field(default_factory=list)  # the fused MoE parameters saved as per-expert tensors
    modules: dict[str, ModuleRecord] = field(default_factory=dict)  # this rank's; all of them on rank 0 at the end
    seconds: float = 0.0
    # Wall time per phase: capture, calibration forward, XᵀX (inside the forward), waiting for
    # collectives, GPTQ, propagation forward.
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    timeline: list[dict] = field(default_factory=list)  # this rank's (layer, group, event, start, end)
    memory: MemoryStats = field(default_factory=MemoryStats)
    memory_per_rank: list[MemoryStats] = field(default_factory=list)  # on rank 0
    state: LayerState | None = None  # per-layer resume state, cleared once the checkpoint is saved

    def record(
        self, layer: int, names: list[str], rows: list[int], gptq: GPTQResult, seconds: float, tokens: int,
        hessian: str = "own",
    ) -> list[torch.Tensor]:  # fmt: skip
        """Keep a group's GPTQ result as this rank's records of its members (packed for the
        checkpoint); their dequantized weights, in `names` order."""
        packed = pack_modules(gptq, names, rows, self.config.scheme)
        for module in packed:
            self.modules[module.name] = ModuleRecord(
                name=module.name,
                layer=layer,
                owner=self.backend.rank,
                loss=module.loss,
                seconds=seconds,
                damping=gptq.damping,
                group=list(names),
                packed=module.packed,
                tokens=tokens,
                hessian=hessian,
            )
        return [module.weight for module in packed]

    def memory_report(self) -> str:
        mib = 2**20
        lines = [
            "rank  shards MiB  +layer MiB  +owned W MiB  = params peak MiB  Hessians MiB  activations MiB  peak RSS MiB"
        ]
        per_rank = self.memory_per_rank or [self.memory]
        experts = any(m.expert_weight_bytes for m in per_rank)
        if experts:
            lines[0] += "  experts: weights MiB  Hessians MiB  dispatch MiB"
        for rank, m in enumerate(per_rank):
            lines.append(
                f"{rank:>4}  {m.shard_bytes / mib:>10.1f}  {m.layer_unsharded_bytes / mib:>10.1f}  "
                f"{m.owned_weight_bytes / mib:>12.1f}  {m.parameter_peak_bytes / mib:>16.1f}  "
                f"{m.hessian_bytes / mib:>12.1f}  {m.activation_bytes / mib:>15.1f}  {m.peak_rss_bytes / mib:>12.1f}"
            )
            if experts:
                lines[-1] += (
                    f"  {m.expert_weight_bytes / mib:>19.1f}  {m.expert_hessian_bytes / mib:>12.1f}  "
                    f"{m.dispatch_bytes / mib:>12.1f}"
                )
        return "\n".join(lines)

    def table(self) -> str:
        """Per-module loss and time, one line each."""
        width = max([len(n) for n in self.modules] + [6])
        lines = [
            f"{'module':<{width}}  {'layer':>5}  {'owner':>5}  {'tokens':>8}  {'hessian':>7}  {'loss':>12}  "
            f"{'damp':>6}  {'gptq s':>7}"
        ]
        position = {name: i for i, name in enumerate(self.quantized)}
        for r in sorted(self.modules.values(), key=lambda r: position[r.name]):
            lines.append(
                f"{r.name:<{width}}  {r.layer:>5}  {r.owner:>5}  {r.tokens:>8}  {r.hessian:>7}  {r.loss:>12.5g}  "
                f"{r.damping:>6.3g}  {r.seconds:>7.3f}"
            )
        lines.append(
            f"total wall time {self.seconds:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        )
        return "\n".join(lines)


class LayerError(RuntimeError):
    """Quantizing a decoder layer failed; the message names the rank and the layer."""
