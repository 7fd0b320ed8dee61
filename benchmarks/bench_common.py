"""What the benchmarks share: paths, the GPTQ scheme, the calibration job, scoring, launching runs,
the gptq_fsdp worker and the llm-compressor command line. Not a benchmark itself."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = Path(os.environ.get("GPTQ_FSDP_AUSTEN", REPO.parent / "shared" / "data" / "austen"))
CACHE = Path(os.environ.get("GPTQ_FSDP_CACHE", Path.home() / ".cache" / "gptq_fsdp"))
SMOLLM2 = CACHE / "smollm2-135m"
PEER_PYTHON = REPO / "benchmarks" / ".venv-llmc" / "bin" / "python"
PEER_SCRIPT = REPO / "benchmarks" / "peer_llmcompressor.py"
WORK = REPO / "benchmarks" / "work"
RESULTS = REPO / "benchmarks" / "results"
# min-max scales (the peers' default, not gptq_fsdp's): the sharded, MoE and expert-parallel benchmarks
# compare the same scheme; smollm2_draws.py compares the scale searches.
SCHEME = dict(group_size=64, actorder="static", dampening=0.01, block_size=128, scale_search="minmax")


def prepare_job(samples: int, seq_len: int, model: Path = SMOLLM2, work: Path = WORK, peer: Path = PEER_PYTHON):
    """Check the peer's venv (`peer`: its python, made by benchmarks/setup_<peer>.sh); write the
    calibration set from Emma (ours, `calibration.pt`, and the same token ids for the peer,
    `calibration_ids.pt`) into `work`; return the tokenizer."""
    if not peer.exists():
        sys.exit(f"the peer's venv is missing ({peer}): run the benchmarks/setup_*.sh that makes it first")
    from transformers import AutoTokenizer

    from gptq_fsdp.data import build_calibration, load_texts

    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = load_texts(str(AUSTEN / "emma.txt"))
    calibration = build_calibration(texts, tokenizer, num_samples=samples, max_seq_length=seq_len)
    calibration.save(work / "calibration.pt")
    torch.save(calibration.input_ids, work / "calibration_ids.pt")
    return tokenizer


def score(model_dir: Path, tokens: torch.Tensor, threads: int, strict: bool = False) -> float:
    """Perplexity of a model folder (a checkpoint of either tool, reloaded by transformers +
    compressed-tensors in this venv) on `tokens`, in 1024-token windows. `strict`: a tensor the files
    lack (transformers would initialise it at random) or one the model does not know is an error."""
    from transformers import AutoModelForCausalLM

    from gptq_fsdp.evaluate import perplexity

    torch.set_num_threads(threads)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    unknown = {k: sorted(info[k])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if strict and unknown:
        raise RuntimeError(f"{model_dir} does not reload as its model: {unknown}")
    return perplexity(model.eval(), tokens)


def run(*commands: list[str]) -> None:
    """Run the commands at the same time (1 thread each) and wait for all of them."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    # stderr to files, not pipes: a pipe read only after an earlier process ends could fill and stall
    # a process that is still being timed.
    with tempfile.TemporaryDirectory() as logs:
        running = []
        for i, command in enumerate(commands):
            with open(Path(logs) / f"{i}.err", "w") as err:
                running.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err))
        for i, (command, process) in enumerate(zip(commands, running, strict=True)):
            if process.wait() != 0:
                stderr = (Path(logs) / f"{i}.err").read_text()
                raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-4000:]}")


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def gptq_worker(
    model_dir: Path,
    backend: str,
    precision: str,
    true_sequential: bool,
    calibration: Path,
    output: Path,
    report: Path,
    *,
    fsdp2_load: str = "sharded",
    options: dict | None = None,
) -> None:
    """Under torchrun (or alone), 1 thread: quantize `model_dir` with gptq_fsdp, save to `output` (unless
    it is "-") and write rank 0's report.

    `backend` is "single", "fsdp2" or "zero3". `fsdp2_load`: "sharded" (each rank reads its rows),
    "rank0" (rank 0 loads through transformers and sends the rows) or "auto" (sharded where the files
    allow it, else rank0; the report says which). `options` go to `GPTQConfig.from_options` as well.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_fsdp import CalibrationSet, GPTQConfig, quantize_model, save_quantized
    from gptq_fsdp.distributed import collectives
    from gptq_fsdp.distributed.launch import FSDPSettings, LaunchError, init_distributed
    from gptq_fsdp.distributed.loading import load_rank0_broadcast, load_sharded, load_zero3

    torch.set_num_threads(1)
    world = init_distributed(deepspeed_comm=backend == "zero3")
    start = time.perf_counter()
    load = {"zero3": "zero3", "fsdp2": fsdp2_load}.get(backend, "whole")
    fsdp = FSDPSettings(expert_parallel=bool((options or {}).get("expert_parallel")))
    if backend == "zero3":
        model = load_zero3(model_dir)
    elif backend == "fsdp2" and load == "rank0":
        model = load_rank0_broadcast(model_dir, settings=fsdp)
    elif backend == "fsdp2":
        try:
            model = load_sharded(model_dir, settings=fsdp)
            load = "sharded"
        except LaunchError:
            if fsdp2_load != "auto":
                raise
            model, load = load_rank0_broadcast(model_dir, settings=fsdp), "rank0"
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - start
    settings = dict(
        group_size=SCHEME["group_size"],
        actorder=SCHEME["actorder"],
        dampening_frac=SCHEME["dampening"],
        scale_search=SCHEME["scale_search"],
        matmul_precision=precision,
        true_sequential=true_sequential,
    )
    try:
        config = GPTQConfig.from_options(**{**settings, **(options or {})})
    except TypeError:  # an option `from_options` does not spell: a field of GPTQConfig (checked by replace)
        config = dataclasses.replace(GPTQConfig.from_options(**settings), **(options or {}))
    if world > 1:
        torch.distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result = quantize_model(model, CalibrationSet.load(calibration), config)
    quantize_s, quantize_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    if str(output) != "-":
        save_quantized(model, output, result, tokenizer=AutoTokenizer.from_pretrained(model_dir), overwrite=True)
    save_s = time.perf_counter() - start
    timelines = collectives.gather_objects(result.timeline)
    if result.backend.rank == 0:
        partial = report.with_name(report.name + ".partial")  # renamed when whole: a report is complete or absent
        partial.write_text(
            json.dumps(
                {
                    "world": world,
                    "load": load,
                    "load_s": load_s,
                    "quantize_s": quantize_s,
                    "quantize_cpu_s": quantize_cpu_s,  # rank 0's CPU time: how much of the wall time it ran
                    "save_s": save_s,
                    "phases_s": result.phases,
                    "memory_per_rank": [dataclasses.asdict(m) for m in result.memory_per_rank],
                    "timelines": timelines,
                    # MoE expert slices short of tokens, quantized with their layer's pooled Hessian
                    "pooled_expert_slices": sum(r.hessian == "pooled" for r in result.modules.values()),
                }
            )
        )
        partial.replace(report)
    if world > 1:
        torch.distributed.destroy_process_group()  # as the CLI does: no process group left to tear down at exit


def parameter_peak_bytes(report: dict) -> int:
    """The largest per-rank parameter peak of a gptq_fsdp report: the rank's shards, the largest whole
    layer it unsharded for a forward and the gathered weights it held for GPTQ."""
    return max(
        m["shard_bytes"] + m["layer_unsharded_bytes"] + m["owned_weight_bytes"] for m in report["memory_per_rank"]
    )


def peer_command(
    model_dir: Path, calibration_ids: Path, output: Path, report: Path, *, world: int, precision: str = "highest",
    extra: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    """The llm-compressor run (its own venv) on the same token ids and scheme, 1 thread per process;
    under torchrun (its DDP) when `world` > 1."""
    launcher = [str(PEER_PYTHON)]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    return [
        *launcher, str(PEER_SCRIPT), "--model", str(model_dir), "--calibration", str(calibration_ids),
        "--output", str(output), "--group-size", str(SCHEME["group_size"]), "--actorder", SCHEME["actorder"],
        "--dampening", str(SCHEME["dampening"]), "--block-size", str(SCHEME["block_size"]),
        "--matmul-precision", precision, "--threads", "1", "--json", str(report), *extra,
    ]  # fmt: skip
