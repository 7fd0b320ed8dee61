"""Perplexity over fixed, non-overlapping windows of a text (the yardstick of our benchmarks)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def text_tokens(tokenizer, path: str | Path, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` tokens of a text file, as [1, num_tokens]."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than the {num_tokens} asked")
    return torch.tensor(ids[:num_tokens]).unsqueeze(0)


@torch.no_grad()
def token_logprobs(model: nn.Module, input_ids: torch.Tensor, window: int = 1024) -> torch.Tensor:
    """log p(token | the tokens before it in its window), as float64, for every token but each
    window's first, over non-overlapping windows of `window` tokens."""
    device = next(model.parameters()).device
    scored = []
    for start in tqdm(range(0, input_ids.shape[1], window), desc="perplexity", unit="window", leave=False):
        chunk = input_ids[:, start : start + window].to(device)
        if chunk.shape[1] < 2:
            continue
        # fp32 log-softmax (relative error ~1e-6 of log(vocab)), summed in float64 by the caller
        logits = model(chunk, use_cache=False).logits[0, :-1].float()
        scored.append(logits.log_softmax(-1).gather(1, chunk[0, 1:, None]).squeeze(1).double().cpu())
    return torch.cat(scored)


def perplexity(model: nn.Module, input_ids: torch.Tensor, window: int = 1024) -> float:
    """exp(mean next-token NLL) over windows of `window` tokens (each window predicts window-1 tokens)."""
    return math.exp(-token_logprobs(model, input_ids, window).mean().item())
