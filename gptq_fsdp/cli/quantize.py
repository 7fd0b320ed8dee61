"""`gptq-fsdp quantize`: a HF model folder into a compressed-tensors checkpoint, on one process or
every rank of a launch. Everything cheap is checked before the model is loaded."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

from gptq_fsdp.cli.common import add_config_options, config_from_args, fail, positive, say
from gptq_fsdp.config import DTYPES

held_locks: list = []  # OutputLocks of the running command, released by main()


def add_parser(commands) -> None:
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
    add_config_options(q, quantizing=True)
    run = q.add_argument_group("run")
    run.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="dtype to load the model in")
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
        "--timeout", type=positive(float), default=None, help="seconds a rank waits for the others (default 1800)"
    )
    run.add_argument("--offload-param", action="store_true", help="ZeRO-3: keep parameter partitions on CPU")
    run.add_argument(
        "--load",
        choices=["sharded", "rank0"],
        default="sharded",
        help="multi-rank: each rank reads only its shards (default), or rank 0 reads all and sends them",
    )
    run.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    run.add_argument("-v", "--verbose", action="store_true")


def _check_weight_files(model_dir: Path) -> None:
    """Every safetensors file's header reads and its tensors lie inside the file (a truncated or
    garbled file is named here, before any weight is read)."""
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):  # other formats are transformers' to read
        try:
            with safe_open(str(file), "pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own SafetensorError
            fail(f"{file} is not a readable safetensors file ({error})")


def quantize_command(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_fsdp.core.scheme import GPTQError
    from gptq_fsdp.data import CalibrationDataError, load_texts, rank_batches
    from gptq_fsdp.distributed.launch import LaunchError, init_distributed, use_zero3
    from gptq_fsdp.io.checkpoint import save_quantized
    from gptq_fsdp.io.output import OutputLock, check_output_dir
    from gptq_fsdp.model.layers import target_experts, target_modules

    zero3 = args.backend == "zero3" or args.deepspeed_config is not None or (args.backend == "auto" and use_zero3())
    try:
        world = init_distributed(deepspeed_comm=zero3, timeout_s=args.timeout)
    except LaunchError as error:
        fail(str(error))
    # Everything cheap is checked before the model is loaded.
    if not (args.model / "config.json").is_file():
        fail(f"{args.model} is not a HF model folder (no config.json)")
    inputs = {"model folder": args.model}
    if Path(args.dataset).exists():
        inputs["calibration data"] = Path(args.dataset)
    problem = None
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, released when main() returns
            lock = OutputLock(args.output)
            held_locks.append(lock)
            lock.acquire()  # first: it may put back a checkpoint that an interrupted save moved aside
        args.output = check_output_dir(args.output, args.overwrite, inputs)
    except (FileExistsError, FileNotFoundError, PermissionError) as error:
        problem = str(error)
    if world > 1:  # rank 0's lock decides for all
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        fail(problem)
    try:
        config = config_from_args(args)
    except GPTQError as error:
        fail(str(error))

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:  # JSON that does not parse, an unknown model type
        fail(f"{args.model / 'config.json'} cannot be read: {error}")
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        fail(f"{args.model} is a '{model_config.model_type}' model, not a causal language model")
    positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and args.max_seq_length > positions:
        fail(f"--max-seq-length {args.max_seq_length} is longer than the {positions} positions of {args.model}")
    _check_weight_files(args.model)
    if args.backend == "fsdp2" and world == 1:
        fail("--backend fsdp2 needs several processes: launch with torchrun/accelerate (WORLD_SIZE is 1)")
    # Layers, targets and group sizes are checked on a weightless (meta) copy before any weight is read.
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    try:
        target_modules(skeleton, config)
        experts = any(target_experts(skeleton, config))
        if experts and args.resume:
            raise GPTQError("--resume does not restore quantized MoE experts yet: run without --resume")
        if experts and config.expert_parallel and zero3:
            raise GPTQError(
                "--expert-parallel needs each expert whole on one rank: FSDP2 (ZeRO-3's flat partitions cut "
                "through experts); drop --expert-parallel under ZeRO-3"
            )
        if world > 1 and not zero3 and args.load == "sharded":
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            from gptq_fsdp.distributed.loading import tensors_in_files

            skeleton.tie_weights()  # as the sharded loader does: a tied lm_head is not in the files
            tensors_in_files(skeleton, HuggingFaceStorageReader(str(args.model)))
    except (GPTQError, LaunchError) as error:
        fail(str(error))
    del skeleton
    try:  # the batches every rank runs (the same at any world size): refused here, before any weight is read
        rank_batches(args.num_samples, 0, world, args.batch_size)
    except CalibrationDataError as error:
        fail(str(error))
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        fail(f"no usable tokenizer in {args.model} (calibration text needs one): {error}")
    try:
        texts = load_texts(
            args.dataset,
            split=args.split,
            config_name=args.dataset_config,
            text_column=args.text_column,
            messages_column=args.messages_column,
            tokenizer=tokenizer,
        )
        calibration = config.calibration.build(texts, tokenizer)
    except ValueError as error:
        fail(str(error))

    if zero3:
        from gptq_fsdp.distributed.launch import zero3_config
        from gptq_fsdp.distributed.loading import load_zero3

        loader = functools.partial(load_zero3, config=zero3_config(args.deepspeed_config, args.offload_param))
    elif world > 1:
        from gptq_fsdp.distributed.launch import FSDPSettings
        from gptq_fsdp.distributed.loading import load_rank0_broadcast, load_sharded

        settings = FSDPSettings.from_env()
        settings.expert_parallel = config.expert_parallel
        loader = functools.partial(load_sharded if args.load == "sharded" else load_rank0_broadcast, settings=settings)
    else:
        from gptq_fsdp.distributed.loading import load_pretrained

        def loader(model_dir, dtype):
            return load_pretrained(model_dir, dtype).to(args.device)

    try:
        model = loader(args.model, "auto" if args.dtype == "auto" else DTYPES[args.dtype])
    except LaunchError as error:  # the files do not match the config (every rank learns it)
        fail(str(error))

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
        fail(str(error))
    except (LayerError, OSError) as error:  # a numerical fault, a dead/hung rank, a full disk
        print(f"gptq-fsdp: error: {error}", file=sys.stderr)  # every rank: each may see a different cause
        raise SystemExit(1) from error
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's preemption, see main)
        kept = f"the finished layers are kept in {state_dir}: the same command with --resume continues"
        say(f"interrupted; {kept if state_dir is not None and state_dir.exists() else 'nothing was saved'}")
        raise SystemExit(130) from None
    if result.backend.rank == 0:
        print(result.table())
        print(result.memory_report())
        print(
            f"quantized {len(result.modules)} modules on {world} rank(s) ({result.backend.name}) in "
            f"{quantize_seconds:.1f} s, saved to {args.output} in {time.perf_counter() - save_start:.1f} s"
        )
