"""Single-process benchmark: gptq_fsdp vs llm-compressor 0.14 on SmolLM2-135M, side by side in one run.

Same model (fp32), same calibration token ids (64 x 512 tokens of Emma, built once by gptq_fsdp.data
and handed to both), same scheme (W4 group 64 symmetric, act-order static, dampening 0.01, block 128),
same thread count, each tool in a fresh process. Both checkpoints are then reloaded by the same code
(transformers + compressed-tensors, our venv) and scored on 20,480 tokens of Persuasion in 1024-token
windows. Writes benchmarks/results/smollm2_core.{json,md}.

    python benchmarks/smollm2_core.py [--threads 2] [--repeats 1]

Each tool runs at IEEE fp32 matmuls (the default of both) and with fp32 matmuls allowed to
use bf16 products with fp32 accumulation (this CPU's AMX units): gptq_fsdp's `matmul_precision="medium"`
(calibration forwards and XᵀX; GPTQ itself stays IEEE fp32), and llm-compressor under
`torch.set_float32_matmul_precision("medium")` (its whole run). Time ratios compare runs at the same
precision. gptq_fsdp runs in its standard order (llm-compressor's: all of a layer's Hessians from one
forward, then a second forward) and true-sequential (`true_sequential=True`: one forward per layer,
each Linear quantized inside it, its Hessian from the already-quantized Linears' outputs).

Needs benchmarks/setup_llmcompressor.sh run once (llm-compressor's own venv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import AUSTEN, PEER_PYTHON, REPO, RESULTS, SCHEME, SMOLLM2, WORK, prepare_job, score  # noqa: E402

MODEL = SMOLLM2
# run name -> (matmul precision, true sequential); each of ours is compared with the peer run at the same
# precision (llm-compressor's GPTQ has no true-sequential mode: its runs are the standard order)
OURS = {
    "gptq_fsdp": ("highest", False),
    "gptq_fsdp_true_sequential": ("highest", True),
    "gptq_fsdp_bf16_matmul": ("medium", False),
    "gptq_fsdp_true_sequential_bf16_matmul": ("medium", True),
}
PEERS = {"llmcompressor": "highest", "llmcompressor_bf16_matmul": "medium"}
PEER_OF = {ours: next(p for p, prec in PEERS.items() if prec == precision) for ours, (precision, _) in OURS.items()}


def run_ours(
    calibration: Path,
    output: Path,
    threads: int,
    report: Path,
    matmul_precision: str,
    true_sequential: bool,
    scale_search: str = SCHEME["scale_search"],
) -> None:
    """Worker: quantize with gptq_fsdp in this process and write timings to `report`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_fsdp import CalibrationSet, GPTQConfig, quantize_model, save_quantized

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    config = GPTQConfig.from_options(
        bits=4,
        group_size=SCHEME["group_size"],
        actorder=SCHEME["actorder"],
        dampening_frac=SCHEME["dampening"],
        block_size=SCHEME["block_size"],
        matmul_precision=matmul_precision,
        true_sequential=true_sequential,
        scale_search=scale_search,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    result = quantize_model(model, CalibrationSet.load(calibration), config)
    quantize_s, quantize_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    start = time.perf_counter()
    save_quantized(model, output, result, tokenizer=AutoTokenizer.from_pretrained(MODEL), overwrite=True)
    report.write_text(
        json.dumps(
            {
                "tool": "gptq_fsdp",
                "matmul_precision": matmul_precision,
                "true_sequential": true_sequential,
                "scale_search": scale_search,
                "quantize_s": quantize_s,
                "quantize_cpu_s": quantize_cpu_s,
                "save_s": time.perf_counter() - start,
                "phases_s": result.phases,
                "threads": threads,
            }
        )
    )


def timed_subprocess(command: list[str]) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": command[-1]}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the tools this many times; keep the best")
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--matmul-precision", default="highest", help=argparse.SUPPRESS)
    parser.add_argument("--true-sequential", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale-search", default=SCHEME["scale_search"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        run_ours(
            args.calibration, args.output, args.threads, args.report, args.matmul_precision, args.true_sequential,
            args.scale_search,
        )  # fmt: skip
        return
    tokenizer = prepare_job(args.samples, args.seq_len)
    runs: dict[str, list[dict]] = {tool: [] for tool in (*OURS, *PEERS)}
    for _ in range(args.repeats):
        for tool, (precision, true_sequential) in OURS.items():
            report = WORK / f"{tool}.json"
            timed_subprocess(
                [sys.executable, __file__, "--worker", "ours", "--calibration", str(WORK / "calibration.pt"),
                 "--output", str(WORK / tool), "--report", str(report), "--matmul-precision", precision,
                 "--threads", str(args.threads), *(["--true-sequential"] if true_sequential else [])]
            )  # fmt: skip
            runs[tool].append(json.loads(report.read_text()))
        for tool, precision in PEERS.items():
            report = WORK / f"{tool}.json"
            timed_subprocess(
                [str(PEER_PYTHON), str(REPO / "benchmarks" / "peer_llmcompressor.py"), "--model", str(MODEL),
                 "--calibration", str(WORK / "calibration_ids.pt"), "--output", str(WORK / tool),
                 "--group-size", str(SCHEME["group_size"]), "--actorder", SCHEME["actorder"],
                 "--dampening", str(SCHEME["dampening"]), "--block-size", str(SCHEME["block_size"]),
                 "--matmul-precision", precision, "--json", str(report), "--threads", str(args.threads)]
            )  # fmt: skip
            runs[tool].append(json.loads(report.read_text()))

    from gptq_fsdp.evaluate import text_tokens

    tokens = text_tokens(tokenizer, AUSTEN / "persuasion.txt", 20480)
    ppl = {"fp32": score(MODEL, tokens, args.threads)}
    ppl.update({tool: score(WORK / tool, tokens, args.threads) for tool in (*OURS, *PEERS)})
    best = {tool: min(runs[tool], key=lambda r: r["quantize_s"]) for tool in runs}
    result = {
        "job": f"SmolLM2-135M fp32, W4A16 group {SCHEME['group_size']} symmetric, act-order {SCHEME['actorder']}, "
        f"{args.samples} x {args.seq_len} tokens of emma.txt; perplexity on 20480 tokens of persuasion.txt "
        "(1024-token windows)",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "perplexity": ppl,
        "perplexity_ratio_ours_over_peer": {tool: ppl[tool] / ppl[PEER_OF[tool]] for tool in OURS},
        "quantize_s": {tool: best[tool]["quantize_s"] for tool in best},
        "time_ratio_ours_over_peer": {
            tool: best[tool]["quantize_s"] / best[PEER_OF[tool]]["quantize_s"] for tool in OURS
        },
        "our_phases_s": {tool: best[tool]["phases_s"] for tool in OURS},
        "runs": runs,
    }
    (RESULTS / "smollm2_core.json").write_text(json.dumps(result, indent=2) + "\n")
    peer = f"llm-compressor {best['llmcompressor'].get('version', '')}"
    time_ratio, ppl_ratio = result["time_ratio_ours_over_peer"], result["perplexity_ratio_ours_over_peer"]
    rows = []
    for theirs, precision in PEERS.items():
        rows.append(f"| {precision} | {peer} | {result['quantize_s'][theirs]:.1f} | {ppl[theirs]:.3f} | | |")
        for ours in (o for o, peer_run in PEER_OF.items() if peer_run == theirs):
            tool = "gptq_fsdp, true sequential" if OURS[ours][1] else "gptq_fsdp"
            rows.append(
                f"| {precision} | {tool} | {result['quantize_s'][ours]:.1f} | {ppl[ours]:.3f} "
                f"| **{time_ratio[ours]:.3f}** | {ppl_ratio[ours]:.4f} |"
            )
    phases = "\n".join(
        f"- {tool}: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["our_phases_s"][tool].items()) for tool in OURS
    )
    (RESULTS / "smollm2_core.md").write_text(
        f"""# SmolLM2-135M, one process ({result["date"]})

{result["job"]}; {args.threads} threads each, {result["machine"]}.
fp32 model perplexity: {ppl["fp32"]:.3f}. Ratios are gptq_fsdp / llm-compressor at the same matmul precision.

| fp32 matmul precision | tool | quantize wall time (s) | perplexity | time ratio | perplexity ratio |
|---|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Where gptq_fsdp's time goes:
{phases}
"""
    )
    print(json.dumps({k: result[k] for k in ("perplexity", "quantize_s", "time_ratio_ours_over_peer")}, indent=2))


if __name__ == "__main__":
    main()
