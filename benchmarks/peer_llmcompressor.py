"""Peer benchmark: GPTQ W4A16 with llm-compressor 0.14 on pre-tokenized token ids.

Run with the interpreter of ``benchmarks/.venv-llmc`` (see ``setup_llmcompressor.sh``)::

    python benchmarks/peer_llmcompressor.py --model DIR --calibration calib.pt \
        --output OUT --group-size 64 --actorder static --dampening 0.01 \
        --block-size 128 --threads 2 --json peer.json

Distributed (CPU, gloo): ``torchrun --nproc_per_node 2 benchmarks/peer_llmcompressor.py
... --threads 1``. Each rank calibrates on its contiguous slice of the samples;
llm-compressor reduces the Hessians and splits the GPTQ solves across ranks. The
model is loaded with ``load_offloaded_model`` so that weights live in CPU shared
memory: rank 0 reads the weights other ranks quantized (llm-compressor skips the
qparam broadcast for CPU-offloaded modules and relies on that sharing). Saving is
collective (all ranks call it, rank 0 writes); only rank 0 writes the JSON.

MoE models (transformers 5's fused experts, e.g. Mixtral): llm-compressor's MoE path replaces each
fused experts module by per-expert Linears (`linearize_moe`, what `load_quantizable_moe` falls back
to for an architecture without a per-expert load mapping, Mixtral among them); it is called right
after loading, timed as `linearize_s`, outside `quantize_s`. Saved so, a Mixtral's experts would be
written as `experts.E.{gate,up,down}_proj.*`, names transformers' Mixtral loader does not know (its
files say `w1`/`w3`/`w2`: the experts would reload at random). So the save mapping is set as
`load_quantizable_moe` sets it for an architecture it has a per-expert mapping for (llm-compressor's
`patch_moe_mappings` with the w1/w2/w3 renamings), and the checkpoint holds
`block_sparse_moe.experts.E.w1.weight_packed` etc. (`load_quantizable_moe` itself cannot take such a
mapping here: its class patching imports every transformers model, and transformers 5.17's Aria image
processor needs torchvision, which this venv does not have.) `--moe-calibrate-all-experts` is
oneshot's option of that name (default true: every expert calibrated on every token; false: on the
tokens routed to it). Routers are not Linears (Mixtral's `MixtralTopKRouter`), so they are not
targeted and stay full precision; llm-compressor lists them in the checkpoint's `ignore`. The JSON
also records each rank's peak resident set size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from compressed_tensors.offload import load_offloaded_model
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import __version__, oneshot
from llmcompressor.modeling.moe.conversion_mappings import (
    get_linearize_load_mappings,
    patch_moe_mappings,
    set_save_conversion_mapping,
)
from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.core_model_loading import WeightRenaming

# Per-expert tensor names in the model files where they differ from llm-compressor's per-expert Linears
# (gate_proj, up_proj, down_proj).
EXPERT_FILE_NAMES = {"mixtral": {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True, help="torch.save'd LongTensor [N, L]")
    p.add_argument("--output", required=True)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--actorder", default="static", choices=["static", "group", "weight", "none"])
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--matmul-precision", default="highest", help="torch.set_float32_matmul_precision")
    p.add_argument("--moe-calibrate-all-experts", default="true", choices=["true", "false"])
    p.add_argument(
        "--batched-quantization",
        default="auto",
        help="GPTQModifier's batching of same-shape modules: auto (its default; no batching on CPU), N or none",
    )
    p.add_argument("--json", default=None)
    return p.parse_args()


def make_dataset(ids: torch.Tensor) -> Dataset:
    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def batched_quantization(value: str) -> str | int | None:
    return {"auto": "auto", "none": None}[value] if value in ("auto", "none") else int(value)


def linearize(model) -> bool:
    """llm-compressor's MoE path: fused experts -> per-expert Linears; saved under the files' names.
    False if the model has no fused experts."""
    if not get_non_linearized_moes(model):
        return False
    linearize_moe(model)
    model_type = model.config.model_type
    if names := EXPERT_FILE_NAMES.get(model_type):
        renamings = [
            WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{stored}\.", target_patterns=rf".experts.\1.{linear}.")
            for stored, linear in names.items()
        ]
        with patch_moe_mappings(model_type, renamings, remove_targets=[".experts.gate_up_proj", ".experts.down_proj"]):
            *_, save_mappings = get_linearize_load_mappings(model_type)
        set_save_conversion_mapping(model, save_mappings)
    return True


def add_barrier_after_gptq() -> None:
    """Work around a CPU-only race in llm-compressor 0.14's distributed GPTQ.

    Each rank solves its share of the modules and writes the result into CPU shared
    memory; the broadcast that would synchronise the ranks is skipped for CPU
    modules, so a fast rank starts propagating the layer's outputs while another is
    still writing its weights (non-deterministic output). A barrier restores order.
    """
    original = GPTQModifier.compress_modules

    def compress_modules(self: GPTQModifier) -> None:
        original(self)
        dist.barrier()

    GPTQModifier.compress_modules = compress_modules


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # compressed_tensors' init_dist() requires an accelerator; gloo on CPU instead.
        dist.init_process_group("gloo")
        add_barrier_after_gptq()
    rank = dist.get_rank() if world > 1 else 0

    ids = torch.load(args.calibration)
    num_samples, seq_len = ids.shape
    start, end = num_samples * rank // world, num_samples * (rank + 1) // world
    dataset = make_dataset(ids[start:end])

    loader = load_offloaded_model() if world > 1 else contextlib.nullcontext()
    with loader:
        kwargs = {"device_map": "auto_offload"} if world > 1 else {}
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    moe = linearize(model)  # per-expert Linears (offloaded as the fused experts were: shared memory in DDP)
    linearize_s = time.perf_counter() - t0

    weights = QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=args.group_size,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        actorder=None if args.actorder == "none" else args.actorder,
        dampening_frac=args.dampening,
        block_size=args.block_size,
        batched_quantization=batched_quantization(args.batched_quantization),
    )

    if world > 1:
        dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=end - start,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        pipeline="sequential",
        moe_calibrate_all_experts=args.moe_calibrate_all_experts == "true",
    )
    if world > 1:
        dist.barrier()
    quantize_s, quantize_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0

    # save_pretrained is collective under torch.distributed (rank 0 writes the files).
    t0 = time.perf_counter()
    model.save_pretrained(args.output, save_compressed=True)
    save_s = time.perf_counter() - t0
    peak_rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
    if world > 1:
        peak_rss = [None] * world
        dist.all_gather_object(peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if rank == 0:
        tokenizer.save_pretrained(args.output)
        result = {
            "tool": "llmcompressor",
            "version": __version__,
            "quantize_s": round(quantize_s, 3),
            "quantize_cpu_s": round(quantize_cpu_s, 3),  # rank 0's CPU time
            "save_s": round(save_s, 3),
            "moe": moe,
            "linearize_s": round(linearize_s, 3),
            "moe_calibrate_all_experts": args.moe_calibrate_all_experts == "true",
            "batched_quantization": args.batched_quantization,
            "peak_rss_bytes_per_rank": peak_rss,
            "threads": args.threads,
            "matmul_precision": args.matmul_precision,
            "world_size": world,
            "num_samples": num_samples,
            "seq_len": seq_len,
        }
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
