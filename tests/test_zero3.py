"""DeepSpeed ZeRO-3 on 2 and 3 CPU ranks (gloo) against one process (which FSDP2 equals too, test_fsdp2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from sharded_helpers import ENV, REPO, dequantized, logits_at_rank_threads, run_workers
from transformers import AutoModelForCausalLM

# case: (world, --load, samples)
CASES = {
    "2-ranks": (2, "zero3", 12),
    "3-ranks-uneven-samples": (3, "zero3", 7),
    "2-ranks-offload": (2, "zero3-offload", 12),
}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, austen, tmp_path_factory):
    """The CASES' worker runs, one launch per world size."""
    directory = tmp_path_factory.mktemp("zero3-runs")
    for world in (2, 3):
        jobs = [
            [str(tiny_llama_dir), str(directory / case), str(directory / f"{case}.json"), "--text",
             str(austen / "emma.txt"), "--load", load, "--samples", str(samples)]
            for case, (w, load, samples) in CASES.items() if w == world
        ]  # fmt: skip
        run_workers(world, jobs, directory)
    return directory


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_zero3_equals_single_process(case, runs, reference):
    """Bit for bit the one-process run, as FSDP2 is (test_fsdp2): so the two backends write the same
    checkpoint, at 2 ranks and at 3 ranks with uneven numbers of batches."""
    (world, _, samples), output = CASES[case], runs / case
    report = json.loads((runs / f"{case}.json").read_text())
    assert report["backend"] == "zero3" and report["world"] == world
    rows, cols = report["k_proj_shape"]
    partition = report["k_proj_local_numels"][0]  # ceil(numel / world) elements on every rank
    assert partition == -(-rows * cols // world)
    if world == 3:  # this run's flat partitions end inside a row, and inside a 32-column group
        assert partition % cols != 0 and partition % cols % 32 != 0
    assert len(set(report["owners"].values())) == world
    zero3_model, zero3 = dequantized(output)
    single_model, single = reference[samples]
    assert all(torch.equal(zero3[k], single[k]) for k in single), "the same batches: bit-identical"
    ids = torch.tensor(report["input_ids"])
    in_memory = torch.tensor(report["logits"])  # ZeRO-3's own forward after quantization
    # Same weights, ids and thread count as that forward: the same logits.
    assert torch.equal(logits_at_rank_threads(zero3_model, ids), in_memory)
    assert torch.equal(logits_at_rank_threads(single_model, ids), in_memory)
    for memory in report["memory_per_rank"]:  # each rank stores a 1/world slice of every tensor
        # ceil(numel/world) elements of each tensor: at most one fp32 element of padding per tensor
        # beyond an even split, for the tiny Llama's < 200 tensors.
        assert memory["shard_bytes"] <= report["model_bytes"] / world + 4 * 200


@pytest.mark.distributed
def test_deepspeed_launcher_runs_the_cli(tiny_llama_dir, austen, tmp_path):
    output = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29731",
        "--module", "gptq_fsdp", "quantize", str(tiny_llama_dir), "--backend", "zero3",
        "--dataset", str(austen / "emma.txt"), "--num-samples", "4", "--max-seq-length", "32",
        "--batch-size", "2", "--group-size", "32", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 rank(s) (zero3)" in done.stdout
    model = AutoModelForCausalLM.from_pretrained(output)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


@pytest.mark.distributed
def test_accelerate_launch_with_the_zero3_cpu_config(tiny_llama_dir, austen, tmp_path):
    output = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero3_cpu.yaml"),
        "-m", "gptq_fsdp", "quantize", str(tiny_llama_dir), "--dataset", str(austen / "emma.txt"),
        "--num-samples", "4", "--max-seq-length", "32", "--batch-size", "2", "--group-size", "32",
        "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on 2 rank(s) (zero3)" in done.stdout
    assert len(list(output.glob("model-*-of-00002.safetensors"))) == 2


def test_zero_hooks_set_aside_and_put_back_in_place():
    from gptq_fsdp.compat import zero_hooks_set_aside

    calls = []

    def zero_pre(module, args):
        calls.append("zero pre")

    def zero_post(module, args, output):
        calls.append("zero post")

    zero_pre.__module__ = zero_post.__module__ = "deepspeed.runtime.zero.parameter_offload"  # as ZeRO's are
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    linear = layer[0]
    linear.register_forward_pre_hook(zero_pre)
    ours = linear.register_forward_pre_hook(lambda m, a: calls.append("ours"))
    linear.register_forward_hook(zero_post)
    x = torch.randn(2, 4)
    with zero_hooks_set_aside(layer):
        layer(x)
        assert calls == ["ours"], "ZeRO's hooks must not run inside"
        late = linear.register_forward_pre_hook(lambda m, a: calls.append("late"))
    calls.clear()
    layer(x)
    assert calls == ["zero pre", "ours", "late", "zero post"], "original order, new hooks last"
    ours.remove()
    late.remove()
    calls.clear()
    layer(x)
    assert calls == ["zero pre", "zero post"]
