"""Run under torchrun by the sharded tests: load a model into FSDP2 shards or ZeRO-3 partitions,
quantize, save, report.

torchrun --nproc_per_node N tests/fsdp_worker.py MODEL_DIR OUTPUT_DIR REPORT.json --load sharded|rank0|zero3
torchrun --nproc_per_node N tests/fsdp_worker.py --jobs JOBS.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, load_texts, quantize_model, save_quantized
from gptq_fsdp.distributed.launch import FSDPSettings, init_distributed, zero3_config
from gptq_fsdp.distributed.loading import load_rank0_broadcast, load_sharded, load_zero3
from gptq_fsdp.model.layers import find_decoder_layers


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--load", choices=["sharded", "rank0", "zero3", "zero3-offload"], default="sharded")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--no-pack", action="store_true", help="one padded sample per document")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--matmul-precision", default="highest")
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--expert-calibration", default="routed")
    parser.add_argument("--expert-parallel", action="store_true")
    parser.add_argument("--wrap-experts", action="store_true", help="experts modules fully_shard'ed on their own")
    parser.add_argument("--targets", nargs="+", default=None)
    parser.add_argument("--ignore", nargs="+", default=None)
    parser.add_argument("--group-size", type=int, default=32, help="0: one scale per output channel")
    parser.add_argument("--scale-search", default=None, help="default: the package's")
    return parser


def main() -> None:
    """One job (its arguments), or `--jobs FILE`: the jobs a JSON list of argument lists holds, one
    after another in this one launch (sharded_helpers.run_workers)."""
    argv = sys.argv[1:]
    jobs = json.loads(Path(argv[1]).read_text()) if argv[:1] == ["--jobs"] else [argv]
    # ZeRO-3 jobs last: once a ZeRO-3 model is made, transformers keeps DeepSpeed's config as a global
    # (HfDeepSpeedConfig), and the models made after it would be built under zero.Init.
    runs = sorted((parser().parse_args(job) for job in jobs), key=lambda args: args.load.startswith("zero3"))
    torch.set_num_threads(1)
    init_distributed(deepspeed_comm=any(args.load.startswith("zero3") for args in runs))
    for args in runs:
        run(args)


def run(args: argparse.Namespace) -> None:
    zero3 = args.load.startswith("zero3")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = load_texts(str(args.text))
    pack = not args.no_pack
    calibration = build_calibration(texts, tokenizer, num_samples=args.samples, max_seq_length=32, pack=pack)
    if zero3:
        model = load_zero3(args.model, config=zero3_config(offload_param=args.load == "zero3-offload")).module
    else:
        settings = FSDPSettings(expert_parallel=args.expert_parallel or args.wrap_experts)
        model = (load_sharded if args.load == "sharded" else load_rank0_broadcast)(args.model, settings=settings)
    config = GPTQConfig.from_options(
        group_size=args.group_size or None,
        batch_size=args.batch_size,
        matmul_precision=args.matmul_precision,
        true_sequential=args.true_sequential,
        expert_calibration=args.expert_calibration,
        expert_parallel=args.expert_parallel,
        targets=args.targets,
        ignore=args.ignore,
        **({} if args.scale_search is None else {"scale_search": args.scale_search}),
    )
    result = quantize_model(model, calibration, config)
    save_quantized(model, args.output, result, tokenizer=tokenizer)
    ids = calibration.input_ids[:2]
    logits = model(input_ids=ids).logits  # the sharded in-memory model after quantization
    shape = result.backend.weight_shape
    model_bytes = sum(shape(p).numel() * p.element_size() for p in model.parameters())
    layer_bytes = max(
        sum(shape(p).numel() * p.element_size() for p in layer.parameters()) for layer in find_decoder_layers(model)[1]
    )
    # Every rank's stored share of one weight whose rows (FSDP2) or flat partition (ZeRO-3) do not
    # divide evenly at 3 ranks.
    layer0 = find_decoder_layers(model)[1][0]
    k_proj = next((m.weight for n, m in layer0.named_modules() if n.endswith("k_proj")), None)
    local_numels = [None] * dist.get_world_size()
    dist.all_gather_object(local_numels, None if k_proj is None else result.backend.local_part(k_proj).numel())
    if dist.get_rank() == 0:
        report = {
            "k_proj_shape": None if k_proj is None else list(shape(k_proj)),
            "k_proj_local_numels": local_numels,
            "world": dist.get_world_size(),
            "backend": result.backend.name,
            "logits": logits.tolist(),
            "input_ids": ids.tolist(),
            "model_bytes": model_bytes,
            "layer_bytes": layer_bytes,
            "memory_per_rank": [dataclasses.asdict(m) for m in result.memory_per_rank],
            "owners": {name: r.owner for name, r in result.modules.items()},
            "hessians": {name: r.hessian for name, r in result.modules.items()},
            "timeline_events": len(result.timeline),
        }
        args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
