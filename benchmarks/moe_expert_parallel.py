"""Expert-parallel calibration measured: the 64-expert upcycled SmolLM2 at 1, 2 and 3 ranks (FSDP2).

At each world size N > 1, two runs on the same calibration token ids: the all-experts path (every rank
unshards a layer's experts and holds every expert's Hessian, reduced to the experts' ranks) and
`expert_parallel` (the experts stay sharded, whole experts per rank; tokens travel to them). Reported
per run and rank, from gptq_fsdp's own count of its tensors (`MemoryStats`): one layer's expert
weights on the rank while it runs, the expert Hessian sums it holds, the dispatch buffers, the whole
parameter peak; beside them what `gptq-fsdp plan` predicts for the same config (CPU block layout,
fp32). Also the quantize wall time, the perplexity of every checkpoint, and whether every checkpoint
is the one-process one, tensor for tensor.

The model: `scripts/upcycle_smollm2.py --layout ernie --experts 64` (ERNIE-4.5-MoE layout, 64 experts
top-2 in every 6th layer: 5 MoE layers, 0.97 B parameters, fp32), built here if missing. W4 group 64
symmetric, act-order static, dampening 0.01, block 128, IEEE fp32 matmuls, 1 thread per rank (3 ranks
share the 2 cores of these machines: compare times at the same N only). Writes
benchmarks/results/moe_expert_parallel.{json,md}.

    python benchmarks/moe_expert_parallel.py [--samples 32] [--seq-len 512] [--ppl-tokens 8192] [--worlds 2 3]
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
from bench_common import AUSTEN, CACHE, REPO, RESULTS, SCHEME, WORK, gptq_worker, run, score, torchrun  # noqa: E402

MODEL = CACHE / "smollm2-moe-64"
MIB = 2**20
HEADER = (
    "| run | quantize s | expert weights MiB | expert Hessians MiB | dispatch MiB | parameter peak MiB | perplexity "
    "| checkpoint = 1 process |\n|---|---:|---:|---:|---:|---:|---:|---|"
)


def runs(worlds: list[int]) -> dict[str, tuple[int, bool]]:
    """name -> (ranks, expert_parallel)."""
    found = {"world1": (1, False)}
    for world in worlds:
        found[f"fsdp2_world{world}_all_experts"] = (world, False)
        found[f"fsdp2_world{world}_expert_parallel"] = (world, True)
    return found


def planned(model: Path, world: int, parallel: bool, samples: int, seq_len: int) -> list[dict[str, int]]:
    """What the planner predicts per rank for this run (CPU block layout, the model's fp32)."""
    from gptq_fsdp import GPTQConfig
    from gptq_fsdp.planner import PlanOptions, load_model_shape, parse_size, plan

    config = GPTQConfig.from_options(
        group_size=SCHEME["group_size"], actorder=SCHEME["actorder"], num_samples=samples, max_seq_length=seq_len,
        expert_parallel=parallel,
    )  # fmt: skip
    shape = load_model_shape(model / "config.json", dtype=torch.float32, config=config)
    options = PlanOptions(world_size=world, gpu_memory=parse_size("80GiB"), config=config, device_type="cpu")
    keys = {"expert_weight_bytes": "expert_weights", "expert_hessian_bytes": "expert_hessians"}
    keys["dispatch_bytes"] = "dispatch"
    ranks = plan(shape, options, advise=False).ranks
    return [{ours: getattr(r, theirs) for ours, theirs in keys.items()} for r in ranks]


def tensors_equal(folder: Path, reference: Path) -> tuple[int, int]:
    """(tensors that differ, tensors) between two checkpoints, read file by file."""
    from safetensors.torch import load_file

    def read(path: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}

    ours, theirs = read(folder), read(reference)
    if ours.keys() != theirs.keys():
        return len(ours.keys() ^ theirs.keys()), len(theirs)
    return sum(not torch.equal(ours[k], theirs[k]) for k in theirs), len(theirs)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        backend = "single" if spec["world"] == 1 else "fsdp2"
        gptq_worker(
            Path(spec["model"]), backend, "highest", False, *(Path(spec[k]) for k in ("calibration", "output",
            "report")), options={"expert_parallel": spec["expert_parallel"]},
        )  # fmt: skip
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--work", type=Path, default=WORK / "moe_expert_parallel")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "upcycle_smollm2.py"), "--layout", "ernie", "--experts", "64",
             "--output", str(args.model)], check=True,
        )  # fmt: skip
    from transformers import AutoTokenizer

    from gptq_fsdp.data import build_calibration, load_texts
    from gptq_fsdp.evaluate import text_tokens

    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = build_calibration(
        load_texts(str(AUSTEN / "emma.txt")), tokenizer, num_samples=args.samples, max_seq_length=args.seq_len
    )
    calibration.save(args.work / "calibration.pt")

    records = {}
    for name, (world, parallel) in runs(args.worlds).items():
        spec = {"model": str(args.model), "world": world, "expert_parallel": parallel,
                "calibration": str(args.work / "calibration.pt"), "output": str(args.work / name),
                "report": str(args.work / f"{name}.json")}  # fmt: skip
        launcher = torchrun(world) if world > 1 else [sys.executable]
        run([*launcher, __file__, "--worker", json.dumps(spec)])
        report = json.loads((args.work / f"{name}.json").read_text())
        records[name] = {
            "ranks": world,
            "expert_parallel": parallel,
            "quantize_s": report["quantize_s"],
            "quantize_cpu_s": report["quantize_cpu_s"],
            "phases_s": report["phases_s"],
            "memory_per_rank": report["memory_per_rank"],
            "planned_per_rank": planned(args.model, world, parallel, args.samples, args.seq_len),
        }
        print(f"{name}: quantize {report['quantize_s']:.1f} s", flush=True)

    tokens = text_tokens(tokenizer, AUSTEN / "persuasion.txt", args.ppl_tokens)
    perplexity = {"fp32": score(args.model, tokens, 2, strict=True)}
    for name, record in records.items():
        record["perplexity"] = perplexity[name] = score(args.work / name, tokens, 2, strict=True)
        differing, record["tensors"] = tensors_equal(args.work / name, args.work / "world1")
        record["tensors_differing_from_world1"] = differing
    config = json.loads((args.model / "config.json").read_text())
    result = {
        "job": f"SmolLM2-135M upcycled to ERNIE-4.5-MoE ({config['moe_num_experts']} experts, top-{config['moe_k']}, "
        f"every {config['moe_layer_interval']}th of {config['num_hidden_layers']} layers) fp32, W4A16 group "
        f"{SCHEME['group_size']} symmetric, act-order {SCHEME['actorder']}, {args.samples} x {args.seq_len} tokens "
        f"of emma.txt, perplexity on {args.ppl_tokens} tokens of persuasion.txt; FSDP2, 1 thread per rank",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "perplexity_fp32": perplexity["fp32"],
        "runs": records,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "moe_expert_parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "moe_expert_parallel.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = []
    for r in result["runs"].values():
        mine = r["memory_per_rank"] or []
        plan = r["planned_per_rank"]

        def per_rank(key: str, measured=mine, predicted=plan) -> str:
            values = " / ".join(f"{m[key] / MIB:.1f}" for m in measured)
            same = all(m[key] == p[key] for m, p in zip(measured, predicted, strict=True))
            return values + ("" if same else " (plan: " + " / ".join(f"{p[key] / MIB:.1f}" for p in predicted) + ")")

        peak = " / ".join(
            f"{(m['shard_bytes'] + m['layer_unsharded_bytes'] + m['owned_weight_bytes']) / MIB:.0f}" for m in mine
        )
        dispatch = " / ".join(f"{m['dispatch_bytes'] / MIB:.1f}" for m in mine)
        how = (
            "1 process"
            if r["ranks"] == 1
            else f"{r['ranks']} ranks, " + ("expert-parallel" if r["expert_parallel"] else "all experts on every rank")
        )
        same = "yes" if r["tensors_differing_from_world1"] == 0 else f"**{r['tensors_differing_from_world1']} differ**"
        rows.append(
            f"| {how} | {r['quantize_s']:.1f} | {per_rank('expert_weight_bytes')} | {per_rank('expert_hessian_bytes')} "
            f"| {dispatch} (plan {plan[0]['dispatch_bytes'] / MIB:.1f}) | {peak} | {r['perplexity']:.3f} | {same} |"
        )
    ratios = []
    for name, r in result["runs"].items():
        if r["expert_parallel"]:
            other = result["runs"][name.replace("expert_parallel", "all_experts")]
            ratios.append(f"{r['ranks']} ranks {r['quantize_s'] / other['quantize_s']:.3f}")
    return f"""# Expert-parallel calibration on the 64-expert upcycled SmolLM2 ({result["date"]})

{result["job"]}; {result["machine"]}. fp32 model perplexity {result["perplexity_fp32"]:.3f}. Per-rank
figures are rank 0 / rank 1 / ..., in MiB, measured from the run's own tensors; where the planner
(`gptq-fsdp plan`, CPU layout) predicts another figure it follows in parentheses. "Expert weights": one
layer's experts on the rank while it runs (its stored experts, plus the whole experts a layer's
unshard makes); "expert Hessians": the expert Hessian sums it holds at once; dispatch: the most bytes
of dispatch buffers at once (the plan's figure assumes balanced routing).

{HEADER}
{chr(10).join(rows)}

Expert-parallel time / all-experts time at the same world size: {", ".join(ratios)}.
"""


if __name__ == "__main__":
    main()
