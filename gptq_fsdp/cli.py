"""`gptq-fsdp` command line: quantize a model folder into a compressed-tensors checkpoint; perplexity."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("gptq_fsdp")

_held_locks: list = []  # OutputLocks of the running command

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _scheme_bits(value: str) -> tuple[int, bool]:
    """'W4A16' -> (4, symmetric), 'W4A16_ASYM' -> (4, asymmetric)."""
    match = re.fullmatch(r"W([2-8])A16(_ASYM)?", value.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"unsupported scheme {value!r}: weight-only W2A16..W8A16, optionally _ASYM")
    return int(match.group(1)), match.group(2) is None


def _positive(kind, zero: bool = False):
    """A finite number > 0 (>= 0 with `zero`)."""

    def parse(value: str):
        number = kind(value)
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be positive{' or 0' if zero else ''} and finite, got {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptq-fsdp", description="GPTQ quantization into compressed-tensors.")
    # The deepspeed launcher inserts --local_rank=N before the subcommand.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a HF model folder with GPTQ and save a W*A16 checkpoint")
    q.add_argument("model", type=Path, help="HF model folder (config.json + safetensors)")
    q.add_argument("--output", "-o", type=Path, required=True, help="checkpoint folder to create")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    data = q.add_argument_group("calibration data")
    data.add_argument(
        "--dataset", required=True, help="local .txt/.json/.jsonl/.parquet file or folder, or a datasets name"
    )
    data.add_argument("--dataset-config", default=None, help="datasets configuration name")
    data.add_argument("--split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--messages-column", default="messages", help="chat messages column (chat template applied)")
    data.add_argument("--num-samples", type=_positive(int), default=128)
    data.add_argument("--max-seq-length", type=_positive(int), default=2048)
    data.add_argument("--no-pack", action="store_true", help="one padded sample per document instead of packing")
    data.add_argument("--seed", type=_positive(int, zero=True), default=0)
    data.add_argument("--batch-size", type=_positive(int), default=8, help="samples per forward call")
    scheme = q.add_argument_group("quantization")
    scheme.add_argument(
        "--scheme", type=_scheme_bits, default=(4, True), help="W4A16 (default), W8A16, W4A16_ASYM, ..."
    )
    scheme.add_argument("--bits", type=_positive(int), default=None, help="override the scheme's bits (2-8)")
    scheme.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point) quantization")
    scheme.add_argument(
        "--group-size", type=_positive(int, zero=True), default=128, help="columns per scale; 0 = one scale per channel"
    )
    scheme.add_argument("--actorder", default="static", choices=["static", "weight", "none", "group"])
    scheme.add_argument(
        "--dampening",
        type=_positive(float, zero=True),
        default=0.01,
        help="fraction of mean diag(H) added to H's diagonal",
    )
    scheme.add_argument("--block-size", type=_positive(int), default=128, help="GPTQ lazy-update block (columns)")
    scheme.add_argument("--targets", nargs="+", default=["Linear"], help="module classes, names or re: patterns")
    scheme.add_argument("--ignore", nargs="*", default=["lm_head"], help="modules left unquantized")
    run = q.add_argument_group("run")
    run.add_argument("--dtype", choices=list(DTYPES), default="auto", help="dtype to load the model in")
    run.add_argument("--device", default="cpu", help="device for a single-process run (cpu, cuda, cuda:1)")
    run.add_argument(
        "--backend",
        choices=["auto", "fsdp2", "zero3"],
        default="auto",
        help="multi-rank sharding: FSDP2 (default), or DeepSpeed ZeRO-3 (default under accelerate's DeepSpeed config)",
    )
    run.add_argument("--deepspeed-config", type=Path, default=None, help="ZeRO-3 JSON config (implies zero3)")
    run.add_argument("--resume", action="store_true", help="continue from the last layer recorded in OUTPUT.gptq_state")
    run.add_argument("--no-state", action="store_true", help="do not record per-layer state for --resume")
    run.add_argument(
        "--timeout", type=_positive(float), default=None, help="seconds a rank waits for the others (default 1800)"
    )
    run.add_argument("--offload-param", action="store_true", help="ZeRO-3: keep parameter partitions on CPU")
    run.add_argument(
        "--load",
        choices=["sharded", "rank0"],
        default="sharded",
        help="multi-rank: each rank reads only its shards (default), or rank 0 reads all and sends them",
    )
    run.add_argument(
        "--matmul-precision",
        default="highest",
        help="fp32 matmuls of the calibration forwards and XᵀX: highest = IEEE fp32 (exact, default); "
        "high = TF32 on GPUs; medium = bf16 products, fp32 accumulation (GPUs, AMX CPUs; much faster). "
        "GPTQ itself always runs in fp32; 16-bit activations lose nothing in XᵀX at any setting",
    )
    run.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep calibration activations in pinned CPU memory between layers, one batch on the GPU at a time",
    )
    run.add_argument(
        "--true-sequential",
        action="store_true",
        help="quantize each Hessian group inside the layer's forward, on the outputs of the groups already "
        "quantized: one forward per layer instead of two (every batch's activations held until the layer ends)",
    )
    run.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads")
    run.add_argument("-v", "--verbose", action="store_true")

    p = commands.add_parser("perplexity", help="perplexity of a model (plain or quantized) on a text file")
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=_positive(int), default=20480)
    p.add_argument("--window", type=_positive(int), default=1024)
    p.add_argument("--threads", type=_positive(int), default=None)

    plan = commands.add_parser(
        "plan", help="will a sharded run fit? memory per rank, traffic and time from a config.json (no weights)"
    )
    plan.add_argument("--model-config", type=Path, required=True, help="HF config.json, or a folder holding one")
    plan.add_argument("--world-size", type=_positive(int), required=True, help="number of ranks (GPUs)")
    plan.add_argument("--gpu-memory", default="80GiB", help="memory per GPU: 80GiB, 80GB (decimal), 81920MiB")
    plan.add_argument("--samples", type=_positive(int), default=128, help="calibration samples")
    plan.add_argument("--seq-len", type=_positive(int), default=2048, help="tokens per sample")
    plan.add_argument("--backend", choices=["fsdp2", "zero3"], default="fsdp2")
    plan.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="where the run computes (Hessian block layout)"
    )
    plan.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    plan.add_argument(
        "--group-size", type=_positive(int, zero=True), default=128, help="columns per scale; 0 = one scale per channel"
    )
    plan.add_argument(
        "--actorder",
        default="static",
        choices=["static", "weight", "none", "group"],
        help="as for quantizing: none/group compute scales during GPTQ, which then also inverts its factor",
    )
    plan.add_argument("--batch-size", type=_positive(int), default=8, help="samples per forward call")
    plan.add_argument(
        "--offload-activations", action="store_true", help="what-if: keep only one batch of activations on the GPU"
    )
    plan.add_argument(
        "--true-sequential", action="store_true", help="plan a --true-sequential run (one forward per layer)"
    )
    plan.add_argument("--matmul-tflops", type=_positive(float), default=400.0, help="dense matmul rate per GPU")
    plan.add_argument("--cholesky-tflops", type=_positive(float), default=20.0, help="Cholesky/inverse rate per GPU")
    plan.add_argument(
        "--bandwidth-gbps", type=_positive(float), default=200.0, help="collective bandwidth per rank in GB/s (bytes)"
    )
    plan.add_argument(
        "--column-latency-us",
        type=_positive(float),
        default=25.0,
        help="GPTQ time per weight column beyond its FLOPs (H200: ~25 with act-order static, 110-150 with none)",
    )
    plan.set_defaults(threads=None)  # main() reads it
    return parser


def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank has the same to say; one says it
        print(f"gptq-fsdp: {message}", file=sys.stderr)


def _fail(message: str) -> None:
    _say(f"error: {message}")
    raise SystemExit(2)


def _check_weight_files(model_dir: Path) -> None:
    """Every safetensors file's header reads and its tensors lie inside the file (a truncated or
    garbled file is named here, before any weight is read)."""
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):  # other formats are transformers' to read
        try:
            with safe_open(str(file), "pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own SafetensorError
            _fail(f"{file} is not a readable safetensors file ({error})")


def quantize_command(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_fsdp.config import GPTQConfig
    from gptq_fsdp.core.scheme import GPTQError
    from gptq_fsdp.data import build_calibration, load_texts
    from gptq_fsdp.distributed.launch import LaunchError, init_distributed, use_zero3
    from gptq_fsdp.io.checkpoint import save_quantized
    from gptq_fsdp.io.output import OutputLock, check_output_dir
    from gptq_fsdp.model.layers import target_modules

    zero3 = args.backend == "zero3" or args.deepspeed_config is not None or (args.backend == "auto" and use_zero3())
    try:
        world = init_distributed(deepspeed_comm=zero3, timeout_s=args.timeout)
    except LaunchError as error:
        _fail(str(error))
    # Everything cheap is checked before the model is loaded.
    if not (args.model / "config.json").is_file():
        _fail(f"{args.model} is not a HF model folder (no config.json)")
    inputs = {"model folder": args.model}
    if Path(args.dataset).exists():
        inputs["calibration data"] = Path(args.dataset)
    problem = None
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, released when main() returns
            lock = OutputLock(args.output)
            _held_locks.append(lock)
            lock.acquire()  # first: it may put back a checkpoint that an interrupted save moved aside
        args.output = check_output_dir(args.output, args.overwrite, inputs)
    except (FileExistsError, FileNotFoundError, PermissionError) as error:
        problem = str(error)
    if world > 1:  # rank 0's lock decides for all
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        _fail(problem)
    bits, symmetric = args.scheme
    try:
        config = GPTQConfig.from_options(
            bits=bits if args.bits is None else args.bits,
            group_size=args.group_size or None,
            symmetric=symmetric and not args.asymmetric,
            actorder=args.actorder,
            targets=args.targets,
            ignore=args.ignore,
            dampening_frac=args.dampening,
            block_size=args.block_size,
            batch_size=args.batch_size,
            matmul_precision=args.matmul_precision,
            offload_activations=args.offload_activations,
            true_sequential=args.true_sequential,
        )
    except GPTQError as error:
        _fail(str(error))

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:  # JSON that does not parse, an unknown model type
        _fail(f"{args.model / 'config.json'} cannot be read: {error}")
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        _fail(f"{args.model} is a '{model_config.model_type}' model, not a causal language model")
    positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and args.max_seq_length > positions:
        _fail(f"--max-seq-length {args.max_seq_length} is longer than the {positions} positions of {args.model}")
    _check_weight_files(args.model)
    if args.backend == "fsdp2" and world == 1:
        _fail("--backend fsdp2 needs several processes: launch with torchrun/accelerate (WORLD_SIZE is 1)")
    # Layers, targets and group sizes are checked on a weightless (meta) copy before any weight is read.
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    try:
        target_modules(skeleton, config)
        if world > 1 and not zero3 and args.load == "sharded":
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            from gptq_fsdp.distributed.loading import parameters_in_files

            skeleton.tie_weights()  # as the sharded loader does: a tied lm_head is not in the files
            parameters_in_files(skeleton, HuggingFaceStorageReader(str(args.model)))
    except (GPTQError, LaunchError) as error:
        _fail(str(error))
    del skeleton
    if args.num_samples < world:
        _fail(f"{args.num_samples} calibration samples cannot be split across {world} ranks")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        _fail(f"no usable tokenizer in {args.model} (calibration text needs one): {error}")
    try:
        texts = load_texts(
            args.dataset,
            split=args.split,
            config_name=args.dataset_config,
            text_column=args.text_column,
            messages_column=args.messages_column,
            tokenizer=tokenizer,
        )
        calibration = build_calibration(
            texts,
            tokenizer,
            num_samples=args.num_samples,
            max_seq_length=args.max_seq_length,
            seed=args.seed,
            pack=not args.no_pack,
        )
    except ValueError as error:
        _fail(str(error))

    if zero3:
        from gptq_fsdp.distributed.launch import zero3_config
        from gptq_fsdp.distributed.loading import load_zero3

        loader = functools.partial(load_zero3, config=zero3_config(args.deepspeed_config, args.offload_param))
    elif world > 1:
        from gptq_fsdp.distributed.launch import FSDPSettings
        from gptq_fsdp.distributed.loading import load_rank0_broadcast, load_sharded

        settings = FSDPSettings.from_env()
        loader = functools.partial(load_sharded if args.load == "sharded" else load_rank0_broadcast, settings=settings)
    else:
        from gptq_fsdp.distributed.loading import load_pretrained

        def loader(model_dir, dtype):
            return load_pretrained(model_dir, dtype).to(args.device)

    try:
        model = loader(args.model, DTYPES[args.dtype])
    except LaunchError as error:  # the files do not match the config (every rank learns it)
        _fail(str(error))

    from gptq_fsdp.io.resume import ResumeError
    from gptq_fsdp.pipeline import LayerError, quantize_model

    start = time.perf_counter()
    state_dir = None if args.no_state else Path(f"{args.output}.gptq_state")
    try:
        result = quantize_model(model, calibration, config, state_dir=state_dir, resume=args.resume)
        quantize_seconds = time.perf_counter() - start
        save_start = time.perf_counter()
        save_quantized(model, args.output, result, tokenizer=tokenizer, overwrite=args.overwrite)
    except (GPTQError, ResumeError) as error:  # bad weights, another run's state, a refused save: every rank alike
        _fail(str(error))
    except (LayerError, OSError) as error:  # a numerical fault, a dead/hung rank, a full disk
        print(f"gptq-fsdp: error: {error}", file=sys.stderr)  # every rank: each may see a different cause
        raise SystemExit(1) from error
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's preemption, see main)
        kept = f"the finished layers are kept in {state_dir}: the same command with --resume continues"
        _say(f"interrupted; {kept if state_dir is not None and state_dir.exists() else 'nothing was saved'}")
        raise SystemExit(130) from None
    if result.backend.rank == 0:
        print(result.table())
        print(result.memory_report())
        print(
            f"quantized {len(result.modules)} modules on {world} rank(s) ({result.backend.name}) in "
            f"{quantize_seconds:.1f} s, saved to {args.output} in {time.perf_counter() - save_start:.1f} s"
        )


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
    from gptq_fsdp.planner import DTYPES as PLAN_DTYPES
    from gptq_fsdp.planner import PlanOptions, format_plan, load_model_shape, parse_size, plan

    config = args.model_config
    if not (config.is_file() or (config / "config.json").is_file()):
        _fail(f"{config} is neither a config.json nor a folder holding one")
    try:
        options = PlanOptions(
            world_size=args.world_size,
            gpu_memory=parse_size(args.gpu_memory),
            samples=args.samples,
            seq_len=args.seq_len,
            backend=args.backend,
            batch_size=args.batch_size,
            offload_activations=args.offload_activations,
            matmul_tflops=args.matmul_tflops,
            cholesky_tflops=args.cholesky_tflops,
            column_latency_us=args.column_latency_us,
            bandwidth_gbps=args.bandwidth_gbps,
            static_scales=args.actorder in ("static", "weight") or args.group_size == 0,
            true_sequential=args.true_sequential,
            device_type=args.device,
        )
        shape = load_model_shape(config, PLAN_DTYPES[args.dtype], args.group_size or None)
    except (ValueError, GPTQError) as error:
        _fail(str(error))
    print(format_plan(plan(shape, options)))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # a preempting scheduler's SIGTERM acts as Ctrl-C
        previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        {"quantize": quantize_command, "perplexity": perplexity_command, "plan": plan_command}[args.command](args)
    except KeyboardInterrupt:  # outside the quantize loop (which says where its state is)
        _say("interrupted")
        raise SystemExit(130) from None
    finally:
        while _held_locks:
            _held_locks.pop().release()
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
