"""The standard order: per layer, forward every batch (accumulating Hessians), GPTQ every Hessian
group on its owner, then forward again with the quantized weights to make the next layer's inputs."""

from __future__ import annotations

import torch

from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.pipeline.job import LayerJob
from gptq_fsdp.pipeline.owners import quantize_experts, quantize_on_owners, quantize_owned_experts


def run_layer(job: LayerJob, propagate: bool = True) -> list[torch.Tensor]:
    """Calibrate, quantize and propagate one decoder layer; returns the next layer's inputs ([] when
    not `propagate`: the last layer's outputs are not needed)."""
    run, backend = job.run, job.run.backend
    all_tokens = run.config.expert_calibration == "all_tokens"
    owned = job.dispatch.owned if job.dispatch is not None else None
    hooks = HessianHooks(job.modules, experts=job.experts, device=run.store.device, all_tokens=all_tokens, owned=owned)
    holders = (
        {} if job.dispatch else {(p, e): backend.holder(p.weight, e) for p in job.experts for e in range(p.num_experts)}
    )
    with job.measured(), job.unsharded():
        with run.clock("forward"), hooks.attached(), job.experts_dispatched(hooks):
            for b, (x, (args, kwargs)) in enumerate(zip(job.hidden, job.calls, strict=True)):
                with hooks.forward(run.masks[b]):
                    job.layer(run.store.fetch(x), *args, **kwargs)
        job.account(hooks)
        # The fused experts while the layer is whole on every rank: no weight moves, only Hessians.
        pieces = quantize_experts(job, hooks, holders) if job.experts and job.dispatch is None else {}
    for param, piece in pieces.items():
        backend.write_piece(param.weight, piece)
    if job.experts and job.dispatch is not None:  # each rank's own experts, in its own shards
        quantize_owned_experts(job, hooks, job.dispatch)
    quantize_on_owners(job, hooks.groups)
    if not propagate:
        return []
    return job.propagate()
