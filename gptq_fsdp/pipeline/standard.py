"""The standard order: per layer, forward every batch (accumulating Hessians), GPTQ every Hessian
group on its owner, then forward again with the quantized weights to make the next layer's inputs."""

from __future__ import annotations

import torch

from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.pipeline.job import LayerJob
from gptq_fsdp.pipeline.owners import quantize_experts, quantize_on_owners


def run_layer(job: LayerJob, propagate: bool = True) -> list[torch.Tensor]:
    """Calibrate, quantize and propagate one decoder layer; returns the next layer's inputs ([] when
    not `propagate`: the last layer's outputs are not needed)."""
    run, backend = job.run, job.run.backend
    all_tokens = run.config.expert_calibration == "all_tokens"
    hooks = HessianHooks(job.modules, experts=job.experts, device=run.store.device, all_tokens=all_tokens)
    holders = {(p, e): backend.holder(p.weight, e) for p in job.experts for e in range(p.num_experts)}
    with job.measured(), backend.layer_unsharded(job.layer):
        with run.clock("forward"), hooks.attached():
            for b, (x, (args, kwargs)) in enumerate(zip(job.hidden, job.calls, strict=True)):
                with hooks.forward(run.masks[b]):
                    job.layer(run.store.fetch(x), *args, **kwargs)
        job.account(hooks)
        # The fused experts while the layer is whole on every rank: no weight moves, only Hessians.
        pieces = quantize_experts(job, hooks, holders) if job.experts else {}
    for param, piece in pieces.items():
        backend.write_piece(param.weight, piece)
    quantize_on_owners(job, hooks.groups)
    if not propagate:
        return []
    return job.propagate()
