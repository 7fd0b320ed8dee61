"""Is a change slower? The same quantization with two checkouts of gptq_fsdp, interleaved in one run.

    git worktree add /tmp/before <old commit>
    .venv/bin/python benchmarks/compare_commits.py /tmp/before [--rounds 2] [--threads 2] [--orders standard]

Each round runs, for each order (standard and true-sequential by default), the old checkout then this one
(`PYTHONPATH` selects the package; same interpreter, model, token ids and threads): SmolLM2-135M
fp32, W4A16 group 64, act-order static, 64 x 512 tokens of Emma, one process. Wall time is the
CLI's own "quantized ... in X s" (loading and saving excluded). Interleaving puts both checkouts
under the same machine load; the ratio new/old is what to read. Writes
benchmarks/results/compare_commits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUSTEN = Path(os.environ.get("GPTQ_FSDP_AUSTEN", REPO.parent / "shared" / "data" / "austen"))
SMOLLM2 = Path.home() / ".cache" / "gptq_fsdp" / "smollm2-135m"
ORDERS = {"standard": [], "true sequential": ["--true-sequential"]}


def commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def quantize_seconds(tree: Path, extra: list[str], threads: int, output: Path) -> float:
    command = [
        sys.executable, "-m", "gptq_fsdp", "quantize", str(SMOLLM2), "--dataset", str(AUSTEN / "emma.txt"),
        "--num-samples", "64", "--max-seq-length", "512", "--group-size", "64", "--actorder", "static",
        "--threads", str(threads), "--no-state", "--output", str(output), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return float(re.search(r"quantized \d+ modules .* in ([0-9.]+) s, saved", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="a checkout (git worktree) of the old commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--orders", nargs="+", choices=list(ORDERS), default=list(ORDERS))
    args = parser.parse_args()
    orders = {order: ORDERS[order] for order in args.orders}
    trees = {"before": args.before.resolve(), "after": REPO}
    seconds: dict[str, dict[str, list[float]]] = {order: {"before": [], "after": []} for order in orders}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for order, extra in orders.items():
                for which, tree in trees.items():
                    output = Path(scratch) / f"{which}-{round_}-{len(extra)}"
                    seconds[order][which].append(quantize_seconds(tree, extra, args.threads, output))
                    print(f"round {round_}, {order}, {which}: {seconds[order][which][-1]:.1f} s", flush=True)
    ratios = {o: statistics.median(s["after"]) / statistics.median(s["before"]) for o, s in seconds.items()}
    report = {
        "date": date.today().isoformat(),
        "commits": {which: commit(tree) for which, tree in trees.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "threads": args.threads,
        "seconds": seconds,
        "ratio_after_over_before": ratios,
    }
    results = REPO / "benchmarks" / "results"
    (results / "compare_commits.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"# Same run, two commits ({report['date']})",
        "",
        f"SmolLM2-135M fp32, W4A16 group 64, act-order static, 64 x 512 tokens of emma.txt, one process, "
        f"{args.threads} threads; {report['machine']}. Medians of {args.rounds} interleaved rounds.",
        "",
        f"| order | {report['commits']['before']} (s) | {report['commits']['after']} (s) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for order, s in seconds.items():
        before, after = statistics.median(s["before"]), statistics.median(s["after"])
        lines.append(f"| {order} | {before:.1f} | {after:.1f} | {ratios[order]:.3f} |")
    (results / "compare_commits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
