"""The sequential GPTQ loop: one decoder layer at a time, calibration inputs carried forward, each
finished layer recorded for resuming."""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq_fsdp import faults
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.linalg import float32_matmul_precision
from gptq_fsdp.core.scheme import GPTQError
from gptq_fsdp.data import CalibrationSet, rank_batches
from gptq_fsdp.distributed import Backend, collectives, detect_backend, unwrap_engine
from gptq_fsdp.distributed.expert_parallel import ExpertParallel, check_expert_parallel
from gptq_fsdp.io.resume import LayerState, run_identity
from gptq_fsdp.model.capture import capture_layer_inputs
from gptq_fsdp.model.layers import find_decoder_layers, target_experts, target_modules, warn_uncovered
from gptq_fsdp.pipeline import standard, true_sequential
from gptq_fsdp.pipeline.job import ActivationStore, Clock, LayerJob, Run
from gptq_fsdp.pipeline.results import LayerError, QuantizationResult

logger = logging.getLogger(__name__)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration: CalibrationSet,
    config: GPTQConfig,
    backend: Backend | None = None,
    *,
    state_dir: str | Path | None = None,
    resume: bool = False,
) -> QuantizationResult:
    """Quantize `model` in place with GPTQ, layer by layer, and return what the checkpoint needs.

    Under a sharded backend every rank calls this with the same `calibration`; each rank runs its own
    slice of it, Hessians are summed on each group's owner, the owner runs GPTQ and every rank's
    shard receives the quantized-dequantized weight. With `state_dir`, each rank records its state
    after every layer; `resume=True` continues from the last layer all ranks recorded.
    """
    start = time.perf_counter()
    model = unwrap_engine(model)
    backend = backend or detect_backend(model)
    rank, world = backend.rank, backend.world_size
    per_layer = target_modules(model, config)
    experts = target_experts(model, config)
    if resume and any(experts):
        raise GPTQError("--resume does not restore quantized MoE experts yet: run without --resume")
    layers_name, layers = find_decoder_layers(model)
    if rank == 0:
        warn_uncovered(model, per_layer, experts, config, backend.weight_shape)
    batches = [calibration.batch(b) for b in rank_batches(len(calibration), rank, world, config.batch_size)]
    forward_calls = max(len(rank_batches(len(calibration), r, world, config.batch_size)) for r in range(world))
    dispatched = config.expert_parallel and world > 1 and any(experts)
    if dispatched:
        check_expert_parallel(experts, backend)
    quantized = []
    for modules, params in zip(per_layer, experts, strict=True):
        quantized += [*modules, *(n for p in params for e in range(p.num_experts) for n in p.names(e))]
    result = QuantizationResult(config, backend, quantized=quantized)
    result.fused = [f"{p.module_name}.{p.param_name}" for params in experts for p in params]
    clock = Clock(result, start)

    was_training = model.training
    model.eval()
    backend.prepare(model)
    weights = check_weights(model, backend)
    if state_dir is not None:
        result.state = LayerState(
            state_dir, backend, run_identity(config, calibration, world, result.quantized, weights)
        )
        result.state.check() if resume else result.state.start_over()
    memory = result.memory
    memory.shard_bytes = sum(backend.local_part(p).numel() * p.element_size() for p in model.parameters())
    with float32_matmul_precision(config.matmul_precision):
        with clock("capture"):
            hidden, layer_calls = capture_layer_inputs(model, layers, batches, backend.layer_unsharded)
            backend.reshard(model)
            store = ActivationStore(hidden[0].device, config.offload_activations)
            hidden = [store.keep(x) for x in hidden]
            store.settle()
            memory.activation_bytes = store.device_bytes(hidden)
        run = Run(config, result, store, clock, masks=[mask for _, mask in batches])

        def job(index: int, inputs: list[torch.Tensor]) -> LayerJob:
            prefix = f"{layers_name}.{index}."
            dispatch = None
            if dispatched and experts[index]:
                dispatch = ExpertParallel(layers[index], experts[index], backend, forward_calls, store.device)
            return LayerJob(
                run, index, layers[index], prefix, per_layer[index], inputs, layer_calls[index], experts[index],
                dispatch,
            )  # fmt: skip

        progress = tqdm(total=len(layers), desc="GPTQ layers", unit="layer", disable=rank != 0)
        first = 0
        if result.state is not None and resume:
            first, hidden = _resume(result, per_layer, hidden, job)
            for index in range(first):
                layer_calls[index] = []
            progress.update(first)
        for index in range(first, len(layers)):
            faults.at_layer(rank, index, hidden)
            try:
                if config.true_sequential:
                    hidden = true_sequential.run_layer(job(index, hidden))
                else:
                    hidden = standard.run_layer(job(index, hidden), propagate=index < len(layers) - 1)
            except Exception as error:
                raise LayerError(f"rank {rank} failed at layer {index} ({type(error).__name__}): {error}") from error
            layer_calls[index] = []
            if result.state is not None:
                owned = {n: r for n, r in result.modules.items() if r.layer == index}
                result.state.save(index, {n: r for n, r in owned.items() if r.owner == rank})
            if world == 1:  # with several ranks each one only knows the losses of the groups it owns
                progress.set_postfix(loss=f"{sum(result.modules[n].loss for n in per_layer[index]):.4g}")
            progress.update()
        progress.close()
    model.train(was_training)
    result.seconds = time.perf_counter() - start
    memory.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Rank 0 gets every record's summary (not the packed tensors) and every rank's memory.
    summaries = collectives.gather_objects(([replace(r, packed={}) for r in result.modules.values()], memory))
    if summaries is not None:
        result.memory_per_rank = [m for _, m in summaries]
        result.modules.update({r.name: r for records, _ in summaries for r in records if r.name not in result.modules})
    return result


def check_weights(model: nn.Module, backend: Backend) -> str:
    """Refuse a model with NaN or inf weights, naming the parameters, before any forward; return a
    digest of every parameter's float64 sum and absolute sum over all shards, with its dtype, the
    same on every rank (resume state records it). One pass over the weights, no copy of them; a
    float64 sum of finite 16/32-bit values cannot overflow, so a non-finite sum means a non-finite value."""
    names = [name for name, _ in model.named_parameters()]
    per_param = [
        torch.stack([part.sum(dtype=torch.float64), torch.linalg.vector_norm(part, 1, dtype=torch.float64)])
        for part in (backend.stored_values(p) for _, p in model.named_parameters())
    ]
    sums = torch.stack([s.to(per_param[0].device) for s in per_param]).cpu()  # one host sync
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    every_rank = collectives.gather_all(sums.tolist())
    broken = [
        name for i, name in enumerate(names) if not all(torch.isfinite(torch.tensor(r[i])).all() for r in every_rank)
    ]
    if broken:
        listed = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise GPTQError(f"the model's weights hold NaN or inf values in {len(broken)} parameter(s): {listed}")
    return hashlib.sha256(repr((dtypes, every_rank)).encode()).hexdigest()[:16] + f" ({', '.join(dtypes)})"


def _resume(
    result: QuantizationResult,
    per_layer: list[dict[str, nn.Linear]],
    hidden: list[torch.Tensor],
    job,
) -> tuple[int, list[torch.Tensor]]:
    """Restore the layers every rank recorded; the first layer to quantize and its inputs."""
    assert result.state is not None
    finished, records = result.state.load()
    if finished < 0:
        return 0, hidden
    all_modules = {name: module for modules in per_layer for name, module in modules.items()}
    result.state.restore_weights(records, all_modules, result.config.scheme)
    result.modules.update(records)
    logger.info("resuming after layer %d", finished)
    for index in range(finished + 1):  # recompute the inputs of the first unfinished layer
        hidden = job(index, hidden).propagate()
    return finished + 1, hidden
