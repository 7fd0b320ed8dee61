"""vLLM (its CPU build, in its own venv) serves every kind of checkpoint the tool writes and computes
what transformers computes from the same folder: the perplexity of held-out text within the margin
derived from bf16 arithmetic (`scripts/vllm_check.py`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny_model
from safetensors.torch import load_file, save_file
from sharded_helpers import ENV, single_process, torchrun
from transformers import AutoTokenizer

from gptq_fsdp.evaluate import text_tokens

sys.path.insert(0, str(REPO / "scripts"))
import vllm_check  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# vLLM's CPU attention needs head_dim >= 32 and its W4A16 kernel layer sizes that are multiples of
# 32; the suite's other tiny models have head_dim 16. hidden 128 lets group 128 apply.
SERVABLE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
FAMILIES = {
    "llama": SERVABLE,
    "qwen2": SERVABLE,
    "qwen3": SERVABLE,
    "mistral": SERVABLE,
    "gemma3_text": SERVABLE,
    "phi3": SERVABLE,  # not Llama's layout: fused qkv_proj and gate_up_proj
    "opt": dict(  # not Llama's: learned positions, biases, LayerNorm
        hidden_size=128, ffn_dim=256, num_attention_heads=2, word_embed_proj_dim=128, max_position_embeddings=1024
    ),
    "qwen3_moe": dict(SERVABLE, moe_intermediate_size=128),  # 4 experts, each quantized per expert
    "mixtral": SERVABLE,  # 4 experts; its files name them block_sparse_moe.experts.E.w1/w3/w2
}
MOE = ("qwen3_moe-g64", "mixtral-fsdp2-expert-parallel-g64")
SAMPLES, TOKENS, WINDOW = 8, 512, 512  # one window: 511 tokens scored per folder
# checkpoint name: (model, how it is written, quantize options). FSDP2 on 2 ranks is the fine-tuned
# SmolLM2 (examples/finetune_then_quantize.py, group 64) and the Mixtral (expert-parallel calibration);
# ZeRO-3 on 2 ranks runs true-sequential.
KINDS = {
    "llama-g64": ("llama", "one process", dict(group_size=64)),
    "llama-asym-channel": ("llama", "one process", dict(group_size=None, symmetric=False)),
    "llama-zero3-true-sequential": ("llama", "zero3", ["--group-size", "64", "--true-sequential"]),
    "qwen2-g128": ("qwen2", "one process", dict(group_size=128)),
    "mixtral-fsdp2-expert-parallel-g64": ("mixtral", "fsdp2", ["--group-size", "64", "--expert-parallel"]),
    **{f"{f}-g64": (f, "one process", dict(group_size=64)) for f in FAMILIES if f not in ("llama", "qwen2", "mixtral")},
}
SERVED = [*(k for k in KINDS if k not in MOE), "smollm2-fsdp2-g64"]
REFUSED = {"llama-w8": ("llama", "one process", dict(group_size=64, bits=8))}
MISREAD = "llama-g64-misread"  # llama-g64 with one layer's scales changed, scored against llama-g64


def write(name: str, model: str, how: str, options, models: dict[str, Path], root: Path, emma: Path) -> Path:
    output = root / name
    if how == "one process":
        return single_process(models[model], output, emma, SAMPLES, **options)
    options = ["--num-samples", str(SAMPLES), "--max-seq-length", "32", "--batch-size", "2", *options]
    done = torchrun(2, "gptq_fsdp", "quantize", str(models[model]), "--dataset", str(emma), "--backend", how,
                    *options, "--output", str(output), module=True)  # fmt: skip
    assert f"on 2 rank(s) ({how})" in done.stdout
    return output


def misread(checkpoint: Path, output: Path) -> Path:
    """`checkpoint` with the first down_proj's scales 1.5x: what a reader that mis-scales one layer sees."""
    subprocess.run(["cp", "-r", str(checkpoint), str(output)], check=True)
    tensors = load_file(output / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("down_proj.weight_scale"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, output / "model.safetensors", metadata={"format": "pt"})
    return output


@pytest.fixture(scope="module")
def ids(smollm2_dir, austen) -> torch.Tensor:
    return text_tokens(AutoTokenizer.from_pretrained(smollm2_dir), austen / "persuasion.txt", TOKENS)


@pytest.fixture(scope="module")
def checkpoints(smollm2_dir, austen, finetuned_smollm2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    models = {f: make_tiny_model(f, root / f"model-{f}", smollm2_dir, **o) for f, o in FAMILIES.items()}
    written = {n: write(n, *kind, models, root, austen / "emma.txt") for n, kind in {**KINDS, **REFUSED}.items()}
    written[MISREAD] = misread(written["llama-g64"], root / MISREAD)
    written["smollm2-fsdp2-g64"] = finetuned_smollm2[0]
    return written


@pytest.fixture(scope="module")
def served(checkpoints, ids) -> dict:
    subprocess.run([str(REPO / "scripts" / "setup_vllm.sh")], check=True, env=ENV)
    return vllm_check.serve_with_vllm(list(checkpoints.values()), ids[0].tolist(), WINDOW, generate=8)


def result(served: dict, checkpoints: dict[str, Path], name: str) -> dict:
    return served["checkpoints"][str(checkpoints[name])]


@pytest.mark.parametrize("name", SERVED)
def test_vllm_serves_it_within_the_bf16_margin(name, checkpoints, served, ids):
    served_one = result(served, checkpoints, name)
    assert "error" not in served_one, served_one.get("error")
    assert served_one["kernels"] == ["CompressedTensorsWNA16/CPUWNA16LinearKernel"], "every Linear is W4A16"
    comparison = vllm_check.compare(checkpoints[name], served_one, ids, WINDOW)
    gap = abs(math.log(comparison.vllm_ppl / comparison.fp32_ppl))
    assert comparison.passed, f"{name}: |log ppl ratio| {gap:.5f} > margin {comparison.margin:.5f} ({comparison})"


@pytest.mark.parametrize("name", MOE)
def test_vllm_serves_per_expert_checkpoints_where_it_has_the_kernel(name, checkpoints, served, ids):
    """vLLM 0.32's CPU build runs W4A16 MoE experts only with AMX (`CPUExpertsInt4`; its other CPU
    backend needs int8 activations): there each MoE checkpoint (Mixtral's under its files' names,
    which vLLM's Mixtral loads) must pass the margin like the dense ones; elsewhere vLLM refuses it
    with its own message, after reading the config."""
    served_one = result(served, checkpoints, name)
    if not torch.cpu._is_amx_tile_supported():
        assert (
            served_one.get("error")
            == "NotImplementedError: No WNA16 MoE backend supports the deployment configuration."
        )
        return
    assert "error" not in served_one, served_one.get("error")
    comparison = vllm_check.compare(checkpoints[name], served_one, ids, WINDOW)
    assert comparison.passed, f"{name}: {comparison}"


def test_the_expert_parallel_command_writes_the_one_process_checkpoint(checkpoints, tmp_path, austen):
    """`torchrun ... -m gptq_fsdp quantize --expert-parallel` (the experts modules sharded on their
    own, their tokens sent to them) writes, file tensor for file tensor, what one process writes."""
    written = checkpoints["mixtral-fsdp2-expert-parallel-g64"]
    model_dir = written.parent / "model-mixtral"
    expected = single_process(model_dir, tmp_path / "single", austen / "emma.txt", SAMPLES, group_size=64)
    sharded = {k: v for f in written.glob("*.safetensors") for k, v in load_file(f).items()}
    single = load_file(expected / "model.safetensors")
    assert sharded.keys() == single.keys() and "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in single
    assert [k for k in single if not torch.equal(sharded[k], single[k])] == []


def test_vllm_refuses_8_bit_weights_precisely(checkpoints, served):
    error = result(served, checkpoints, "llama-w8")["error"]
    assert "Failed to find a kernel that can implement the WNA16 linear layer" in error, error
    assert "Quant type (uint8b128) not supported by CPUWNA16" in error, error
    config = json.loads((checkpoints["llama-w8"] / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_margin_fails_a_reader_that_mis_scales_one_layer(checkpoints, served, ids):
    """vLLM's scores of a checkpoint whose one layer's scales differ by 1.5x, held against
    transformers on the right checkpoint: outside the margin."""
    comparison = vllm_check.compare(checkpoints["llama-g64"], result(served, checkpoints, MISREAD), ids, WINDOW)
    assert not comparison.passed, comparison


def test_missing_cpu_kernel_is_said(served):
    """vLLM's AVX2 build (chosen on CPUs without AVX-512) has no W4A16 GEMM; the check then says it
    scores through the reference GEMM (vllm_serve.reference_gemm_wna16) instead of failing."""
    avx512 = "avx512" in Path("/proc/cpuinfo").read_text()
    assert (served["note"] is None) == avx512, served["note"]
    assert served["vllm"] == "0.32.0"
