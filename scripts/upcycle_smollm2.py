"""A real-weight MoE to measure on: SmolLM2-135M upcycled into a Mixtral- or ERNIE-4.5-layout MoE.

No real MoE model can be downloaded here. Every expert is a copy of the layer's dense MLP with a
small seeded perturbation (relative noise `--noise` on every weight), the router is seeded at random.
Both layouts renormalize the top-k weights to sum to 1, so with identical experts the model is the
dense one; the perturbations make the experts (and their Hessians) differ while the perplexity stays
close to the dense model's, which makes the quantized perplexity a real measure.

- `--layout mixtral` (default; 8 experts top-2: smollm2-moe-8, 0.69 B parameters). Mixtral's layout
  is Llama's (the same attention, norms and rotary embedding, no q/k norms) with each MLP replaced
  by top-k routed experts, in every layer. fp32 perplexity 34.959 (the dense model: 34.926).
- `--layout ernie --experts 64` (64 experts top-2: smollm2-moe-64, 0.97 B parameters): 64
  full-width experts in all 30 layers would be ~5 B parameters, so only every `--moe-interval`-th
  layer is MoE (6: layers 5, 11, 17, 23, 29; the others keep the dense MLP). ERNIE-4.5-MoE is the
  transformers type with Llama's attention (no q/k norms; biases off), dense and MoE layers side by
  side, a softmax router with renormalized top-k and, with `moe_num_shared_experts=0`, no shared
  expert (Qwen2-MoE always has one, with a sigmoid gate Linear). Its rotary embedding pairs dims
  (2i, 2i+1) where Llama pairs (i, i + head_dim/2), so each head's q/k rows are permuted to match
  (q.k is unchanged). fp32 perplexity 34.919. Its random routers are uneven: quantizing on 64 x 512
  tokens of Emma, per MoE layer 31-49 of the 64 experts got fewer tokens than the 576 columns of
  gate/up and 50-57 fewer than down's 1536 (up to 20 none at all), so gptq_fsdp used the pooled
  Hessian for those; W4A16 group 64: perplexity 40.33 (SmolLM2 quantized alike: 39.86).

Perplexities: `gptq-fsdp perplexity DIR --text persuasion.txt --tokens 4096 --window 1024` (fp32).

    .venv/bin/python scripts/upcycle_smollm2.py [--layout mixtral|ernie] [--experts 8] [--top-k 2]
        [--moe-interval 6] [--noise 0.02] [--seed 0] [--output DIR]

Writes a HF folder (default ~/.cache/gptq_fsdp/smollm2-moe-{experts}) with SmolLM2's tokenizer,
the same bytes on every run with the same arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
)

CACHE = Path.home() / ".cache" / "gptq_fsdp"
LAYOUTS = ("mixtral", "ernie")


def moe_config(layout: str, c, experts: int, top_k: int, moe_interval: int):
    """The MoE config of `layout` that holds the dense Llama config `c`'s model."""
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )  # fmt: skip
    if layout == "mixtral":
        return MixtralConfig(
            **common, head_dim=c.head_dim, num_local_experts=experts, num_experts_per_tok=top_k,
            sliding_window=None, router_jitter_noise=0.0, attention_dropout=0.0,
        )  # fmt: skip
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError(f"ERNIE-4.5 has no head_dim option: {c.head_dim} must be hidden / heads")
    return Ernie4_5_MoeConfig(
        **common, use_bias=False, moe_intermediate_size=c.intermediate_size, moe_num_experts=experts, moe_k=top_k,
        moe_num_shared_experts=0, moe_layer_start_index=0, moe_layer_interval=moe_interval,
    )  # fmt: skip


def interleaved_rotary_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k rows reordered from Llama's rotary pairs (i, i + head_dim/2) to ERNIE's (2i, 2i+1), per head."""
    half = torch.arange(head_dim // 2)
    order = torch.stack([half, half + head_dim // 2], dim=1).flatten()
    return weight.view(-1, head_dim, weight.shape[-1])[:, order].reshape(weight.shape)


def upcycle(
    dense_dir: Path, experts: int, top_k: int, noise: float, seed: int, layout: str = "mixtral", moe_interval: int = 6
) -> PreTrainedModel:
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    c = dense.config
    config = moe_config(layout, c, experts, top_k, moe_interval)
    model = (MixtralForCausalLM if layout == "mixtral" else Ernie4_5_MoeForCausalLM)(config).eval()
    generator = torch.Generator().manual_seed(seed)

    def perturbed(weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + noise * torch.randn(weight.shape, generator=generator))

    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # every parameter must be written below
        model.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
        model.model.norm.weight.copy_(dense.model.norm.weight)
        if not config.tie_word_embeddings:
            model.lm_head.weight.copy_(dense.lm_head.weight)
        for ours, theirs in zip(model.model.layers, dense.model.layers, strict=True):
            attention = theirs.self_attn.state_dict()
            if layout == "ernie":
                for name in ("q_proj.weight", "k_proj.weight"):
                    attention[name] = interleaved_rotary_rows(attention[name], c.head_dim)
            ours.self_attn.load_state_dict(attention)
            ours.input_layernorm.load_state_dict(theirs.input_layernorm.state_dict())
            ours.post_attention_layernorm.load_state_dict(theirs.post_attention_layernorm.state_dict())
            mlp = theirs.mlp
            if not hasattr(ours.mlp, "experts"):
                ours.mlp.load_state_dict(mlp.state_dict())
                continue
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            for e in range(experts):
                ours.mlp.experts.gate_up_proj[e].copy_(perturbed(gate_up))
                ours.mlp.experts.down_proj[e].copy_(perturbed(mlp.down_proj.weight))
            router = ours.mlp.gate.weight
            router.copy_(torch.randn(router.shape, generator=generator) * c.hidden_size**-0.5)
            if layout == "ernie":
                ours.mlp.gate.moe_statics.e_score_correction_bias.zero_()
        unset = [name for name, p in model.named_parameters() if p.isnan().any()]
        if unset:
            raise RuntimeError(f"parameters not upcycled: {unset}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=CACHE / "smollm2-135m")
    parser.add_argument("--layout", choices=LAYOUTS, default="mixtral")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-interval", type=int, default=6, help="ernie: every n-th layer is MoE (the rest dense)")
    parser.add_argument("--noise", type=float, default=0.02, help="relative noise on every expert weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    output = args.output or CACHE / f"smollm2-moe-{args.experts}"
    model = upcycle(args.dense, args.experts, args.top_k, args.noise, args.seed, args.layout, args.moe_interval)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(args.dense).save_pretrained(output)
    print(f"wrote {output}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
