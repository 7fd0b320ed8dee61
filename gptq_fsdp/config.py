"""One run configuration: what to quantize and how (a compressed-tensors QuantizationScheme plus
GPTQ's own knobs) and how calibration text becomes samples. The Python API, the CLI, `GPTQCallback`
and the planner all take it; `GPTQConfig.from_options` spells it with the CLI's option names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)

from gptq_fsdp.core.linalg import MATMUL_PRECISIONS
from gptq_fsdp.core.scheme import OBSERVER_DEFAULTS, OBSERVERS, GPTQError, validate_args

ACTORDER_CHOICES = ("none", "static", "weight")
SCALE_SEARCHES = OBSERVERS  # "minmax", "mse", "imatrix_mse": compressed-tensors' `observer` names them
EXPERT_CALIBRATIONS = ("routed", "all_tokens")
# Model dtypes by the names the CLI takes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CalibrationConfig:
    """How calibration text becomes samples (`data.build_calibration`): `num_samples` of
    `max_seq_length` tokens, packed (documents joined and cut) or one padded sample per document,
    chosen with `seed`."""

    num_samples: int = 128
    max_seq_length: int = 2048
    seed: int = 0
    pack: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_seq_length < 1 or self.seed < 0:
            raise GPTQError(
                f"num_samples and max_seq_length must be positive and seed >= 0, got {self.num_samples}, "
                f"{self.max_seq_length}, {self.seed}"
            )

    def build(self, texts: list[str], tokenizer):
        """The `CalibrationSet` of these settings from `texts`."""
        from gptq_fsdp.data import build_calibration

        return build_calibration(texts, tokenizer, **asdict(self))


@dataclass
class GPTQConfig:
    """GPTQ settings. `scheme.weights` holds bits, symmetry, strategy, group size and act-order."""

    scheme: QuantizationScheme
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    dampening_frac: float = 0.01
    block_size: int = 128
    batch_size: int = 8
    # fp32 matmuls in the calibration forwards and XᵀX (torch.set_float32_matmul_precision); GPTQ
    # itself always runs in IEEE fp32. "highest" is exact; "medium" uses bf16 products where the
    # hardware has them (much faster on GPUs and AMX CPUs, activations rounded to bf16).
    matmul_precision: str = "highest"
    # Keep the calibration hidden states in (pinned) CPU memory between layers, one batch on the device.
    offload_activations: bool = False
    # Quantize each Hessian group inside the layer's one forward, right before its first Linear runs,
    # from inputs that the already-quantized groups produced (GPTQ's "true sequential"): one forward
    # per layer instead of two. Every batch's forward is paused there, so all batches' activations are
    # held until the layer's forwards end (hence not with offload_activations).
    true_sequential: bool = False
    # Which tokens calibrate each MoE expert: "routed" (the tokens the router sends it, as the model
    # runs) or "all_tokens" (every token of the layer, the layer's output still gated as the model
    # computes it; llm-compressor's moe_calibrate_all_experts). See docs/design.md, "MoE experts".
    expert_calibration: str = "routed"
    # Expert-parallel calibration (FSDP2, several ranks): each MoE experts module stays sharded, whole
    # experts on each rank, and each routed token travels to its expert's rank, which alone holds that
    # expert's Hessians (distributed/expert_parallel.py). The result is the same.
    expert_parallel: bool = False
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.scheme.weights is None:
            raise GPTQError("the quantization scheme has no weight quantization")
        if self.scheme.input_activations is not None or self.scheme.output_activations is not None:
            raise GPTQError("only weight-only schemes (WxA16) are supported")
        if not 0 <= self.dampening_frac <= 1:  # also refuses nan and inf
            raise GPTQError(
                f"dampening_frac is the fraction of mean diag(H) added to H's diagonal: it must be in [0, 1] "
                f"(0.01 is usual), got {self.dampening_frac}"
            )
        if self.block_size < 1 or self.batch_size < 1:
            raise GPTQError("block_size and batch_size must be positive")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise GPTQError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
        if self.expert_calibration not in EXPERT_CALIBRATIONS:
            raise GPTQError(f"expert_calibration must be one of {EXPERT_CALIBRATIONS}, got {self.expert_calibration!r}")
        if self.expert_parallel and self.expert_calibration == "all_tokens":
            raise GPTQError(
                "expert-parallel calibration sends each token to the experts it is routed to, and all-tokens "
                "calibration runs every expert on every token: use one of the two"
            )
        if self.true_sequential and self.offload_activations:
            # Each batch's forward holds its input (fetched to the device) and intermediates while paused.
            raise GPTQError(
                "offload_activations keeps one batch of activations on the device at a time, but "
                "true_sequential keeps every batch's forward (its input and intermediates) on the device "
                "until the layer's forwards end, so offloading would save nothing: use one of the two"
            )
        # Group size vs. columns is checked per module once the model is known.
        validate_args(self.weights, columns=self.weights.group_size or 1, name="scheme")

    @property
    def weights(self) -> QuantizationArgs:
        assert self.scheme.weights is not None
        return self.scheme.weights

    @property
    def targets(self) -> list[str]:
        return list(self.scheme.targets)

    @property
    def scale_search(self) -> str:
        """How the scales are chosen: the scheme's `observer` ("minmax" when unset; docs/design.md)."""
        return self.weights.observer or "minmax"

    @property
    def static_scales(self) -> bool:
        """Scales fixed before GPTQ (one per channel, or act-order static): GPTQ's one-Cholesky form."""
        return self.weights.strategy == QuantizationStrategy.CHANNEL or self.weights.actorder is not None

    @classmethod
    def from_options(
        cls,
        *,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = True,
        actorder: str = "static",
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        dampening_frac: float = 0.01,
        block_size: int = 128,
        batch_size: int = 8,
        matmul_precision: str = "highest",
        offload_activations: bool = False,
        true_sequential: bool = False,
        expert_calibration: str = "routed",
        expert_parallel: bool = False,
        scale_search: str = "imatrix_mse",
        num_samples: int = 128,
        max_seq_length: int = 2048,
        seed: int = 0,
        pack: bool = True,
    ) -> GPTQConfig:
        """W{bits}A16: group strategy when `group_size` is given, else one scale per output channel.
        `scale_search` is the scheme's `observer`: "imatrix_mse" (the default: docs/design.md says why),
        "mse" or "minmax", the search's settings written out as its `observer_kwargs` (so the checkpoint
        says what was searched)."""
        if actorder == "group":
            raise GPTQError(
                "act-order 'group' (a g_idx per column) was removed from compressed-tensors 0.20, so its "
                "checkpoints cannot be loaded; use 'static' (same ordering benefit, no g_idx)"
            )
        if actorder not in ACTORDER_CHOICES:
            raise GPTQError(f"actorder must be one of {ACTORDER_CHOICES}, got {actorder!r}")
        if scale_search not in SCALE_SEARCHES:
            raise GPTQError(f"scale_search must be one of {SCALE_SEARCHES}, got {scale_search!r}")
        try:
            weights = QuantizationArgs(
                num_bits=bits,
                type=QuantizationType.INT,
                symmetric=symmetric,
                strategy=QuantizationStrategy.GROUP if group_size else QuantizationStrategy.CHANNEL,
                group_size=group_size or None,
                actorder=None if actorder == "none" else actorder,
                observer=scale_search,
                observer_kwargs=dict(OBSERVER_DEFAULTS.get(scale_search, {})),
            )
        except ValueError as error:
            raise GPTQError(f"invalid quantization options: {error}") from error
        return cls(
            scheme=QuantizationScheme(targets=targets or ["Linear"], weights=weights),
            ignore=["lm_head"] if ignore is None else ignore,
            dampening_frac=dampening_frac,
            block_size=block_size,
            batch_size=batch_size,
            matmul_precision=matmul_precision,
            offload_activations=offload_activations,
            true_sequential=true_sequential,
            expert_calibration=expert_calibration,
            expert_parallel=expert_parallel,
            calibration=CalibrationConfig(num_samples, max_seq_length, seed, pack),
        )
