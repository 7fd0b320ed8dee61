"""FSDP2 on 2 and 3 CPU ranks (gloo) against one process on the same calibration data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model
from sharded_helpers import ENV, REPO, dequantized, single_process, torchrun
from transformers import AutoModelForCausalLM

from gptq_fsdp.schedule import assign_owners, gptq_cost, packing_cost


@pytest.mark.parametrize(
    "world,load,samples",
    [(2, "sharded", 12), (3, "sharded", 12), (3, "rank0", 12), (3, "sharded", 7)],
    ids=["2-ranks", "3-ranks", "3-ranks-rank0-load", "3-ranks-uneven-samples"],
)
def test_sharded_equals_single_process(world, load, samples, tiny_llama_dir, austen, tmp_path, reference):
    output, report_path = tmp_path / "ckpt", tmp_path / "report.json"
    torchrun(
        world, str(REPO / "tests" / "fsdp_worker.py"), str(tiny_llama_dir), str(output), str(report_path),
        "--text", str(austen / "emma.txt"), "--load", load, "--samples", str(samples),
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["backend"] == "fsdp2" and report["world"] == world
    assert len(set(report["owners"].values())) == world, "every rank should own some GPTQ work"
    assert report["timeline_events"] > 0
    files = sorted(p.name for p in output.glob("*.safetensors"))
    assert files == [f"model-{r:05d}-of-{world:05d}.safetensors" for r in range(1, world + 1)]

    sharded_model, sharded = dequantized(output)
    single_model, single = reference[samples]
    assert sharded.keys() == single.keys()
    same = sum((sharded[k] == single[k]).sum().item() for k in single)
    total = sum(v.numel() for v in single.values())
    if samples == 12:  # batches line up across world sizes: bit-identical
        assert same == total
    else:  # 7 samples on 3 ranks: other batch shapes, so fp32 rounding may differ
        assert same / total >= 0.999
        for key in single:  # within one quantization step (the scale is at most max|w|/7.5)
            step = single[key].abs().amax(dim=1, keepdim=True) / 7.5 + 1e-12
            assert ((sharded[key] - single[key]).abs() / step).max() <= 1 + 1e-4

    ids = torch.tensor(report["input_ids"])
    in_memory = torch.tensor(report["logits"])
    torch.testing.assert_close(sharded_model(ids).logits, in_memory, atol=1e-5, rtol=0)
    if samples == 12:
        torch.testing.assert_close(single_model(ids).logits, in_memory, atol=1e-5, rtol=0)


def test_fast_matmul_precision_keeps_sharded_equal_to_single_process(tiny_llama_dir, austen, tmp_path):
    """bf16 products in the forwards and XᵀX (matmul_precision='medium'): 2 ranks == 1 process, bit for bit."""
    output = tmp_path / "ckpt"
    torchrun(
        2, str(REPO / "tests" / "fsdp_worker.py"), str(tiny_llama_dir), str(output), str(tmp_path / "report.json"),
        "--text", str(austen / "emma.txt"), "--matmul-precision", "medium",
    )  # fmt: skip
    single = single_process(tiny_llama_dir, tmp_path / "single", austen / "emma.txt", 12, matmul_precision="medium")
    _, sharded = dequantized(output)
    _, expected = dequantized(single)
    assert sharded.keys() == expected.keys()
    assert all(torch.equal(sharded[k], expected[k]) for k in expected)


def test_moe_files_converted_on_load_need_the_rank0_load(tmp_path, smollm2_dir, austen):
    """Mixtral's files hold per-expert weights that transformers 5 fuses while loading: reading each
    rank's slices from them is refused before any weight is read, and --load rank0 gives the
    one-process result."""
    model_dir = make_tiny_model("mixtral", tmp_path / "mixtral", smollm2_dir)
    refused = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptq_fsdp",
         "quantize", str(model_dir), "--dataset", str(austen / "emma.txt"), "--num-samples", "4",
         "--max-seq-length", "32", "--group-size", "32", "--output", str(tmp_path / "refused")],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "model.layers.0.mlp.experts.gate_up_proj" in refused.stderr and "Use --load rank0" in refused.stderr
    assert not (tmp_path / "refused").exists()

    output = tmp_path / "ckpt"
    torchrun(
        2, str(REPO / "tests" / "fsdp_worker.py"), str(model_dir), str(output), str(tmp_path / "report.json"),
        "--text", str(austen / "emma.txt"), "--load", "rank0",
    )  # fmt: skip
    _, sharded = dequantized(output)
    _, single = dequantized(single_process(model_dir, tmp_path / "single", austen / "emma.txt", 12))
    assert sharded.keys() == single.keys() and "model.layers.1.self_attn.o_proj.weight" in single
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_files_with_renamed_tensors_load_sharded(tmp_path, smollm2_dir, austen):
    """GPT-NeoX's files name the lm_head embed_out (transformers 5 renames it while loading): each
    rank still reads only its slices, and the result is the one-process one."""
    model_dir = make_tiny_model("gpt_neox", tmp_path / "gpt_neox", smollm2_dir)
    output = tmp_path / "ckpt"
    torchrun(
        2, str(REPO / "tests" / "fsdp_worker.py"), str(model_dir), str(output), str(tmp_path / "report.json"),
        "--text", str(austen / "emma.txt"),
    )  # fmt: skip
    sharded_model, _ = dequantized(output)
    single_model, _ = dequantized(single_process(model_dir, tmp_path / "single", austen / "emma.txt", 12))
    sharded, single = sharded_model.state_dict(), single_model.state_dict()
    assert sharded.keys() == single.keys() and "gpt_neox.layers.1.mlp.dense_4h_to_h.weight" in single
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    assert "embed_out.weight" in index and "lm_head.weight" not in index


def test_uneven_row_shards_exist_in_the_tiny_model(tiny_llama_dir):
    """The 3-rank runs above cut rows unevenly (e.g. 32 k_proj rows -> 11, 11, 10)."""
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    kv_rows = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert kv_rows % 3 != 0 and config["intermediate_size"] % 3 != 0


def test_peak_parameter_memory_per_rank(tiny_llama_dir, austen, tmp_path):
    report_path = tmp_path / "report.json"
    torchrun(
        3, str(REPO / "tests" / "fsdp_worker.py"), str(tiny_llama_dir), str(tmp_path / "ckpt"), str(report_path),
        "--text", str(austen / "emma.txt"),
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    model_bytes, layer_bytes = report["model_bytes"], report["layer_bytes"]
    for memory in report["memory_per_rank"]:
        # Each rank stores its own rows (rounded up per tensor), never the whole model.
        assert memory["shard_bytes"] <= model_bytes / 3 + 3 * layer_bytes / 3
        assert memory["layer_unsharded_bytes"] == layer_bytes  # one whole layer at a time, no more
        assert 0 < memory["owned_weight_bytes"] <= layer_bytes
        peak = memory["shard_bytes"] + memory["layer_unsharded_bytes"] + memory["owned_weight_bytes"]
        assert peak <= model_bytes / 3 + 2 * layer_bytes + memory["owned_weight_bytes"]
        assert peak < 0.6 * model_bytes


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


@pytest.mark.parametrize("world", [2, 4, 8])
def test_owner_assignment_balances_moe_layers(world):
    assignment = assign_owners(MIXTRAL_LAYER, world)
    assert assignment.balance <= 1.05
    assert sorted(set(assignment.owners)) == list(range(world))


def test_owner_assignment_on_dense_layers():
    # SmolLM2 at 2 ranks: within 12 % of perfect.
    assert assign_owners(SMOLLM2_LAYER, 2).balance <= 1.12
    # Llama-3-8B: down_proj's Cholesky (14336³) outweighs the rest, so the best possible is that group
    # alone on one rank; LPT reaches exactly that bound.
    assignment = assign_owners(LLAMA3_8B_LAYER, 2)
    assert max(assignment.loads) == pytest.approx(gptq_cost(4096, 14336))
    assert assignment.owners[3] != assignment.owners[2]


def test_packing_owners_balance_elements():
    """True-sequential owners only pack: SmolLM2's gate+up (1.77 M elements) against the other three
    units (1.76 M), where the GPTQ cost model would give down_proj's rank a quarter of the elements."""
    by_elements = assign_owners(SMOLLM2_LAYER, 2, packing_cost)
    assert by_elements.balance < 1.01
    assert by_elements.owners[2] not in {by_elements.owners[i] for i in (0, 1, 3)}
    by_gptq = assign_owners(SMOLLM2_LAYER, 2)
    elements = [0, 0]
    for (rows, cols), owner in zip(SMOLLM2_LAYER, by_gptq.owners, strict=True):
        elements[owner] += rows * cols
    assert max(elements) / (sum(elements) / 2) > 1.4


def test_layer_param_groups_in_older_and_newer_torch():
    """torch 2.13's FSDP state keeps a list of parameter groups, 2.11's one optional group (seen on a GPU
    machine); layer_unsharded needs both."""
    from types import SimpleNamespace

    from gptq_fsdp.backends.fsdp2 import _param_groups

    def module(**state):
        return SimpleNamespace(_get_fsdp_state=lambda: SimpleNamespace(**state))

    assert _param_groups(module(_fsdp_param_groups=("a", "b"))) == ["a", "b"]
    assert _param_groups(module(_fsdp_param_group="a")) == ["a"]
    assert _param_groups(module(_fsdp_param_group=None)) == []
