"""MoE benchmark: gptq_fsdp against llm-compressor 0.14's MoE path on the 8-expert upcycled SmolLM2.

gptq_fsdp in one process and with FSDP2 (also expert-parallel) and ZeRO-3 at 2 ranks, llm-compressor
in one process and DDP at 2 ranks, all in one run.

The model: SmolLM2-135M upcycled into Mixtral's layout (8 experts, top-2, 692M parameters, fp32;
`scripts/upcycle_smollm2.py`). Every run quantizes the same calibration token ids (`--samples` x
`--seq-len` tokens of Emma, built once by gptq_fsdp.data), with the same scheme (W4 group 64
symmetric, act-order static, dampening 0.01, block 128), 1 thread per process everywhere (the
one-process runs use one core of the two, as in smollm2_sharded.py), IEEE fp32 matmuls. Routers stay
in full precision in both tools. Both tools' checkpoints are reloaded by the same code
(transformers + compressed-tensors, this venv; a tensor missing from or unknown to the model is an
error) and scored on `--ppl-tokens` tokens of Persuasion in 1024-token windows.

Expert calibration: gptq_fsdp calibrates each expert on the tokens routed to it (its default);
llm-compressor on every token (its default, `moe_calibrate_all_experts=True`). Also run:
llm-compressor routed (`moe_calibrate_all_experts=False`, skip with `--no-peer-routed`) and, with
`--with-all-tokens`, gptq_fsdp calibrating every expert on every token
(`GPTQConfig(expert_calibration="all_tokens")`).

Reported per run: quantize wall time (llm-compressor's conversion of the fused experts into
per-expert Linears and both tools' loading are outside it, and given apart; so is DeepSpeed's JIT
build of its shm op, minutes when its cache under ~/.cache/torch_extensions was built by another
venv), rank 0's CPU seconds in that span (far below the wall time: the machine was busy), time /
llm-compressor DDP, peak parameter memory per rank (gptq_fsdp's own count: its shards, the largest whole layer it
unsharded, the weights it gathered for GPTQ; llm-compressor holds the whole model in CPU shared memory
for all ranks), peak RSS per rank, perplexity, and what the checkpoint holds. Writes
benchmarks/results/moe_upcycled.{json,md} (`--results` elsewhere, e.g. for smoke tests).

    python benchmarks/moe_upcycled.py [--samples 32] [--seq-len 512] [--ppl-tokens 10240] [--with-all-tokens]

`--layers N` quantizes a copy of the model cut to its first N decoder layers (smoke tests only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    AUSTEN,
    CACHE,
    RESULTS,
    SCHEME,
    WORK,
    gptq_worker,
    parameter_peak_bytes,
    peer_command,
    prepare_job,
    run,
    score,
    torchrun,
)

MODEL = CACHE / "smollm2-moe-8"
BACKEND_LABELS = {"single": "1 process", "fsdp2": "FSDP2 2 ranks", "zero3": "ZeRO-3 2 ranks"}
# name: (ranks, backend, extra GPTQConfig options)
OURS = {
    "gptq_fsdp_world1": (1, "single", {}),
    "gptq_fsdp_fsdp2_world2": (2, "fsdp2", {}),
    "gptq_fsdp_zero3_world2": (2, "zero3", {}),
    "gptq_fsdp_fsdp2_world2_expert_parallel": (2, "fsdp2", {"expert_parallel": True}),
}
OURS_ALL_TOKENS = {"gptq_fsdp_world1_all_tokens": (1, "single", {"expert_calibration": "all_tokens"})}
# name: (ranks, moe_calibrate_all_experts)
PEERS = {"llmcompressor_world1": (1, True), "llmcompressor_ddp_world2": (2, True)}
PEER_ROUTED = {"llmcompressor_world1_routed": (1, False)}
REFERENCE = "llmcompressor_ddp_world2"  # the time ratios' denominator


GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_reporting(command: list[str], report: Path, aborted_at_exit: list[str], name: str) -> dict:
    """Run one launch and return its report. A rank that aborts at interpreter exit with gloo's
    "terminate called without an active exception" (README, known limits) after the report was
    written (so after the work and the save) is noted in `aborted_at_exit`, not fatal."""
    report.unlink(missing_ok=True)
    try:
        run(command)
    except RuntimeError as error:
        if GLOO_EXIT_ABORT not in str(error) or not report.exists():
            raise
        print(f"{name}: a rank aborted at exit after its report was written ({GLOO_EXIT_ABORT!r})", flush=True)
        aborted_at_exit.append(name)
    return json.loads(report.read_text())


def truncated(model_dir: Path, layers: int, work: Path) -> Path:
    """A copy of the model with its first `layers` decoder layers (for smoke tests), saved by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / f"model-{layers}-layers"
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def checkpoint_contents(folder: Path) -> dict:
    """What a quantized MoE checkpoint holds, from its tensor names and config (no tensor is read)."""
    from safetensors import safe_open

    names = [k for f in sorted(folder.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()]  # noqa: SIM118
    experts = [k for k in names if ".experts." in k]
    # per-expert tensors: ...experts.E.NAME.weight_packed -> NAME
    per_expert = [parts for parts in (k.split(".experts.")[1].split(".") for k in experts) if parts[0].isdigit()]
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    return {
        "expert_packed": sum(k.endswith(".weight_packed") for k in experts),
        "expert_full_precision": sum(k.endswith(".weight") for k in experts),  # per-expert weights left unquantized
        "fused_experts": sum(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in experts),
        "expert_names": sorted({".".join(parts[1:-1]) for parts in per_expert}),
        "routers_full_precision": sum(k.endswith(".gate.weight") for k in names),
        "routers_ignored": sum(i.endswith(".gate") for i in ignore),
        "example": next((k for k in experts if k.endswith(".weight_packed")), None),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        gptq_worker(
            Path(spec["model"]), spec["backend"], "highest", False, *(Path(spec[k]) for k in ("calibration", "output",
            "report")), fsdp2_load="auto", options=spec["options"],
        )  # fmt: skip
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help="the upcycled MoE folder (default %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    parser.add_argument("--ppl-tokens", type=int, default=10240, help="tokens of Persuasion scored (default 10240)")
    parser.add_argument(
        "--with-all-tokens", action="store_true", help="also gptq_fsdp with expert_calibration='all_tokens'"
    )
    parser.add_argument("--no-peer-routed", action="store_true", help="skip llm-compressor with routed calibration")
    parser.add_argument(
        "--peer-batched-quantization", default="auto", help="llm-compressor's batched_quantization (default: its own)"
    )
    parser.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers (smoke tests)")
    parser.add_argument("--work", type=Path, default=WORK / "moe_upcycled", help="checkpoints and run reports")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where moe_upcycled.{json,md} go")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} is missing: build it with scripts/upcycle_smollm2.py")
    if args.with_all_tokens:
        from gptq_fsdp import GPTQConfig

        if "expert_calibration" not in {f.name for f in dataclasses.fields(GPTQConfig)}:
            sys.exit("--with-all-tokens: this gptq_fsdp has no GPTQConfig.expert_calibration yet")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = truncated(args.model, args.layers, work) if args.layers else args.model
    tokenizer = prepare_job(args.samples, args.seq_len, model=model, work=work)
    ours = {**OURS, **(OURS_ALL_TOKENS if args.with_all_tokens else {})}
    peers = {**PEERS, **({} if args.no_peer_routed else PEER_ROUTED)}

    reports, wall, aborted_at_exit = {}, {}, []
    for name, (world, backend, options) in ours.items():
        spec = {"model": str(model), "backend": backend, "options": options,
                "calibration": str(work / "calibration.pt"), "output": str(work / name),
                "report": str(work / f"{name}.json")}  # fmt: skip
        start = time.perf_counter()
        command = [*torchrun(world), __file__, "--worker", json.dumps(spec)]
        reports[name] = run_reporting(command, work / f"{name}.json", aborted_at_exit, name)
        wall[name] = time.perf_counter() - start
        print(f"{name}: quantize {reports[name]['quantize_s']:.1f} s", flush=True)
    for name, (world, all_experts) in peers.items():
        extra = ("--moe-calibrate-all-experts", "true" if all_experts else "false",
                 "--batched-quantization", args.peer_batched_quantization)  # fmt: skip
        start = time.perf_counter()
        command = peer_command(model, work / "calibration_ids.pt", work / name, work / f"{name}.json", world=world,
                               extra=extra)  # fmt: skip
        reports[name] = run_reporting(command, work / f"{name}.json", aborted_at_exit, name)
        wall[name] = time.perf_counter() - start
        print(f"{name}: quantize {reports[name]['quantize_s']:.1f} s", flush=True)

    from gptq_fsdp.evaluate import text_tokens

    tokens = text_tokens(tokenizer, AUSTEN / "persuasion.txt", args.ppl_tokens)
    start = time.perf_counter()
    ppl = {"fp32": score(model, tokens, 2, strict=True)}
    ppl.update({name: score(work / name, tokens, 2, strict=True) for name in (*ours, *peers)})
    score_s = time.perf_counter() - start
    seconds = {name: reports[name]["quantize_s"] for name in (*ours, *peers)}
    param_bytes = {name: parameter_peak_bytes(reports[name]) for name in ours}
    world1 = param_bytes["gptq_fsdp_world1"]
    rss = {name: max(m["peak_rss_bytes"] for m in reports[name]["memory_per_rank"]) for name in ours}
    rss.update({name: max(reports[name]["peak_rss_bytes_per_rank"]) for name in peers})
    config = json.loads((model / "config.json").read_text())
    peer_default = [name for name, (_, all_experts) in peers.items() if all_experts]
    result = {
        "job": f"SmolLM2-135M upcycled to Mixtral ({config['num_local_experts']} experts, top-"
        f"{config['num_experts_per_tok']}, {config['num_hidden_layers']} layers) fp32, W4A16 group "
        f"{SCHEME['group_size']} symmetric, act-order {SCHEME['actorder']}, dampening {SCHEME['dampening']}, "
        f"block {SCHEME['block_size']}, {args.samples} x {args.seq_len} tokens of emma.txt; perplexity on "
        f"{args.ppl_tokens} tokens of persuasion.txt (1024-token windows); 1 thread per process",
        "model": str(model),
        "parameters": stored_parameters(model),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "ppl_tokens": args.ppl_tokens,
        "runs": {
            **{
                name: {"ranks": n, "backend": backend, "options": options}
                for name, (n, backend, options) in ours.items()
            },
            **{name: {"ranks": n, "moe_calibrate_all_experts": every} for name, (n, every) in peers.items()},
        },
        "quantize_s": seconds,
        # rank 0's CPU time in the same span: below the wall time where the machine was busy with other work
        "quantize_cpu_s": {name: reports[name].get("quantize_cpu_s") for name in seconds},
        "time_ratio_over_peer_ddp": {name: seconds[name] / seconds[REFERENCE] for name in seconds},
        "perplexity": ppl,
        "perplexity_ratio_over_best_peer_default": {
            name: ppl[name] / min(ppl[p] for p in peer_default) for name in (*ours, *peers)
        },
        "peak_parameter_bytes_per_rank": param_bytes,
        "memory_ratio_over_world1": {name: param_bytes[name] / world1 for name in ours},
        "peak_rss_bytes_per_rank": rss,
        "load_s": {name: reports[name]["load_s"] for name in ours},
        "fsdp2_load": reports["gptq_fsdp_fsdp2_world2"]["load"],
        "peer_linearize_s": {name: reports[name]["linearize_s"] for name in peers},
        "wall_s": wall,
        "score_s": score_s,
        "aborted_at_exit": aborted_at_exit,  # runs with a rank that aborted after its work (gloo, at exit)
        "pooled_expert_slices": {name: reports[name]["pooled_expert_slices"] for name in ours},
        "phases_s": {name: reports[name]["phases_s"] for name in ours},
        "memory_per_rank": {name: reports[name]["memory_per_rank"] for name in ours},
        "checkpoints": {name: checkpoint_contents(work / name) for name in (*ours, *peers)},
        "peers": {name: reports[name] for name in peers},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "moe_upcycled.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "moe_upcycled.md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("quantize_s", "perplexity", "memory_ratio_over_world1")}, indent=2))


def stored_parameters(model_dir: Path) -> int:
    """Parameters in the model's files (tied ones once), from the safetensors headers."""
    from safetensors import safe_open

    count = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return count


def label(name: str, run: dict) -> str:
    if "backend" in run:
        mode = "all tokens" if run["options"].get("expert_calibration") == "all_tokens" else "routed"
        parallel = ", expert-parallel" if run["options"].get("expert_parallel") else ""
        return f"gptq_fsdp, {BACKEND_LABELS[run['backend']]}, {mode}{parallel}"
    where = "1 process" if run["ranks"] == 1 else f"DDP {run['ranks']} ranks"
    return f"llm-compressor, {where}, {'all tokens' if run['moe_calibrate_all_experts'] else 'routed'}"


RUN_HEADER = (
    "| run | quantize wall time (s) | rank 0 CPU s | time / llm-compressor DDP "
    "| peak parameter MiB per rank (/ one process) | peak RSS MiB per rank | perplexity "
    "| perplexity / llm-compressor's best default |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)
CONTENTS_HEADER = (
    "| run | per-expert packed weights | per-expert full-precision weights | fused expert tensors | expert names "
    "| routers full precision / ignored |\n|---|---:|---:|---:|---|---:|"
)


def markdown(result: dict) -> str:
    mib, q, ppl = 2**20, result["quantize_s"], result["perplexity"]
    ratio, rss = result["time_ratio_over_peer_ddp"], result["peak_rss_bytes_per_rank"]
    mem, cpu = result["peak_parameter_bytes_per_rank"], result["quantize_cpu_s"]
    mem_ratio, ppl_ratio = result["memory_ratio_over_world1"], result["perplexity_ratio_over_best_peer_default"]
    full_mib = result["parameters"] * 4 / mib
    rows = []
    for name, spec in result["runs"].items():
        if name in mem:
            memory = f"{mem[name] / mib:.0f} ({mem_ratio[name]:.3f})"
        else:
            memory = f"whole model, shared ({full_mib:.0f})"
        rows.append(
            f"| {label(name, spec)} | {q[name]:.1f} | {cpu[name]:.1f} | {ratio[name]:.3f} | {memory} "
            f"| {rss[name] / mib:.0f} | {ppl[name]:.3f} | {ppl_ratio[name]:.4f} |"
        )
    default = [n for n, r in result["runs"].items() if "backend" in r and not r["options"]]
    sharded = [n for n in default if result["runs"][n]["ranks"] == 2]
    peer_default = [n for n, r in result["runs"].items() if r.get("moe_calibrate_all_experts")]
    worst_ppl, best_peer = max(ppl[n] for n in default), min(ppl[p] for p in peer_default)

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    ours_ppl, peer_ppl = (" / ".join(f"{ppl[n]:.3f}" for n in names) for names in (default, peer_default))
    goals = [
        f"| perplexity no worse than llm-compressor's (its default runs) | gptq_fsdp (routed) {ours_ppl}; "
        f"llm-compressor {peer_ppl} | {met(worst_ppl <= best_peer)} |",
        f"| time <= 0.5x llm-compressor DDP | {' / '.join(f'{ratio[n]:.3f}' for n in sharded)} (FSDP2 / ZeRO-3) "
        f"| {met(all(ratio[n] <= 0.5 for n in sharded))} |",
        f"| peak parameter memory per rank at 2 ranks <= 0.55x one process | "
        f"{' / '.join(f'{mem_ratio[n]:.3f}' for n in sharded)} (FSDP2 / ZeRO-3) "
        f"| {met(all(mem_ratio[n] <= 0.55 for n in sharded))} |",
    ]
    contents = []
    for name, c in result["checkpoints"].items():
        contents.append(
            f"| {label(name, result['runs'][name])} | {c['expert_packed']} | {c['expert_full_precision']} "
            f"| {c['fused_experts']} | {', '.join(c['expert_names'])} | {c['routers_full_precision']} "
            f"/ {c['routers_ignored']} |"
        )
    linearize = " / ".join(f"{s:.1f}" for s in result["peer_linearize_s"].values())
    load = ", ".join(f"{label(n, result['runs'][n]).split(', ')[1]} {s:.1f} s" for n, s in result["load_s"].items())
    pooled = ", ".join(
        f"{label(n, result['runs'][n]).split(', ', 1)[1]} {k}" for n, k in result["pooled_expert_slices"].items()
    )
    aborted = (
        " Runs in which a rank aborted at interpreter exit after its work and save (gloo; README, known limits): "
        + ", ".join(label(n, result["runs"][n]) for n in result["aborted_at_exit"])
        + "."
        if result.get("aborted_at_exit")
        else ""
    )
    return f"""# MoE: the upcycled SmolLM2 with gptq_fsdp and llm-compressor ({result["date"]})

{result["job"]}; {result["machine"]}. fp32 model perplexity {ppl["fp32"]:.3f}. One measurement per run
(no rounds); rank 0's CPU seconds well below its wall time mean the machine was busy with other work.
"routed": each expert calibrated on the tokens routed to it; "all tokens": every expert on every token
(llm-compressor's default).

{RUN_HEADER}
{chr(10).join(rows)}

| goal | measured | met |
|---|---|---|
{chr(10).join(goals)}

Outside the quantize times: llm-compressor's conversion of the fused experts into per-expert Linears
({linearize} s, its runs in order) and loading (gptq_fsdp: {load}; FSDP2 loaded `{result["fsdp2_load"]}`).
Peak RSS includes loading; with `rank0` loading FSDP2's rank 0 reads the whole model, and
llm-compressor's RSS counts the shared-memory model pages each rank touched. Expert slices short of
tokens, quantized with their layer's pooled Hessian (gptq_fsdp): {pooled}.{aborted}

What each checkpoint holds (tensor names; every one reloads in transformers with no tensor missing or
unknown):

{CONTENTS_HEADER}
{chr(10).join(contents)}
"""


if __name__ == "__main__":
    main()
