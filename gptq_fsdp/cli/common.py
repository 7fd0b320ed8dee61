"""What the subcommands share: option parsing, the run configuration from the options, messages."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from gptq_fsdp.config import GPTQConfig


def scheme_bits(value: str) -> tuple[int, bool]:
    """'W4A16' -> (4, symmetric), 'W4A16_ASYM' -> (4, asymmetric)."""
    match = re.fullmatch(r"W([2-8])A16(_ASYM)?", value.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"unsupported scheme {value!r}: weight-only W2A16..W8A16, optionally _ASYM")
    return int(match.group(1)), match.group(2) is None


def positive(kind, zero: bool = False):
    """A finite number > 0 (>= 0 with `zero`)."""

    def parse(value: str):
        number = kind(value)
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be positive{' or 0' if zero else ''} and finite, got {value}")
        return number

    return parse


def add_config_options(parser: argparse.ArgumentParser, *, quantizing: bool) -> None:
    """The run configuration's options, spelled the same for `quantize` and `plan` (`quantizing`
    adds the ones that change no planned figure: scheme details, damping, scale search, targets,
    matmul precision)."""
    size = parser.add_argument_group("calibration")
    size.add_argument("--num-samples", "--samples", type=positive(int), default=128, help="calibration samples")
    size.add_argument("--max-seq-length", "--seq-len", type=positive(int), default=2048, help="tokens per sample")
    size.add_argument("--batch-size", type=positive(int), default=8, help="samples per forward call")
    scheme = parser.add_argument_group("quantization")
    scheme.add_argument(
        "--group-size", type=positive(int, zero=True), default=128, help="columns per scale; 0 = one scale per channel"
    )
    scheme.add_argument(
        "--actorder",
        default="static",
        choices=["static", "weight", "none", "group"],
        help="act-order: static/weight take the scales from the original weight up front (fast GPTQ); none "
        "computes each group's scale when GPTQ reaches it; group is refused (compressed-tensors cannot load it)",
    )
    order = parser.add_argument_group("order and memory")
    order.add_argument(
        "--true-sequential",
        action="store_true",
        help="quantize each Hessian group inside the layer's forward, on the outputs of the groups already "
        "quantized: one forward per layer instead of two (every batch's activations held until the layer ends)",
    )
    order.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep calibration activations in pinned CPU memory between layers, one batch on the GPU at a time",
    )
    order.add_argument(
        "--expert-calibration",
        choices=["routed", "all-tokens"],
        default="routed",
        help="tokens that calibrate each MoE expert: routed = those its router sends it (default); all-tokens = "
        "every token of the layer (outputs still gated; E/top-k times the expert compute, one shared gate/up Hessian)",
    )
    order.add_argument(
        "--expert-parallel",
        action="store_true",
        help="MoE under FSDP2: each rank keeps its own experts (never unsharded) and the routed tokens travel to "
        "them; a rank holds only its own experts' Hessians (same result)",
    )
    if not quantizing:
        return
    size.add_argument("--no-pack", action="store_true", help="one padded sample per document instead of packing")
    size.add_argument("--seed", type=positive(int, zero=True), default=0, help="which samples the text gives")
    scheme.add_argument("--scheme", type=scheme_bits, default=(4, True), help="W4A16 (default), W8A16, W4A16_ASYM, ...")
    scheme.add_argument("--bits", type=positive(int), default=None, help="override the scheme's bits (2-8)")
    scheme.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point) quantization")
    scheme.add_argument(
        "--dampening",
        type=positive(float, zero=True),
        default=0.01,
        help="fraction of mean diag(H) added to H's diagonal",
    )
    scheme.add_argument(
        "--scale-search",
        choices=["minmax", "mse", "imatrix-mse"],
        default="imatrix-mse",
        help="how each group's scale is chosen: imatrix-mse (default) = of 20 shrunk ranges (1 to 0.05) the one "
        "with the least Σ diag(H)·|w - q(w)|^3; mse = 20 candidates, 1 to 0.81, least Σ|w - q(w)|^2.5; minmax = "
        "the group's min-max range (llm-compressor's observers of those names; recorded in the checkpoint)",
    )
    scheme.add_argument("--block-size", type=positive(int), default=128, help="GPTQ lazy-update block (columns)")
    scheme.add_argument("--targets", nargs="+", default=["Linear"], help="module classes, names or re: patterns")
    scheme.add_argument("--ignore", nargs="*", default=["lm_head"], help="modules left unquantized")
    order.add_argument(
        "--matmul-precision",
        default="highest",
        help="fp32 matmuls of the calibration forwards and XᵀX: highest = IEEE fp32 (exact, default); "
        "high = TF32 on GPUs; medium = bf16 products, fp32 accumulation (GPUs, AMX CPUs; much faster). "
        "GPTQ itself always runs in fp32; 16-bit activations lose nothing in XᵀX at any setting",
    )


def config_from_args(args: argparse.Namespace) -> GPTQConfig:
    """The run configuration the options of `add_config_options` describe (GPTQError if invalid)."""
    # Options named as GPTQConfig.from_options names its keywords.
    same = ["actorder", "batch_size", "offload_activations", "true_sequential", "expert_parallel", "num_samples"]
    same += ["max_seq_length"]
    if hasattr(args, "scheme"):  # quantize
        same += ["targets", "ignore", "block_size", "matmul_precision", "seed"]
    options = {name: getattr(args, name) for name in same}
    options["group_size"] = args.group_size or None
    options["expert_calibration"] = args.expert_calibration.replace("-", "_")
    if hasattr(args, "scheme"):
        bits, symmetric = args.scheme
        options.update(
            bits=bits if args.bits is None else args.bits,
            symmetric=symmetric and not args.asymmetric,
            dampening_frac=args.dampening,
            pack=not args.no_pack,
            scale_search=args.scale_search.replace("-", "_"),
        )
    return GPTQConfig.from_options(**options)


def say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank has the same to say; one says it
        print(f"gptq-fsdp: {message}", file=sys.stderr)


def fail(message: str) -> None:
    say(f"error: {message}")
    raise SystemExit(2)
