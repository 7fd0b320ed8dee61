"""Sharded benchmark: gptq_fsdp at world 1, FSDP2 and ZeRO-3 at world 2, llm-compressor DDP at world 2.

SmolLM2-135M fp32, the job of smollm2_core.py (64 x 512 tokens of Emma, W4 group 64 symmetric,
act-order static), 1 thread per rank everywhere, all in one run. Reports quantization wall time,
strong scaling T(1)/T(2), peak parameter memory per rank, perplexity on 20,480 tokens of Persuasion,
and each rank's GPTQ/wait timeline at world 2 (the overlap of collectives with GPTQ).
The world-2 runs are repeated with fp32 matmuls allowed to use bf16 products (gptq_fsdp's
matmul_precision="medium"; llm-compressor under torch.set_float32_matmul_precision("medium")), and
each gptq_fsdp run is compared with the llm-compressor run at the same precision. The IEEE runs are
repeated in true-sequential order (`true_sequential=True`: one forward per layer).

Every run is repeated `--rounds` times, round after round (so a slow spell of the machine hits one
round, not one configuration); the tables give the median of the rounds and each round's scaling,
computed from the runs of that round.

What the machine allows: two cores that share caches and memory bandwidth may not run two processes
as fast as one. Each round also quantizes half of the samples in one process alone, then each half in
its own process, both at once (no valid result, only the load of two ranks without their
communication), and compares the data-parallel phases (calibration forwards, XᵀX, propagation): with
that slowdown s, a perfect split of all the one-process work would take T(1)_dp / 2 · s +
T(1)_rest / 2, the ceiling on T(1)/T(2) on this machine.
Writes benchmarks/results/smollm2_sharded.{json,md}.

    python benchmarks/smollm2_sharded.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    AUSTEN,
    RESULTS,
    SMOLLM2,
    WORK,
    gptq_worker,
    parameter_peak_bytes,
    peer_command,
    prepare_job,
    run,
    score,
    torchrun,
)

MODEL = SMOLLM2

RUNS = {  # name: (ranks, backend, matmul precision, true sequential)
    "gptq_fsdp_world1": (1, "single", "highest", False),
    "gptq_fsdp_fsdp2_world2": (2, "fsdp2", "highest", False),
    "gptq_fsdp_zero3_world2": (2, "zero3", "highest", False),
    "gptq_fsdp_fsdp2_world2_bf16_matmul": (2, "fsdp2", "medium", False),
    "gptq_fsdp_zero3_world2_bf16_matmul": (2, "zero3", "medium", False),
    "gptq_fsdp_world1_true_sequential": (1, "single", "highest", True),
    "gptq_fsdp_fsdp2_world2_true_sequential": (2, "fsdp2", "highest", True),
    "gptq_fsdp_zero3_world2_true_sequential": (2, "zero3", "highest", True),
}
# (one process, the world-2 runs scaled against it), standard order and true-sequential, IEEE fp32
SCALING = {
    "gptq_fsdp_world1": ("gptq_fsdp_fsdp2_world2", "gptq_fsdp_zero3_world2"),
    "gptq_fsdp_world1_true_sequential": (
        "gptq_fsdp_fsdp2_world2_true_sequential",
        "gptq_fsdp_zero3_world2_true_sequential",
    ),
}
# the one-process run each pair of concurrent half runs is compared with
CONTENTION = {"standard": "gptq_fsdp_world1", "true-sequential": "gptq_fsdp_world1_true_sequential"}
DATA_PARALLEL_PHASES = ("forward", "hessian", "propagate")  # split by samples over the ranks
BACKEND_LABELS = {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}
PEERS = {"llmcompressor_ddp_world2": "highest", "llmcompressor_ddp_world2_bf16_matmul": "medium"}


def worker(backend: str, precision: str, true_sequential: bool, calibration: Path, output: Path, report: Path) -> None:
    """Under torchrun (or alone): quantize SmolLM2 with gptq_fsdp, save to `output` (unless it is "-") and
    write rank 0's report."""
    gptq_worker(MODEL, backend, precision, true_sequential, calibration, output, report)


def data_parallel_s(report: dict) -> float:
    return sum(report["phases_s"][p] for p in DATA_PARALLEL_PHASES)


def contention(world1: dict, alone: dict, together: list[dict]) -> dict:
    """Slowdown of the data-parallel phases when two processes share the machine (half of the samples
    alone, then both halves at once), and the ceiling it puts on T(1)/T(2): every phase of the
    one-process run split perfectly, the data-parallel ones slowed by that much."""
    slowdown = statistics.mean(data_parallel_s(h) for h in together) / data_parallel_s(alone)
    rest = world1["quantize_s"] - data_parallel_s(world1)
    ceiling = world1["quantize_s"] / (data_parallel_s(world1) / 2 * slowdown + rest / 2)
    return {
        "alone_data_parallel_s": data_parallel_s(alone),
        "together_data_parallel_s": [data_parallel_s(h) for h in together],
        "slowdown": slowdown,
        "scaling_ceiling": ceiling,
    }


def overlap_summary(timelines: list[list[dict]]) -> list[dict]:
    """Per rank: seconds in GPTQ, seconds blocked on collectives, and the first events of layer 0."""
    summary = []
    for rank, events in enumerate(timelines):
        gptq = sum(e["end"] - e["start"] for e in events if e["event"] == "gptq")
        wait = sum(e["end"] - e["start"] for e in events if e["event"] == "wait")
        first = [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()} for e in events if e["layer"] == 0
        ]
        summary.append({"rank": rank, "gptq_s": gptq, "blocked_on_transfers_s": wait, "layer0": first})
    return summary


def one_round() -> tuple[dict, dict, dict]:
    """Every gptq_fsdp run, the concurrent half runs and the peers once: their reports."""
    reports = {}
    for name, (world, backend, precision, true_sequential) in RUNS.items():
        report = WORK / f"{name}.json"
        launcher = torchrun(world)
        order = "true-sequential" if true_sequential else "standard"
        run([*launcher, __file__, "--worker", backend, precision, order, str(WORK / "calibration.pt"),
             str(WORK / name), str(report)])  # fmt: skip
        reports[name] = json.loads(report.read_text())
    halves = {}  # order: (half 0 alone, [half 0, half 1] at once)
    for order in CONTENTION:
        commands = [
            [sys.executable, __file__, "--worker", "single", "highest", order,
             str(WORK / f"calibration_half{h}.pt"), "-", str(WORK / f"half{h}_{order}.json")]
            for h in (0, 1)
        ]  # fmt: skip
        run(commands[0])
        alone = json.loads((WORK / f"half0_{order}.json").read_text())
        run(*commands)
        halves[order] = (alone, [json.loads((WORK / f"half{h}_{order}.json").read_text()) for h in (0, 1)])
    peers = {}
    for name, precision in PEERS.items():
        run(peer_command(MODEL, WORK / "calibration_ids.pt", WORK / name, WORK / f"{name}.json", world=2,
                         precision=precision))  # fmt: skip
        peers[name] = json.loads((WORK / f"{name}.json").read_text())
    return reports, halves, peers


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4] == "true-sequential", *(Path(a) for a in sys.argv[5:8]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="repeat every run this many times (default 2)")
    rounds = parser.parse_args().rounds
    tokenizer = prepare_job(samples=64, seq_len=512)
    from gptq_fsdp.data import CalibrationSet
    from gptq_fsdp.evaluate import text_tokens

    calibration = CalibrationSet.load(WORK / "calibration.pt")
    half = len(calibration) // 2
    for h, part in enumerate((slice(0, half), slice(half, None))):
        CalibrationSet(calibration.input_ids[part], calibration.attention_mask[part]).save(
            WORK / f"calibration_half{h}.pt"
        )
    measured = [one_round() for _ in range(rounds)]
    reports, _, peers = measured[-1]  # memory, phases and timelines from the last round (memory is the same in all)

    def median_s(pick) -> float:
        return statistics.median(pick(r) for r in measured)

    seconds = {name: median_s(lambda r, n=name: r[0][n]["quantize_s"]) for name in RUNS}
    seconds.update({name: median_s(lambda r, n=name: r[2][n]["quantize_s"]) for name in PEERS})
    peer_of = {name: next(p for p, precision in PEERS.items() if precision == RUNS[name][2]) for name in RUNS}

    tokens = text_tokens(tokenizer, AUSTEN / "persuasion.txt", 20480)
    ppl = {"fp32": score(MODEL, tokens, 2)}
    ppl.update({name: score(WORK / name, tokens, 2) for name in (*RUNS, *PEERS)})
    mem = {name: parameter_peak_bytes(reports[name]) for name in RUNS}
    world2 = [name for name, (ranks, *_) in RUNS.items() if ranks == 2]
    pairs = [(w1, name) for w1, names in SCALING.items() for name in names]
    per_round = [
        {
            "quantize_s": {**{n: rep[n]["quantize_s"] for n in RUNS}, **{n: peer[n]["quantize_s"] for n in PEERS}},
            "strong_scaling_T1_over_T2": {n: rep[w1]["quantize_s"] / rep[n]["quantize_s"] for w1, n in pairs},
            "machine": {order: contention(rep[w1], *halves[order]) for order, w1 in CONTENTION.items()},
            "phases_s": {n: rep[n]["phases_s"] for n in RUNS},
        }
        for rep, halves, peer in measured
    ]
    result = {
        "job": "SmolLM2-135M fp32, W4A16 group 64 symmetric, act-order static, 64 x 512 tokens of emma.txt; "
        "perplexity on 20480 tokens of persuasion.txt (1024-token windows); 1 thread per rank",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": rounds,
        "quantize_s_median": seconds,
        "strong_scaling_T1_over_T2_median": {name: seconds[w1] / seconds[name] for w1, name in pairs},
        "time_ratio_world2_over_peer_ddp_same_precision": {
            name: seconds[name] / seconds[peer_of[name]] for name in world2
        },
        "peak_parameter_bytes_per_rank": mem,
        "memory_ratio_world2_over_world1": {name: mem[name] / mem[w1] for w1, name in pairs},
        "perplexity": ppl,
        "per_round": per_round,
        "memory_per_rank": {name: reports[name]["memory_per_rank"] for name in RUNS},
        "overlap_world2": {name: overlap_summary(reports[name]["timelines"]) for name in world2},
        "peers": peers,
    }
    (RESULTS / "smollm2_sharded.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "smollm2_sharded.md").write_text(markdown(result, pairs))
    print(
        json.dumps(
            {k: result[k] for k in ("quantize_s_median", "strong_scaling_T1_over_T2_median", "perplexity")}, indent=2
        )
    )


RUN_HEADER = (
    "| fp32 matmuls | run | quantize wall time (s), median | each round | peak param. MiB per rank | perplexity "
    "| time / llm-compressor DDP |\n|---|---|---:|---:|---:|---:|---:|"
)
SCALING_HEADER = (
    "| at 2 ranks, IEEE fp32 | strong scaling T(1)/T(2), medians | each round | this machine's ceiling, each round "
    "| peak parameter memory / one process |\n|---|---:|---:|---:|---:|"
)


def markdown(result: dict, pairs: list[tuple[str, str]]) -> str:
    q, mib, ppl, mem = result["quantize_s_median"], 2**20, result["perplexity"], result["peak_parameter_bytes_per_rank"]
    labels = {
        name: f"gptq_fsdp, {'1 process' if ranks == 1 else f'{BACKEND_LABELS[backend]} {ranks} ranks'}"
        + (", true sequential" if true_sequential else "")
        for name, (ranks, backend, _, true_sequential) in RUNS.items()
    }
    ratio = result["time_ratio_world2_over_peer_ddp_same_precision"]
    rounds = result["per_round"]

    def times(name: str) -> str:
        return " / ".join(f"{r['quantize_s'][name]:.1f}" for r in rounds)

    rows = [
        f"| {RUNS[name][2]} | {labels[name]} | {q[name]:.1f} | {times(name)} | {mem[name] / mib:.0f} | {ppl[name]:.3f} "
        f"| {f'{ratio[name]:.3f}' if name in ratio else ''} |"
        for name in RUNS
    ]
    rows += [
        f"| {precision} | llm-compressor DDP 2 ranks | {q[name]:.1f} | {times(name)} | (full copy per rank) "
        f"| {ppl[name]:.3f} | |"
        for name, precision in PEERS.items()
    ]
    scaling, memory = result["strong_scaling_T1_over_T2_median"], result["memory_ratio_world2_over_world1"]
    order_of = {w1: order for order, w1 in CONTENTION.items()}
    scaling_rows = [
        f"| {labels[name]} | {scaling[name]:.2f}x | "
        + " / ".join(f"{r['strong_scaling_T1_over_T2'][name]:.2f}x" for r in rounds)
        + " | "
        + " / ".join(f"{r['machine'][order_of[w1]]['scaling_ceiling']:.2f}x" for r in rounds)
        + f" | {memory[name]:.3f} |"
        for w1, name in pairs
    ]
    machine_rows = [
        f"| {order} | "
        + " / ".join(f"{r['machine'][order]['alone_data_parallel_s']:.1f}" for r in rounds)
        + " | "
        + " / ".join(" & ".join(f"{s:.1f}" for s in r["machine"][order]["together_data_parallel_s"]) for r in rounds)
        + " | "
        + " / ".join(f"{r['machine'][order]['slowdown']:.3f}" for r in rounds)
        + " |"
        for order in CONTENTION
    ]
    return f"""# SmolLM2-135M: one process vs FSDP2 and ZeRO-3 at 2 ranks vs llm-compressor DDP ({result["date"]})

{result["job"]}. fp32 model perplexity {ppl["fp32"]:.3f}. "medium" = fp32 matmuls with bf16 products
(gptq_fsdp: calibration forwards and XᵀX only; llm-compressor: its whole run); time ratios compare
runs at the same precision. Every run done {result["rounds"]} times, round after round: times are
the median, then each round's.

{RUN_HEADER}
{chr(10).join(rows)}

{SCALING_HEADER}
{chr(10).join(scaling_rows)}

What this 2-core machine allows: half of the samples quantized in one process alone, then each half
in its own process, both at once (right after). Seconds of the data-parallel phases (calibration
forwards, XᵀX, propagation); the slowdown is what sharing the machine costs each process. The
ceiling divides T(1) by a perfect split of every phase with the data-parallel ones slowed by that
much.

| order | one half alone (s), each round | two halves at once (s), each round | slowdown, each round |
|---|---:|---:|---:|
{chr(10).join(machine_rows)}
"""


if __name__ == "__main__":
    main()
