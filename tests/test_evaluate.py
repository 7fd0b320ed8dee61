"""Perplexity and per-token log-probs over fixed windows (the yardstick of the benchmarks and the vLLM check)."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from gptq_fsdp.evaluate import perplexity, token_logprobs


def test_token_logprobs_score_each_token_after_the_first_of_its_window(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 2 * 16 + 1), generator=torch.Generator().manual_seed(0))
    scored = token_logprobs(model, ids, window=16)
    assert scored.dtype == torch.float64 and scored.shape == (2 * 15,)  # the last 1-token window scores nothing
    with torch.no_grad():
        for w in range(2):
            window = ids[:, 16 * w : 16 * (w + 1)]
            expected = model(window).logits[0].float().log_softmax(-1)[torch.arange(15), window[0, 1:]].double()
            assert torch.equal(scored[15 * w : 15 * (w + 1)], expected), w
    assert perplexity(model, ids, window=16) == math.exp(-scored.mean().item())
