"""Accuracy over calibration draws: gptq_fsdp, llm-compressor 0.14 and GPTQModel 7.7 on SmolLM2-135M.

One run's perplexity moves by 1-4 % with last-bit differences in the calibration (issue 22), so
each tool is calibrated on `--draws` disjoint draws of Emma (draw k: samples k*n .. (k+1)*n - 1 of
one seeded shuffle of Emma's `--seq-len`-token chunks; draw 0 is the calibration set of
smollm2_core.py) and scored on two held-out texts: Persuasion (another novel) and software licence
texts (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, LGPL-2.1 from /usr/share/common-licenses: legal
prose, a text of another kind). Reported: mean and range of each tool's perplexity over the draws,
and its quantize time.

Runs (all W4 group 64 symmetric, act-order static, dampening 0.01, block 128, fp32, IEEE fp32
matmuls, the same token ids and threads, each in a fresh process):
- gptq_fsdp, standard order, with `--scale-search minmax`, `mse` and `imatrix-mse` (its default);
  gptq_fsdp true-sequential, min-max scales (as GPTQModel's);
- llm-compressor 0.14 (standard order: its only one);
- GPTQModel 7.7 in its default true-sequential order (its GPTQ v1 checkpoint is scored dequantized
  to fp32, as in smollm2_gptqmodel.py).

    python benchmarks/smollm2_draws.py [--draws 3] [--threads 2] [--skip gptqmodel]

Needs benchmarks/setup_llmcompressor.sh and benchmarks/setup_gptqmodel.sh run once. Writes
benchmarks/results/smollm2_draws.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import AUSTEN, PEER_PYTHON, REPO, RESULTS, SCHEME, SMOLLM2, WORK, score  # noqa: E402
from smollm2_core import timed_subprocess  # noqa: E402

GPTQMODEL_PYTHON = REPO / "benchmarks" / ".venv-gptqmodel" / "bin" / "python"
LICENCES = Path("/usr/share/common-licenses")
LICENCE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1")
# run name -> (tool, worker flags)
RUNS = {
    "gptq_fsdp": ("ours", []),
    "gptq_fsdp_mse": ("ours", ["--scale-search", "mse"]),
    "gptq_fsdp_imatrix_mse": ("ours", ["--scale-search", "imatrix_mse"]),
    "gptq_fsdp_true_sequential": ("ours", ["--true-sequential"]),
    "llmcompressor": ("llmcompressor", []),
    "gptqmodel": ("gptqmodel", []),
}
LABELS = {
    "gptq_fsdp": "gptq_fsdp, `--scale-search minmax`",
    "gptq_fsdp_mse": "gptq_fsdp, `--scale-search mse`",
    "gptq_fsdp_imatrix_mse": "gptq_fsdp, `--scale-search imatrix-mse` (its default)",
    "gptq_fsdp_true_sequential": "gptq_fsdp, true-sequential, min-max scales",
    "llmcompressor": "llm-compressor 0.14",
    "gptqmodel": "GPTQModel 7.7, true-sequential (its default)",
}
PEERS = {"llmcompressor": PEER_PYTHON, "gptqmodel": GPTQMODEL_PYTHON}


def scheme_flags() -> list[str]:
    return [
        "--group-size", str(SCHEME["group_size"]), "--actorder", SCHEME["actorder"],
        "--dampening", str(SCHEME["dampening"]), "--block-size", str(SCHEME["block_size"]),
    ]  # fmt: skip


def command(run: str, calibration: Path, ids: Path, output: Path, report: Path, threads: int) -> list[str]:
    tool, flags = RUNS[run]
    if tool == "ours":
        return [
            sys.executable, str(REPO / "benchmarks" / "smollm2_core.py"), "--worker", "ours",
            "--calibration", str(calibration), "--output", str(output), "--report", str(report), *flags,
            "--threads", str(threads),
        ]  # fmt: skip
    if tool == "llmcompressor":
        return [
            str(PEER_PYTHON), str(REPO / "benchmarks" / "peer_llmcompressor.py"), "--model", str(SMOLLM2),
            "--calibration", str(ids), "--output", str(output), *scheme_flags(), "--matmul-precision", "highest",
            "--json", str(report), "--threads", str(threads),
        ]  # fmt: skip
    return [
        str(GPTQMODEL_PYTHON), str(REPO / "benchmarks" / "peer_gptqmodel.py"), "--model", str(SMOLLM2),
        "--calibration", str(ids), "--output", str(output), "--dense-output", f"{output}_dense", *scheme_flags(),
        "--json", str(report), "--threads", str(threads),
    ]  # fmt: skip


def scored_folder(run: str, output: Path) -> Path:
    """The folder scored: GPTQModel's checkpoint dequantized (this venv cannot load GPTQ v1 tensors)."""
    return Path(f"{output}_dense") if RUNS[run][0] == "gptqmodel" else output


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def write_results(
    args, records: dict[str, list[dict]], fp32: dict[str, float], recorded: dict | None = None
) -> list[str]:
    """Write smollm2_draws.{json,md} for the runs recorded so far (after every run: a run cut short
    leaves the draws it finished), or again for those `recorded` holds (its date and machine); returns
    the report's lines."""
    held_out = list(fp32)
    done = {run: rs for run, rs in records.items() if rs}
    result = {
        "job": f"SmolLM2-135M fp32, W4A16 group {SCHEME['group_size']} symmetric, act-order {SCHEME['actorder']}, "
        f"{args.draws} disjoint draws of {args.samples} x {args.seq_len} tokens of emma.txt; perplexity on "
        f"{args.eval_tokens} tokens each of persuasion.txt and of licence texts ({', '.join(LICENCE_FILES)}), "
        "1024-token windows",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        **({k: recorded[k] for k in ("threads", "machine", "date")} if recorded else {}),
        "perplexity_fp32": fp32,
        "draws_completed": {run: len(rs) for run, rs in done.items()},
        "perplexity": {run: {t: summary([r[t] for r in rs]) for t in held_out} for run, rs in done.items()},
        "quantize_s": {run: summary([r["quantize_s"] for r in rs]) for run, rs in done.items()},
        "runs": records,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "smollm2_draws.json").write_text(json.dumps(result, indent=2) + "\n")

    def cell(s: dict[str, float]) -> str:
        return f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    lines = [
        f"# SmolLM2-135M over disjoint calibration draws ({result['date']})"
        + ("" if all(len(rs) == args.draws for rs in records.values()) else f" (partial: {args.draws} planned)"),
        "",
        f"{result['job']}; {args.threads} threads each, {result['machine']}.",
        f"fp32 model perplexity: Persuasion {fp32['persuasion']:.3f}, licences {fp32['licences']:.3f}.",
        "Quantize times: the median over the draws; not a speed benchmark (smollm2_core.py and smollm2_sharded.py",
        "are): other work shared the 2 cores during some runs, which the median leaves out where it hit one draw.",
        "",
        "| run | draws | Persuasion: mean (min-max) | licences: mean (min-max) | quantize time (s), median |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in done:
        p = result["perplexity"][run]
        lines.append(f"| {LABELS[run]} | {len(done[run])} | {cell(p['persuasion'])} | {cell(p['licences'])} | "
                     f"{result['quantize_s'][run]['median']:.1f} |")  # fmt: skip
    (args.results / "smollm2_draws.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3, help="disjoint calibration draws (default 3)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=20480, help="tokens scored of each held-out text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(RUNS), help="runs left out")
    parser.add_argument("--work", type=Path, default=WORK / "draws")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where smollm2_draws.{json,md} go")
    parser.add_argument("--rewrite", action="store_true", help="only write the report again from its JSON")
    args = parser.parse_args()
    if args.rewrite:
        recorded = json.loads((args.results / "smollm2_draws.json").read_text())
        args.threads = recorded["threads"]
        print("\n".join(write_results(args, recorded["runs"], recorded["perplexity_fp32"], recorded)))
        return
    runs = [r for r in RUNS if r not in args.skip]
    for run in runs:
        peer = PEERS.get(RUNS[run][0])
        if peer is not None and not peer.exists():
            sys.exit(f"{run}: its venv is missing ({peer}): run benchmarks/setup_{RUNS[run][0]}.sh first")
    missing = [f for f in LICENCE_FILES if not (LICENCES / f).exists()]
    if missing:
        sys.exit(f"the licence texts scored are missing from {LICENCES}: {missing}")

    from transformers import AutoTokenizer

    from gptq_fsdp import CalibrationSet
    from gptq_fsdp.data import build_calibration, load_texts
    from gptq_fsdp.evaluate import text_tokens

    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    texts = load_texts(str(AUSTEN / "emma.txt"))
    pool = build_calibration(texts, tokenizer, num_samples=args.draws * args.samples, max_seq_length=args.seq_len)
    licences = args.work / "licences.txt"
    licences.write_text("\n\n".join((LICENCES / f).read_text(encoding="utf-8") for f in LICENCE_FILES))
    held_out = {
        "persuasion": text_tokens(tokenizer, AUSTEN / "persuasion.txt", args.eval_tokens),
        "licences": text_tokens(tokenizer, licences, args.eval_tokens),
    }
    fp32 = {text: score(SMOLLM2, tokens, args.threads) for text, tokens in held_out.items()}

    records: dict[str, list[dict]] = {run: [] for run in runs}
    for draw in range(args.draws):
        rows = slice(draw * args.samples, (draw + 1) * args.samples)
        calibration = CalibrationSet(pool.input_ids[rows], pool.attention_mask[rows])
        calibration_file, ids_file = args.work / f"calibration_{draw}.pt", args.work / f"calibration_ids_{draw}.pt"
        calibration.save(calibration_file)
        torch.save(calibration.input_ids, ids_file)
        for run in runs:
            output, report = args.work / f"{run}_{draw}", args.work / f"{run}_{draw}.json"
            timed_subprocess(command(run, calibration_file, ids_file, output, report, args.threads))
            folder = scored_folder(run, output)
            ppl = {text: score(folder, tokens, args.threads, strict=True) for text, tokens in held_out.items()}
            records[run].append({"draw": draw, "quantize_s": json.loads(report.read_text())["quantize_s"], **ppl})
            print(f"draw {draw} {run}: {ppl}", flush=True)
            write_results(args, records, fp32)

    print("\n".join(write_results(args, records, fp32)))


if __name__ == "__main__":
    main()
