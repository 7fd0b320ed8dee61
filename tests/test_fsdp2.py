"""FSDP2 on 2 and 3 CPU ranks (gloo) against one process on the same calibration data."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model
from sharded_helpers import ENV, REPO, dequantized, logits_at_rank_threads, run_workers, single_process
from test_models import load_tensors
from transformers import AutoModelForCausalLM

from gptq_fsdp.distributed.schedule import assign_owners, gptq_cost, packing_cost

# case: (world, samples); --load rank0: test_moe_files_load_sharded_as_with_the_rank0_load
CASES = {"2-ranks": (2, 12), "3-ranks-uneven-samples": (3, 7), "3-ranks-64-samples": (3, 64)}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, smollm2_dir, austen, tmp_path_factory):
    """This file's worker runs, one launch per world size: the CASES, and at 2 ranks bf16 matmuls
    (`medium`), a GPT-NeoX (files with renamed tensors) and a Mixtral loaded both ways."""
    directory = tmp_path_factory.mktemp("fsdp2-runs")
    text = ["--text", str(austen / "emma.txt")]

    def job(model, name, *extra):
        return [str(model), str(directory / name), str(directory / f"{name}.json"), *text, *extra]

    gpt_neox = make_tiny_model("gpt_neox", directory / "gpt_neox", smollm2_dir)
    mixtral = make_tiny_model("mixtral", directory / "mixtral", smollm2_dir)
    for world in (2, 3):
        jobs = [job(tiny_llama_dir, case, "--samples", str(n)) for case, (w, n) in CASES.items() if w == world]
        if world == 2:
            jobs += [job(tiny_llama_dir, "medium", "--matmul-precision", "medium"), job(gpt_neox, "gpt_neox-ckpt")]
            jobs += [job(mixtral, f"mixtral-{load}", "--load", load, "--samples", "4") for load in ("sharded", "rank0")]
            jobs += [job(mixtral, "mixtral-expert-parallel", "--samples", "4", "--expert-parallel")]
        run_workers(world, jobs, directory)
    return directory


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_single_process(case, runs, reference):
    (world, samples), output = CASES[case], runs / case
    report = json.loads((runs / f"{case}.json").read_text())
    assert report["backend"] == "fsdp2" and report["world"] == world
    rows, cols = report["k_proj_shape"]
    k_proj_rows = [n // cols for n in report["k_proj_local_numels"]]
    assert sum(k_proj_rows) == rows
    if world == 3:  # the shards this run compared are uneven (32 k_proj rows -> 11, 11, 10)
        assert len(set(k_proj_rows)) > 1, k_proj_rows
    assert len(set(report["owners"].values())) == world, "every rank should own some GPTQ work"
    assert report["timeline_events"] > 0
    files = sorted(p.name for p in output.glob("*.safetensors"))
    assert files == [f"model-{r:05d}-of-{world:05d}.safetensors" for r in range(1, world + 1)]
    model_bytes, layer_bytes = report["model_bytes"], report["layer_bytes"]
    for memory in report["memory_per_rank"]:
        # Each rank stores its own rows (a row more per tensor at most), never the whole model; one
        # whole layer at a time; GPTQ weights of its own units only.
        assert memory["shard_bytes"] <= model_bytes / world + layer_bytes
        assert memory["layer_unsharded_bytes"] == layer_bytes
        assert 0 < memory["owned_weight_bytes"] <= layer_bytes

    sharded_model, sharded = dequantized(output)
    single_model, single = reference[samples]  # one process runs the same batches (sharded_helpers)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single), "same matmuls as the reference: same bits"

    # The saved checkpoint is what the ranks computed with: their in-memory logits, from the same
    # weights, ids and thread count.
    ids = torch.tensor(report["input_ids"])
    in_memory = torch.tensor(report["logits"])
    assert torch.equal(logits_at_rank_threads(sharded_model, ids), in_memory)
    assert torch.equal(logits_at_rank_threads(single_model, ids), in_memory)


@pytest.mark.distributed
def test_fast_matmul_precision_keeps_sharded_equal_to_single_process(runs, tiny_llama_dir, austen, tmp_path):
    """bf16 products in the forwards and XᵀX (matmul_precision='medium'): 2 ranks == 1 process, bit for bit."""
    output = runs / "medium"
    single = single_process(tiny_llama_dir, tmp_path / "single", austen / "emma.txt", 12, matmul_precision="medium")
    _, sharded = dequantized(output)
    _, expected = dequantized(single)
    assert sharded.keys() == expected.keys()
    assert all(torch.equal(sharded[k], expected[k]) for k in expected)


@pytest.mark.distributed
def test_moe_files_load_sharded_as_with_the_rank0_load(runs):
    """Mixtral's files hold per-expert weights that transformers 5 fuses while loading: the default
    (sharded) load reads each rank's experts from them (tests/test_moe.py checks the shards and the
    tensors read), and its checkpoint is the rank-0 load's, tensor for tensor; so is the checkpoint
    of expert-parallel calibration (2 experts on each rank; 3 ranks: tests/test_moe.py)."""
    runs_of = ("sharded", "rank0", "expert-parallel")
    sharded, rank0, parallel = (load_tensors(runs / f"mixtral-{name}") for name in runs_of)
    assert sharded.keys() == rank0.keys() and "model.layers.1.block_sparse_moe.experts.3.w3.weight_packed" in sharded
    assert [k for k in rank0 if not torch.equal(sharded[k], rank0[k])] == []
    assert parallel.keys() == rank0.keys()
    assert [k for k in rank0 if not torch.equal(parallel[k], rank0[k])] == []


@pytest.mark.distributed
def test_files_with_renamed_tensors_load_sharded(runs, austen, tmp_path):
    """GPT-NeoX's files name the lm_head embed_out (transformers 5 renames it while loading): each
    rank still reads only its slices, and the result is the one-process one."""
    model_dir, output = runs / "gpt_neox", runs / "gpt_neox-ckpt"
    sharded_model, _ = dequantized(output)
    single_model, _ = dequantized(single_process(model_dir, tmp_path / "single", austen / "emma.txt", 12))
    sharded, single = sharded_model.state_dict(), single_model.state_dict()
    assert sharded.keys() == single.keys() and "gpt_neox.layers.1.mlp.dense_4h_to_h.weight" in single
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    assert "embed_out.weight" in index and "lm_head.weight" not in index


@pytest.mark.distributed
def test_accelerate_launch_with_the_cpu_config(tiny_llama_dir, austen, tmp_path):
    output = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu.yaml"),
        "-m", "gptq_fsdp", "quantize", str(tiny_llama_dir), "--dataset", str(austen / "emma.txt"),
        "--num-samples", "4", "--max-seq-length", "32", "--batch-size", "2", "--group-size", "32",
        "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "on 2 rank(s) (fsdp2)" in done.stdout
    assert len(list(output.glob("model-*-of-00002.safetensors"))) == 2
    model = AutoModelForCausalLM.from_pretrained(output)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


LLAMA3_8B_LAYER = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate+up, down
MIXTRAL_LAYER = [(6144, 4096), (4096, 4096)] + [(28672, 4096), (4096, 14336)] * 8  # 8 experts
SMOLLM2_LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def optimal_makespan(costs: list[float], world: int) -> float:
    """The best possible busiest-rank load, by trying every assignment (small cases only)."""
    return min(
        max(sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world))
        for owners in itertools.product(range(world), repeat=len(costs))
    )


# The limits below hold for any cost model (no fitted constant in them): LPT packing's makespan is at
# most (4/3 - 1/(3m))·optimum (Graham 1969), and greedy list packing's at most mean + (1 - 1/m)·the
# largest job (the last job placed starts at or below the mean).
@pytest.mark.parametrize("world", [2, 4, 8])
def test_owner_assignment_balances_moe_layers(world):
    assignment = assign_owners(MIXTRAL_LAYER, world)
    costs = [gptq_cost(r, c) for r, c in MIXTRAL_LAYER]
    assert max(assignment.loads) <= sum(costs) / world + (1 - 1 / world) * max(costs) * (1 + 1e-12)
    assert sorted(set(assignment.owners)) == list(range(world))
    assert sum(assignment.loads) == pytest.approx(sum(costs))  # every group placed once


@pytest.mark.parametrize("layer", [SMOLLM2_LAYER, LLAMA3_8B_LAYER], ids=["smollm2", "llama-3-8b"])
@pytest.mark.parametrize("world", [2, 3])
def test_owner_assignment_on_dense_layers(layer, world):
    costs = [gptq_cost(r, c) for r, c in layer]
    assert max(assign_owners(layer, world).loads) <= (4 / 3 - 1 / (3 * world)) * optimal_makespan(costs, world) * (
        1 + 1e-12
    )


def test_owner_assignment_puts_a_dominant_group_alone():
    # Llama-3-8B: down_proj's Cholesky (14336³) outweighs the rest, so the best possible is that group
    # alone on one rank; LPT reaches exactly that bound.
    assignment = assign_owners(LLAMA3_8B_LAYER, 2)
    assert max(assignment.loads) == pytest.approx(gptq_cost(4096, 14336))
    assert assignment.owners[3] != assignment.owners[2]


def test_packing_owners_balance_elements():
    """True-sequential owners only pack, a cost of one pass over the elements: SmolLM2's gate+up
    (3072·576 = 1,769,472 elements) weighs exactly what the other three units weigh together
    (960·576 + 576·576 + 576·1536), so LPT's packing is perfect (exact integer costs)."""
    by_elements = assign_owners(SMOLLM2_LAYER, 2, packing_cost)
    assert by_elements.loads == [1_769_472.0, 1_769_472.0]
    assert by_elements.owners[2] not in {by_elements.owners[i] for i in (0, 1, 3)}
