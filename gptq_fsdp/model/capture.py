"""Running a model up to its decoder layers: each layer's inputs for every calibration batch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a forward once what it was run for has been seen (a recorder at the last layer,
    the last target's input taken, a planner probe)."""


class InputRecorder(nn.Module):
    """Stands in for a decoder layer: records its call and passes hidden states through unchanged."""

    def __init__(self, store: list, is_last: bool) -> None:
        super().__init__()
        self.store, self.is_last = store, is_last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.store.append((args[1:], kwargs))
        if self.is_last:
            raise StopForward
        return hidden


def layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    unsharded: Callable[[nn.Module], AbstractContextManager] = lambda model: nullcontext(),
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """First-layer hidden states per batch, and every layer's other call arguments per batch.

    Each layer is swapped for a recorder, so the model runs only its embeddings; per-layer arguments
    matter because some families give layers different masks/rotary tables (e.g. sliding windows).
    The forwards run inside `unsharded(model)` (the model without its layers kept whole for all of
    them), so that they make no collective call and ranks may run different numbers of batches.
    """
    calls: list[list] = [[] for _ in layers]
    originals = list(layers)
    hidden: list[torch.Tensor] = []

    def keep_hidden(module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])

    for i in range(len(layers)):
        layers[i] = InputRecorder(calls[i], is_last=i == len(layers) - 1)
    handle = layers[0].register_forward_pre_hook(keep_hidden, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with unsharded(model):
            for input_ids, attention_mask in batches:
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    per_layer_calls = [[(args, kwargs) for args, kwargs in layer_calls] for layer_calls in calls]
    return hidden, per_layer_calls
