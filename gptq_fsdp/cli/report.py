"""`gptq-fsdp plan` (will a sharded run fit, and how long will it take: from a config.json alone)
and `gptq-fsdp perplexity` (of a model folder, plain or quantized, on a text file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptq_fsdp.cli.common import add_config_options, config_from_args, fail, positive
from gptq_fsdp.config import DTYPES


def add_parsers(commands) -> None:
    p = commands.add_parser("perplexity", help="perplexity of a model (plain or quantized) on a text file")
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=positive(int), default=20480)
    p.add_argument("--window", type=positive(int), default=1024)
    p.add_argument("--threads", type=positive(int), default=None)

    plan = commands.add_parser(
        "plan", help="will a sharded run fit? memory per rank, traffic and time from a config.json (no weights)"
    )
    plan.add_argument("--model-config", type=Path, required=True, help="HF config.json, or a folder holding one")
    plan.add_argument("--world-size", type=positive(int), required=True, help="number of ranks (GPUs)")
    plan.add_argument("--gpu-memory", default="80GiB", help="memory per GPU: 80GiB, 80GB (decimal), 81920MiB")
    plan.add_argument("--backend", choices=["fsdp2", "zero3"], default="fsdp2")
    plan.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="where the run computes (Hessian block layout)"
    )
    plan.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    plan.add_argument(
        "--offload-param",
        action="store_true",
        help="parameter shards in host memory (FSDP2 CPUOffloadPolicy, ZeRO-3 offload_param)",
    )
    add_config_options(plan, quantizing=False)
    rates = plan.add_argument_group("rates")
    rates.add_argument("--matmul-tflops", type=positive(float), default=400.0, help="dense matmul rate per GPU")
    rates.add_argument("--cholesky-tflops", type=positive(float), default=20.0, help="Cholesky/inverse rate per GPU")
    rates.add_argument(
        "--bandwidth-gbps", type=positive(float), default=200.0, help="collective bandwidth per rank in GB/s (bytes)"
    )
    rates.add_argument(
        "--host-bandwidth-gbps", type=positive(float), default=25.0, help="host <-> GPU copies (--offload-param)"
    )
    rates.add_argument(
        "--column-latency-us",
        type=positive(float),
        default=25.0,
        help="GPTQ time per weight column beyond its FLOPs (H200: ~25 with act-order static, 110-150 with none)",
    )
    plan.set_defaults(threads=None)  # main() reads it


def perplexity_command(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_fsdp.evaluate import perplexity, text_tokens

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ppl = perplexity(model, text_tokens(tokenizer, args.text, args.tokens), args.window)
    print(f"perplexity {ppl:.4f} ({args.tokens} tokens of {args.text.name}, windows of {args.window})")


def plan_command(args: argparse.Namespace) -> None:
    """Print the plan; "DOES NOT FIT" and what would fit are part of the output, not an error."""
    from gptq_fsdp.core.scheme import GPTQError
    from gptq_fsdp.planner import PlanOptions, format_plan, parse_size, plan_from_config

    model_config = args.model_config
    if not (model_config.is_file() or (model_config / "config.json").is_file()):
        fail(f"{model_config} is neither a config.json nor a folder holding one")
    if args.gpu_memory.strip().replace(".", "", 1).isdigit() and parse_size(args.gpu_memory) < 2**30:
        fail(f"--gpu-memory {args.gpu_memory} would be {args.gpu_memory} bytes: give a unit, e.g. 80GiB or 80GB")
    try:
        planner_own = (
            "world_size",
            "backend",
            "matmul_tflops",
            "cholesky_tflops",
            "bandwidth_gbps",
            "host_bandwidth_gbps",
            "column_latency_us",
        )
        options = PlanOptions(
            gpu_memory=parse_size(args.gpu_memory),
            config=config_from_args(args),
            device_type=args.device,
            param_offload=args.offload_param,
            **{name: getattr(args, name) for name in planner_own},
        )
        result = plan_from_config(model_config, options, args.dtype)
    except (ValueError, GPTQError) as error:
        fail(str(error))
    print(format_plan(result))
