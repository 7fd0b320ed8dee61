"""Single-process benchmark: gptq_fsdp vs GPTQModel 7.7 on SmolLM2-135M, side by side in one run, on the CPU.

The job of smollm2_core.py (SmolLM2-135M fp32, 64 x 512 tokens of Emma built once by gptq_fsdp.data
and handed to both as the same token ids, W4 group 64 symmetric, act-order static = GPTQModel's
desc_act, dampening 0.01, block 128, the same threads), each tool in a fresh process, in both
orders:

- true-sequential: gptq_fsdp's `true_sequential=True` (one forward per layer, each Linear quantized
  inside it from the already-quantized Linears' outputs) against GPTQModel's default
  `true_sequential=True` (per layer, one early-stopped forward from the layer's input for each of
  its subsets q/k/v, o, gate/up, down, each calibrated on the subsets quantized before it, then a
  replay forward with the quantized weights for the next layer's inputs);
- standard: gptq_fsdp's default against GPTQModel's `true_sequential=False` (every Hessian of a
  layer from one forward with the original weights, then the replay forward).

GPTQModel saves GPTQ v1 tensors (qweight/qzeros/scales/g_idx), which this venv's transformers
cannot load (it asks for optimum and GPTQModel); peer_gptqmodel.py also writes the checkpoint
dequantized to fp32, and that model is scored by the same code as ours (transformers fp32 +
gptq_fsdp.evaluate) on 20,480 tokens of Persuasion in 1024-token windows. Writes
benchmarks/results/smollm2_gptqmodel.{json,md}.

    python benchmarks/smollm2_gptqmodel.py [--threads 2] [--repeats 1]

Both tools' GPTQ on the CPU is a loop of small tensor operations (GPTQModel's is the eager
column loop: its fused block update is CUDA-only). When other jobs load the machine, at 2
threads each of those operations waits for the second OpenMP thread to be scheduled, and
both tools' times are mostly that wait: use `--threads 1` there, or a quiet machine.

Needs benchmarks/setup_gptqmodel.sh run once (GPTQModel's own venv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import prepare_job  # noqa: E402
from smollm2_core import AUSTEN, MODEL, REPO, RESULTS, SCHEME, WORK, score, timed_subprocess  # noqa: E402

GPTQMODEL_PYTHON = REPO / "benchmarks" / ".venv-gptqmodel" / "bin" / "python"
# run name -> true sequential; ours run at IEEE fp32 matmuls like the peer
OURS = {"gptq_fsdp": False, "gptq_fsdp_true_sequential": True}
PEERS = {"gptqmodel": True, "gptqmodel_not_true_sequential": False}
PEER_OF = {ours: next(p for p, ts in PEERS.items() if ts == true_sequential) for ours, true_sequential in OURS.items()}


def run_child(command: list[str]) -> float:
    """Run one tool's process (smollm2_core.timed_subprocess); its CPU seconds (user + system, whole process).

    On a machine shared with other jobs the wall times move with their load; the CPU seconds less so.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed_subprocess(command)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the tools this many times; keep the best")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where smollm2_gptqmodel.{json,md} go")
    args = parser.parse_args()
    work = WORK / "gptqmodel"
    tokenizer = prepare_job(args.samples, args.seq_len, MODEL, work, peer=GPTQMODEL_PYTHON)
    runs: dict[str, list[dict]] = {tool: [] for tool in (*OURS, *PEERS)}
    for _ in range(args.repeats):
        for tool, true_sequential in OURS.items():
            report = work / f"{tool}.json"
            cpu_s = run_child(
                [sys.executable, str(REPO / "benchmarks" / "smollm2_core.py"), "--worker", "ours",
                 "--calibration", str(work / "calibration.pt"), "--output", str(work / tool),
                 "--report", str(report), "--matmul-precision", "highest",
                 *(["--true-sequential"] if true_sequential else []), "--threads", str(args.threads)]
            )  # fmt: skip
            runs[tool].append({**json.loads(report.read_text()), "process_cpu_s": cpu_s})
        for tool, true_sequential in PEERS.items():
            report = work / f"{tool}.json"
            cpu_s = run_child(
                [str(GPTQMODEL_PYTHON), str(REPO / "benchmarks" / "peer_gptqmodel.py"), "--model", str(MODEL),
                 "--calibration", str(work / "calibration_ids.pt"), "--output", str(work / tool),
                 "--dense-output", str(work / f"{tool}_dense"), "--group-size", str(SCHEME["group_size"]),
                 "--actorder", SCHEME["actorder"], "--dampening", str(SCHEME["dampening"]),
                 "--block-size", str(SCHEME["block_size"]), "--json", str(report),
                 *([] if true_sequential else ["--no-true-sequential"]), "--threads", str(args.threads)]
            )  # fmt: skip
            runs[tool].append({**json.loads(report.read_text()), "process_cpu_s": cpu_s})

    from gptq_fsdp.evaluate import text_tokens

    tokens = text_tokens(tokenizer, AUSTEN / "persuasion.txt", args.eval_tokens)
    ppl = {"fp32": score(MODEL, tokens, args.threads)}
    ppl.update({tool: score(work / tool, tokens, args.threads) for tool in OURS})
    ppl.update({tool: score(work / f"{tool}_dense", tokens, args.threads) for tool in PEERS})
    best = {tool: min(runs[tool], key=lambda r: r["quantize_s"]) for tool in runs}
    result = {
        "job": f"SmolLM2-135M fp32, W4A16 group {SCHEME['group_size']} symmetric, act-order {SCHEME['actorder']}, "
        f"{args.samples} x {args.seq_len} tokens of emma.txt; perplexity on {args.eval_tokens} tokens of "
        "persuasion.txt (1024-token windows)",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "perplexity": ppl,
        "perplexity_ratio_ours_over_peer": {tool: ppl[tool] / ppl[PEER_OF[tool]] for tool in OURS},
        "quantize_s": {tool: best[tool]["quantize_s"] for tool in best},
        "time_ratio_ours_over_peer": {
            tool: best[tool]["quantize_s"] / best[PEER_OF[tool]]["quantize_s"] for tool in OURS
        },
        "quantize_cpu_s": {tool: best[tool]["quantize_cpu_s"] for tool in best},
        "process_cpu_s": {tool: best[tool]["process_cpu_s"] for tool in best},
        "our_phases_s": {tool: best[tool]["phases_s"] for tool in OURS},
        "peer_gptq_module_s": {tool: best[tool].get("gptq_module_s") for tool in PEERS},
        "runs": runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "smollm2_gptqmodel.json").write_text(json.dumps(result, indent=2) + "\n")
    peer = f"GPTQModel {best['gptqmodel'].get('version', '')}"
    time_ratio, ppl_ratio = result["time_ratio_ours_over_peer"], result["perplexity_ratio_ours_over_peer"]
    rows = []
    for theirs, true_sequential in PEERS.items():
        order = "true-sequential" if true_sequential else "standard"
        wall, cpu = result["quantize_s"], result["quantize_cpu_s"]
        rows.append(f"| {order} | {peer} | {wall[theirs]:.1f} | {cpu[theirs]:.1f} | {ppl[theirs]:.3f} | | | |")
        for ours in (o for o, peer_run in PEER_OF.items() if peer_run == theirs):
            rows.append(
                f"| {order} | gptq_fsdp | {wall[ours]:.1f} | {cpu[ours]:.1f} | {ppl[ours]:.3f} "
                f"| **{time_ratio[ours]:.3f}** | {cpu[ours] / cpu[theirs]:.3f} | {ppl_ratio[ours]:.4f} |"
            )
    phases = "\n".join(
        f"- {tool}: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["our_phases_s"][tool].items()) for tool in OURS
    )
    peer_gptq = "\n".join(
        f"- {tool}: {seconds:.1f} s" for tool, seconds in result["peer_gptq_module_s"].items() if seconds is not None
    )
    (args.results / "smollm2_gptqmodel.md").write_text(
        f"""# SmolLM2-135M, one process, against GPTQModel ({result["date"]})

{result["job"]}; {args.threads} threads each, IEEE fp32 matmuls, {result["machine"]}.
fp32 model perplexity: {ppl["fp32"]:.3f}. Ratios are gptq_fsdp / GPTQModel in the same order.
GPTQModel's checkpoint (GPTQ v1, fp16 scales) is scored dequantized to fp32 by the same code as ours.
CPU time is the quantize call's process time (user + system, all threads): on a machine shared with
other jobs the wall times move with their load, the CPU times less so. The JSON also has each tool's
whole-process CPU time (`process_cpu_s`: imports, load, quantize, save; GPTQModel's writes the dense copy).

| order | tool | quantize wall (s) | quantize CPU (s) | perplexity | time ratio | CPU time ratio | perplexity ratio |
|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Where gptq_fsdp's time goes:
{phases}

GPTQModel's per-module GPTQ time, summed (its quant_log.csv):
{peer_gptq}
"""
    )
    print(json.dumps({k: result[k] for k in ("perplexity", "quantize_s", "time_ratio_ours_over_peer")}, indent=2))


if __name__ == "__main__":
    main()
