"""`gptq-fsdp plan`: numbers for public configs equal hand-computed ones; advice that is re-planned to fit.

Every model is built on the meta device only. Expected values are written out as arithmetic on the
published config numbers, not taken from the planner's helpers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import planner
from gptq_fsdp.cli import main
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.core.scheme import GPTQError
from gptq_fsdp.data import rank_batches
from gptq_fsdp.distributed.schedule import assign_owners
from gptq_fsdp.model.capture import capture_layer_inputs
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.model.layers import find_decoder_layers, target_experts, target_modules
from gptq_fsdp.planner import PlanOptions, load_model_shape, parse_size, plan, split_samples
from gptq_fsdp.planner import shapes as planner_shapes
from gptq_fsdp.planner.report import _seconds

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
GiB = 2**30
MEM80 = 80 * GiB


@pytest.fixture(scope="module")
def shapes() -> dict[str, planner.ModelShape]:
    names = ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mixtral-8x7b", "qwen3-30b-a3b"]
    return {name: load_model_shape(CONFIGS / f"{name}.json") for name in names}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# Llama-3.1-8B, by hand: hidden 4096, 8 KV heads of 128 (1024), intermediate 14336, vocab 128256, 32 layers.
L8_LAYER_PARAMS = 4096 * 4096 + 1024 * 4096 + 1024 * 4096 + 4096 * 4096 + 3 * 14336 * 4096 + 2 * 4096
L8_TOTAL = 32 * L8_LAYER_PARAMS + 2 * 128256 * 4096 + 4096
# Every target's (rows, cols), the layer's parameter shapes.
L8_TARGETS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
L8_PARAMS = L8_TARGETS + [(4096,), (4096,)]


def test_published_parameter_counts(shapes):
    assert L8_LAYER_PARAMS == 218_112_000
    assert shapes["llama-3.1-8b"].total_params == L8_TOTAL == 8_030_261_248
    l70_layer = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192
    assert shapes["llama-3.1-70b"].total_params == 80 * l70_layer + 2 * 128256 * 8192 + 8192 == 70_553_706_496
    l405_layer = 2 * 16384 * 16384 + 2 * 1024 * 16384 + 3 * 53248 * 16384 + 2 * 16384
    assert shapes["llama-3.1-405b"].total_params == 126 * l405_layer + 2 * 128256 * 16384 + 16384 == 405_853_388_800
    # Mixtral: 8 experts of 3 x 14336 x 4096, a router of 8 x 4096; vocab 32000.
    mixtral_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 3 * 14336 * 4096 + 8 * 4096 + 2 * 4096
    assert shapes["mixtral-8x7b"].total_params == 32 * mixtral_layer + 2 * 32000 * 4096 + 4096 == 46_702_792_704
    # Qwen3-30B-A3B: 32 heads and 4 KV heads of 128, q/k norms of 128, 128 experts of 3 x 768 x 2048.
    qwen_layer = 4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096 + 2 * 128 + 128 * 3 * 768 * 2048 + 128 * 2048 + 2 * 2048
    assert shapes["qwen3-30b-a3b"].total_params == 48 * qwen_layer + 2 * 151936 * 2048 + 2048 == 30_532_122_624


def test_llama_8b_world_8_by_hand(shapes):
    shape = shapes["llama-3.1-8b"]
    result = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80))
    bf16 = 2
    # Every dim 0 divides by 8, so FSDP2's row split is exact: an eighth of the model per rank.
    shards = L8_TOTAL * bf16 // 8
    assert shards == 2_007_565_312
    assert [r.shards for r in result.ranks] == [shards] * 8
    layer = L8_LAYER_PARAMS * bf16
    assert layer == 436_224_000 and all(r.layer == layer for r in result.ranks)
    # q/k/v, o, gate/up read 4096 features; down_proj 14336: float64 sums of the blocks on and above
    # the diagonal + one fp32 XᵀX block each (GPU blocks: 4096 columns -> one block of 4096; 14336 ->
    # four of 3584, 10 of 16 kept)
    down_sum = 10 * 3584**2
    hessians = 8 * (4096**2 * 3 + down_sum) + 4 * (4096**2 * 3 + 3584**2)
    assert hessians == 1_682_964_480 and all(r.hessians == hessians for r in result.ranks)
    activations = 16 * 2048 * 4096 * bf16  # 128 samples / 8 ranks x seq x hidden x bf16
    assert all(r.activations == activations == 268_435_456 for r in result.ranks)
    working = 8 * 2048 * 2 * 14336 * bf16  # one batch: gate+up output (XᵀX copies nothing on a GPU)
    assert all(r.working == working for r in result.ranks)

    # Groups by tensor identity, and owners from the real LPT scheduler on the hand-written shapes.
    groups = [(g.label, g.total_rows, g.columns) for g in shape.structures[0].groups]
    assert groups == [
        ("self_attn.q_proj+k_proj+v_proj", 6144, 4096),
        ("self_attn.o_proj", 4096, 4096),
        ("mlp.gate_proj+up_proj", 28672, 4096),
        ("mlp.down_proj", 4096, 14336),
    ]
    expected = assign_owners([(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)], 8)
    assert result.owners[0] == expected.owners == [2, 3, 1, 0]
    assert result.balance[0] == pytest.approx(expected.balance) and result.balance[0] > 4  # 4 groups, 8 ranks

    # Rank 0 owns down_proj [4096 x 14336]: its GPTQ phase, term by term.
    pieces = sum(ceil_div(rows, 8) * cols for rows, cols in L8_TARGETS)  # each rank's piece of every target
    down_piece = 512 * 14336
    owned_weights = 2 * pieces * bf16 + 2 * 8 * down_piece * bf16  # own send/receive + gathered and scatter copies
    w, h = 4096 * 14336 * 4, 14336 * 14336 * 4
    workspace = 4096 * 14336 * bf16 + 2 * w + 2 * h  # act-order static: the factor is not inverted
    rank0 = result.ranks[0]
    assert (rank0.owned_weights, rank0.workspace) == (owned_weights, workspace)
    assert rank0.hessians_owned == 8 * down_sum + 4 * 3584**2
    gptq_phase = shards + activations + hessians + owned_weights + workspace
    hessian_phase = shards + layer + activations + working + hessians
    propagate = shards + layer + 2 * activations + working
    capture = shards + (2 * 128256 * 4096 + 4096) * bf16 + activations
    assert rank0.peak == max(gptq_phase, hessian_phase, propagate, capture) == gptq_phase
    assert rank0.peak_phase.startswith("GPTQ")
    # A rank that owns nothing peaks in the Hessian forward.
    assert result.ranks[7].peak == hessian_phase and result.ranks[7].workspace == 0
    assert result.fits and result.peak == gptq_phase

    traffic = result.traffic[0]
    assert traffic.hessian_reduce == 8 * (4096**2 * 3 + down_sum)
    assert traffic.weight_transfer == 2 * 7 * pieces * bf16
    assert traffic.layer_gather == 7 * (pieces + 2 * 512) * bf16
    assert traffic.gathers == 2


def test_time_model_by_hand(shapes):
    options = PlanOptions(
        world_size=8, gpu_memory=MEM80, matmul_tflops=400, cholesky_tflops=20, bandwidth_gbps=200, column_latency_us=30
    )
    result = plan(shapes["llama-3.1-8b"], options)
    tokens = 16 * 2048
    mm, chol, bw = 400e12, 20e12, 200e9
    forward = 32 * 2 * (2 * L8_LAYER_PARAMS * tokens + 16 * 2 * 2048**2 * 32 * 128) / mm
    xtx = 32 * 2 * tokens * (3 * 4096**2 + 10 * 3584**2) / mm  # symmetric: upper blocks only
    gathers = 32 * 2 * 7 * 27_264_000 * 2 / bw
    down = 1 / 3 * 14336**3 / chol + 4096 * 14336**2 / mm + 30e-6 * 14336  # rank 0: down_proj alone
    assert result.time.forward == pytest.approx(forward)
    assert result.time.xtx == pytest.approx(xtx)
    assert result.time.gathers == pytest.approx(gathers)
    assert result.time.gptq == pytest.approx(32 * down)  # GPTQ outlasts the transfers here
    assert result.time.total == pytest.approx(forward + xtx + gathers + 32 * down)
    # Dynamic scales (act-order none/group) also invert the factor: 4/3 instead of 1/3 cols³.
    dynamic = plan(shapes["llama-3.1-8b"], replace(options, config=GPTQConfig.from_options(actorder="none")))
    assert dynamic.time.gptq == pytest.approx(32 * (down + 14336**3 / chol))


def test_true_sequential_llama_8b_world_8_by_hand(shapes):
    options = PlanOptions(
        world_size=8, gpu_memory=MEM80, matmul_tflops=400, cholesky_tflops=20, bandwidth_gbps=200,
        column_latency_us=30, config=GPTQConfig.from_options(true_sequential=True),
    )  # fmt: skip
    result = plan(shapes["llama-3.1-8b"], options)
    bf16 = 2
    # Paused before down_proj, a token holds its input (14336), the residual and the normalized input
    # (4096 each); the earlier Linears' inputs are not kept alive by the Hessian hooks.
    assert shapes["llama-3.1-8b"].structures[0].paused_bytes_per_token == (14336 + 2 * 4096) * bf16
    paused = 16 * 2048 * (14336 + 2 * 4096) * bf16
    assert all(r.working == paused for r in result.ranks)
    # Owners only pack, balanced by elements: gate+up, down, q/k/v, o on ranks 0..3.
    assert result.owners[0] == [2, 3, 0, 1]
    units = [(6144, 4096, 3), (4096, 4096, 1), (28672, 4096, 2), (4096, 14336, 1)]  # rows, cols, members
    assert result.ranks[0].owned_weights == 28672 * 4096 * (bf16 + 1)  # its result: weight + int8 levels
    assert result.ranks[7].owned_weights == 0

    def workspace(rows, cols, members):  # GPTQ on ceil(rows/8) rows + stacked copy + the whole result
        share = ceil_div(rows, 8)
        w, h = share * cols * 4, cols * cols * 4
        return share * cols * bf16 + 2 * w + 2 * h + (rows * cols * bf16 if members > 1 else 0) + rows * cols * 3

    assert all(r.workspace == max(workspace(*u) for u in units) for r in result.ranks)
    shards, activations = L8_TOTAL * bf16 // 8, 16 * 2048 * 4096 * bf16
    hessians = 8 * (4096**2 * 3 + 10 * 3584**2) + 4 * (4096**2 * 3 + 3584**2)
    rank0 = result.ranks[0]
    gptq_phase = (
        shards + L8_LAYER_PARAMS * bf16 + activations + paused + hessians + rank0.owned_weights + rank0.workspace
    )
    assert rank0.peak == gptq_phase and rank0.peak_phase.startswith("true-sequential GPTQ")

    traffic = result.traffic[0]
    rows_received = 7 * sum(ceil_div(rows, 8) * cols for rows, cols, _ in units)  # int8
    assert (traffic.weight_transfer, traffic.gathers) == (rows_received, 1)
    tokens, mm, chol, bw = 16 * 2048, 400e12, 20e12, 200e9
    forward = 32 * 1 * (2 * L8_LAYER_PARAMS * tokens + 16 * 2 * 2048**2 * 32 * 128) / mm  # one pass
    gptq = sum(1 / 3 * c**3 / chol + ceil_div(r, 8) * c**2 / mm + 30e-6 * c for r, c, _ in units)
    collectives = (2 * 7 / 8 * traffic.hessian_reduce + rows_received) / bw
    assert result.time.forward == pytest.approx(forward)
    assert result.time.gptq == pytest.approx(32 * (gptq + collectives))
    standard = plan(shapes["llama-3.1-8b"], options.with_(true_sequential=False))
    assert result.time.forward == pytest.approx(standard.time.forward / 2)


def test_true_sequential_refuses_offload():
    with pytest.raises(GPTQError, match="use one of the two"):  # the run configuration's own check
        PlanOptions(world_size=8, gpu_memory=MEM80).with_(true_sequential=True, offload_activations=True)


def test_options_read_and_vary_the_run_configuration():
    options = PlanOptions(world_size=8, gpu_memory=MEM80)
    assert options.config == GPTQConfig.from_options()
    varied = options.with_(world_size=4, num_samples=64, max_seq_length=512, batch_size=2, true_sequential=True)
    assert (varied.world_size, varied.num_samples, varied.max_seq_length, varied.batch_size) == (4, 64, 512, 2)
    assert varied.true_sequential and varied.config.calibration.seed == 0 and varied.static_scales
    assert (options.num_samples, options.true_sequential) == (128, False)  # the original is unchanged
    assert not options.with_(config=GPTQConfig.from_options(actorder="none")).static_scales
    assert options.with_(config=GPTQConfig.from_options(actorder="none", group_size=None)).static_scales


@pytest.mark.parametrize("samples,world,batch_size", [(128, 8, 8), (128, 3, 8), (10, 4, 2), (7, 3, 1), (4, 8, 8)])
def test_split_samples_matches_rank_batches(samples, world, batch_size):
    per_rank, batches, largest, problems = split_samples(samples, world, batch_size)
    try:
        split = [rank_batches(samples, r, world, batch_size) for r in range(world)]
    except ValueError:  # CalibrationDataError: the planner reports the same refusal
        assert problems
        return
    assert not problems
    assert per_rank == [sum(map(len, b)) for b in split]
    assert batches == max(len(b) for b in split)
    assert largest == [max(map(len, b)) for b in split]


def test_zero3_flat_partitions_and_fsdp2_uneven_rows(shapes):
    shape = shapes["llama-3.1-8b"]
    outer = [(128256, 4096), (128256, 4096), (4096,)]
    params = outer + L8_PARAMS * 32
    zero3 = plan(shape, PlanOptions(world_size=3, gpu_memory=MEM80, backend="zero3"))
    flat = sum(ceil_div(rows * (cols[0] if cols else 1), 3) for rows, *cols in params) * 2
    assert [r.shards for r in zero3.ranks] == [flat] * 3

    fsdp2 = plan(shape, PlanOptions(world_size=3, gpu_memory=MEM80))

    def rows_on(rows: int, rank: int) -> int:  # torch.chunk: ceil(rows / 3) each, the rest on the last
        chunk = ceil_div(rows, 3)
        return max(0, min(chunk, rows - rank * chunk))

    for rank in range(3):
        expected = sum(rows_on(rows, rank) * (cols[0] if cols else 1) for rows, *cols in params) * 2
        assert fsdp2.ranks[rank].shards == expected
    assert fsdp2.ranks[0].shards > fsdp2.ranks[2].shards  # 4096 rows: 1366, 1366, 1364
    # 128 samples in 16 batches of 8 on 3 ranks: 6, 5, 5 batches (data.rank_batches), so rank 2 holds
    # fewer activations.
    assert fsdp2.samples_per_rank == [48, 40, 40]
    assert fsdp2.ranks[2].activations == 40 * 2048 * 4096 * 2


def test_offload_keeps_one_batch(shapes):
    options = PlanOptions(world_size=8, gpu_memory=MEM80, config=GPTQConfig.from_options(offload_activations=True))
    result = plan(shapes["llama-3.1-8b"], options)
    assert all(r.activations == 8 * 2048 * 4096 * 2 for r in result.ranks)


def test_405b_does_not_fit_on_8_gpus_and_says_why(shapes):
    shape = shapes["llama-3.1-405b"]
    result = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80))
    assert not result.fits
    text = planner.format_plan(result)
    assert "DOES NOT FIT" in text and "FITS:" not in text
    (why,) = planner.reasons(result)
    assert why.startswith("rank 0 peaks at") and "GPTQ workspace" in why and "shards" in why
    # Rank 0 owns down_proj [16384 x 53248]: its float64 Hessian sum (13 GPU blocks of 4096 columns) and
    # GPTQ's workspace: the bf16 weight handed in + 2W + 2H in fp32 (act-order static).
    assert result.ranks[0].hessians_owned == 8 * 91 * 4096**2 + 4 * 4096**2  # 13 blocks a side, 91 kept
    w, h = 16384 * 53248 * 4, 53248**2 * 4
    assert result.ranks[0].workspace == 16384 * 53248 * 2 + 2 * w + 2 * h
    dynamic = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80, config=GPTQConfig.from_options(actorder="none")))
    assert dynamic.ranks[0].workspace == 16384 * 53248 * 2 + max(w + 3 * h, 2 * w + 2 * h)
    # What does not shrink with more ranks leaves room for the shards only from 25 ranks on (32 when
    # GPTQ also inverts the factor, with dynamic scales); 128 samples make 16 batches of 8, so past 16
    # ranks the batches shrink (128 // 25 = 5 samples) for every rank to run whole ones.
    smallest, dynamic_smallest = (planner.smallest_world_size(shape, p.options) for p in (result, dynamic))
    assert (smallest.world_size, smallest.batch_size) == (25, 5)
    assert (dynamic_smallest.world_size, dynamic_smallest.batch_size) == (32, 4)
    assert any("--world-size 25 --batch-size 5 fits" in s for s in result.suggestions)
    assert any("--offload-activations alone does not fit" in s for s in result.suggestions)
    eight_nodes = PlanOptions(world_size=64, gpu_memory=MEM80)  # of 8 GPUs: batches of 8 make 16 forward calls
    assert not plan(shape, eight_nodes).fits and "fewer than the 64 ranks" in plan(shape, eight_nodes).problems[0]
    assert plan(shape, eight_nodes.with_(batch_size=2)).fits


@pytest.mark.parametrize(
    "name,world,memory", [("llama-3.1-405b", 8, "141GiB"), ("llama-3.1-70b", 2, "80GiB"), ("mixtral-8x7b", 2, "48GiB")]
)
def test_suggested_world_size_fits_when_replanned(shapes, name, world, memory):
    options = PlanOptions(world_size=world, gpu_memory=parse_size(memory))
    result = plan(shapes[name], options)
    assert not result.fits
    suggested = planner.smallest_world_size(shapes[name], options)
    assert suggested is not None and any(f"--world-size {suggested.world_size} fits" in s for s in result.suggestions)
    assert plan(shapes[name], suggested).fits
    assert not plan(shapes[name], planner.at_world_size(options, suggested.world_size - 1)).fits


def test_fewer_samples_suggestion_fits_when_replanned(shapes):
    # 70B on 2 GPUs of 100 GiB with 1024 samples: activations (8 GiB per 64 samples) are what overflows.
    options = PlanOptions(world_size=2, gpu_memory=100 * GiB, config=GPTQConfig.from_options(num_samples=1024))
    result = plan(shapes["llama-3.1-70b"], options)
    assert not result.fits
    samples = planner.most_samples(shapes["llama-3.1-70b"], options)
    assert samples is not None and any(f"--num-samples {samples} " in s for s in result.suggestions)
    assert plan(shapes["llama-3.1-70b"], options.with_(num_samples=samples)).fits
    assert not plan(shapes["llama-3.1-70b"], options.with_(num_samples=samples + 2)).fits
    offloaded = plan(shapes["llama-3.1-70b"], options.with_(offload_activations=True))
    assert offloaded.fits and any("--offload-activations fits" in s for s in result.suggestions)


# The fused MoE experts by hand: (members, rows per member, columns) of gate+up and of down, E, top-k.
MOE = {
    "mixtral-8x7b": dict(gate_up=(("w1", "w3"), 14336, 4096), down=(("w2",), 4096, 14336), experts=8, top_k=2),
    "qwen3-30b-a3b": dict(
        gate_up=(("gate_proj", "up_proj"), 768, 2048), down=(("down_proj",), 2048, 768), experts=128, top_k=8
    ),
}
# One Hessian per expert slice on every rank: float64 upper blocks + one fp32 block (GPU blocks of
# about 4096 columns: 768, 2048 and 4096 are one block, 12 bytes per element; 14336 four blocks of
# 3584, 10 of 16 kept + one fp32 block = 84·3584²).
MIXTRAL_EXPERT_HESSIANS = 8 * (12 * 4096**2 + 84 * 3584**2)
QWEN_EXPERT_HESSIANS = 128 * 12 * (2048**2 + 768**2)
MIXTRAL_LINEAR_HESSIANS = 2 * 12 * 4096**2  # q/k/v and o_proj read 4096 columns
QWEN_LINEAR_HESSIANS = 12 * 2048**2 + 12 * 4096**2  # q/k/v read 2048 columns, o_proj 32 heads x 128


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_experts_are_gptq_units(shapes, name):
    """Each expert slice of the fused gate_up_proj [E, 2I, H] and down_proj [E, H, I] is a unit; routers
    are neither quantized nor reported; forward FLOPs count top-k of the experts."""
    moe = MOE[name]
    structure = shapes[name].structures[0]
    assert [g.label for g in structure.groups] == ["self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj"]
    units = [(e.param_name, e.members, e.num_experts, e.total_rows, e.columns, e.top_k) for e in structure.experts]
    (gate_up, rows, hidden), (down, hidden_rows, inter) = moe["gate_up"], moe["down"]
    E, k = moe["experts"], moe["top_k"]
    assert units == [("gate_up_proj", gate_up, E, 2 * rows, hidden, k), ("down_proj", down, E, hidden_rows, inter, k)]
    assert (structure.unquantized, structure.unquantized_params) == ((), 0)  # not the router (mlp.gate)
    assert (E, hidden) in structure.params  # ... which is there: [E, H]
    dense = structure.numel - E * 3 * rows * hidden
    assert structure.active_params == pytest.approx(dense + k * 3 * rows * hidden)


def test_qwen3_moe_world_8_fsdp2_by_hand(shapes):
    shape = shapes["qwen3-30b-a3b"]
    options = PlanOptions(world_size=8, gpu_memory=MEM80, matmul_tflops=400, cholesky_tflops=20, bandwidth_gbps=200)
    result = plan(shape, options)
    assert QWEN_EXPERT_HESSIANS == 7_348_420_608
    assert all(r.expert_hessians == QWEN_EXPERT_HESSIANS for r in result.ranks)
    assert all(r.hessians == QWEN_EXPERT_HESSIANS + QWEN_LINEAR_HESSIANS for r in result.ranks)
    # FSDP2 stores experts 16r..16r+15 of both fused parameters on rank r: they are its slices.
    assert result.expert_owners[0] == [e // 16 for e in range(128)] * 2
    assert result.expert_balance[0] == pytest.approx(1.0)
    assert result.owners[0] == [1, 0]  # the attention groups, by LPT
    own_experts = 16 * 12 * (2048**2 + 768**2)
    assert result.ranks[2].hessians_owned == own_experts  # rank 2 owns no Linear group
    assert result.ranks[0].hessians_owned == own_experts + 12 * 4096**2  # ... rank 0 o_proj
    # No weight moves for the experts under FSDP2 (GPTQ reads the whole copy): only the Linear buffers.
    pieces = (4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096) // 8 * 2
    assert result.ranks[2].owned_weights == 2 * pieces
    traffic = result.traffic[0]
    assert traffic.expert_reduce == 128 * (2048**2 + 768**2) * 8 and traffic.expert_gather == 0

    # Peak: the Hessian forward, with every expert Hessian beside the unsharded layer.
    bf16, qwen_layer = 2, 4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096 + 2 * 128 + 128 * 3 * 768 * 2048 + 128 * 2048
    qwen_layer += 2 * 2048
    shards = result.ranks[0].shards
    activations = 16 * 2048 * 2048 * bf16
    working = 8 * 2048 * 5120 * bf16  # widest output: q/k/v stacked (5120) over 2·768 (gate+up of an expert)
    forward = shards + qwen_layer * bf16 + activations + working + QWEN_EXPERT_HESSIANS + QWEN_LINEAR_HESSIANS
    assert result.ranks[0].peak == forward and result.ranks[0].peak_phase.startswith("Hessian forward")

    # Time: XᵀX of the experts from the routed tokens (top-8 of 128), GPTQ of 16 + 16 slices per holder.
    tokens, mm, chol = 16 * 2048, 400e12, 20e12
    xtx = 48 * 2 * tokens * (2048**2 + 4096**2 + 8 * (2048**2 + 768**2)) / mm
    assert result.time.xtx == pytest.approx(xtx)

    def seconds(rows, cols):
        return 1 / 3 * cols**3 / chol + rows * cols**2 / mm + 25e-6 * cols

    experts = 48 * 16 * (seconds(1536, 2048) + seconds(2048, 768))  # outlasts 7/8 of 4.9 GB at 200 GB/s
    assert result.time.expert_gptq == pytest.approx(experts)
    linear = 48 * seconds(2048, 4096)  # rank 0: o_proj, the slowest Linear owner
    assert result.time.gptq == pytest.approx(experts + linear)

    text = planner.format_plan(result)
    assert (
        "    mlp.experts: 128 experts x (gate_proj+up_proj [1536 x 2048], down_proj [2048 x 768]) quantized per "
        "expert, on their routed tokens, 256 Hessians 6.84 GiB on every rank\n"
        "        owners: the ranks storing them (FSDP2 rows: 16 on each rank); only the Hessians travel\n"
    ) in text
    assert "expert Hessian reduce         4.56 GiB" in text and "not quantized" not in text
    assert "--true-sequential: refused, it does not quantize fused MoE experts yet" in text


def test_qwen3_moe_all_tokens_by_hand(shapes):
    """All-tokens calibration: one gate/up Hessian for all 128 experts (every expert reads every token),
    128 down Hessians from every token; the calibration forward runs every expert on every token."""
    shape = shapes["qwen3-30b-a3b"]
    rates = dict(matmul_tflops=400, cholesky_tflops=20, bandwidth_gbps=200)
    routed = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80, **rates))
    config = GPTQConfig.from_options(expert_calibration="all_tokens")
    result = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80, config=config, **rates))
    assert all(r.expert_hessians == 12 * 2048**2 + 128 * 12 * 768**2 for r in result.ranks)
    # A rank owns its 16 down slices' sums; the shared gate/up H is on every rank.
    assert result.ranks[2].hessians_owned == 12 * 2048**2 + 16 * 12 * 768**2
    assert result.traffic[0].expert_reduce == (2 * 2048**2 + 128 * 768**2) * 8  # gate/up all-reduced once
    tokens, mm = 16 * 2048, 400e12
    xtx = 48 * 2 * tokens * (2048**2 + 4096**2 + 2048**2 + 128 * 768**2) / mm
    assert result.time.xtx == pytest.approx(xtx)
    every_expert = 128 * 3 * 768 * 2048
    assert result.time.forward == pytest.approx(routed.time.forward + 48 * 2 * tokens * every_expert / mm)
    assert result.time.expert_gptq == pytest.approx(routed.time.expert_gptq)  # the same slices, the same owners
    text = planner.format_plan(result)
    assert "quantized per expert, on every token, 129 Hessians 0.89 GiB on every rank" in text


def test_mixtral_world_4_peaks_in_expert_gptq(shapes):
    result = plan(shapes["mixtral-8x7b"], PlanOptions(world_size=4, gpu_memory=MEM80))
    assert result.expert_owners[0] == [0, 0, 1, 1, 2, 2, 3, 3] * 2  # FSDP2 rows: 2 experts per rank
    bf16 = 2
    mixtral_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 3 * 14336 * 4096 + 8 * 4096 + 2 * 4096
    shards = (32 * mixtral_layer + 2 * 32000 * 4096 + 4096) * bf16 // 4  # every dim 0 divides by 4
    activations = 32 * 2048 * 4096 * bf16
    # The largest slice's GPTQ: down [4096 x 14336] (static scales: the slice + 2W + 2H in fp32).
    w, h = 4096 * 14336 * 4, 14336**2 * 4
    workspace = 4096 * 14336 * bf16 + 2 * w + 2 * h
    rank0 = result.ranks[0]
    assert rank0.workspace == workspace
    expert_gptq = (
        shards + mixtral_layer * bf16 + activations + MIXTRAL_LINEAR_HESSIANS + MIXTRAL_EXPERT_HESSIANS + workspace
    )
    assert rank0.peak == expert_gptq == 39_667_320_832
    assert rank0.peak_phase.startswith("expert GPTQ") and rank0.peak_parts["expert Hessians"] == 10_242_490_368


def test_qwen3_moe_zero3_owners_balanced_and_results_gathered(shapes):
    options = PlanOptions(world_size=8, gpu_memory=MEM80, backend="zero3", bandwidth_gbps=200)
    result = plan(shapes["qwen3-30b-a3b"], options)
    slices = [(1536, 2048)] * 128 + [(2048, 768)] * 128
    expected = assign_owners(slices, 8)
    assert result.expert_owners[0] == expected.owners and result.expert_balance[0] == pytest.approx(expected.balance)
    # Every rank receives every slice as int8, each rank's piece padded to the owner's rows.
    gathered = 128 * 8 * (1536 * 2048 + 2048 * 768)
    assert result.traffic[0].expert_gather == gathered
    # The all-gather of a gate+up slice: rows x (2048 int8 levels + 16 int8 zero points + 16 fp32 scales
    # + an fp32 loss) bytes, sent, padded, received from 8 ranks and concatenated, after every slice
    # the rank owns is done: those results (bf16 weight + int8 levels) are all held then.
    counts = [sum(1 for i, o in enumerate(expected.owners) if o == rank and i < 128) for rank in range(8)]
    downs = [sum(1 for i, o in enumerate(expected.owners) if o == rank and i >= 128) for rank in range(8)]
    for rank, r in enumerate(result.ranks):
        held = (counts[rank] * 1536 * 2048 + downs[rank] * 2048 * 768) * 3
        if rank >= 2:  # ranks 0, 1: Linear owners, whose own buffers may be larger
            assert r.owned_weights == 11 * 1536 * (2048 + 5 * 16 + 4) + held
    # The owners compute their slices side by side (balanced by cost), then every result is gathered.
    mm, chol = 400e12, 20e12

    def seconds(rows, cols):
        return 1 / 3 * cols**3 / chol + rows * cols**2 / mm + 25e-6 * cols

    busiest = max(c * seconds(1536, 2048) + d * seconds(2048, 768) for c, d in zip(counts, downs, strict=True))
    per_layer = busiest + gathered / 200e9
    assert result.time.expert_gptq == pytest.approx(48 * per_layer)
    assert "every result is all-gathered as int8 levels once every owner is done" in planner.format_plan(result)


@pytest.mark.slow  # whole-model plans with advice searches
def test_expert_hessians_are_what_more_ranks_cannot_shrink(shapes):
    shape = shapes["qwen3-30b-a3b"]
    result = plan(shape, PlanOptions(world_size=2, gpu_memory=8 * GiB))
    assert not result.fits and planner.smallest_world_size(shape, result.options) is None
    # Unsharded layer + all Hessians + one batch's working set, on every rank whatever the world size.
    floor = (shape.structures[0].numel + 8 * 2048 * 5120) * 2 + QWEN_EXPERT_HESSIANS + QWEN_LINEAR_HESSIANS
    assert f"already needs {floor / GiB:.2f} GiB on one rank" in result.suggestions[0]
    assert result.suggestions[1].startswith(
        "every rank holds all 256 expert Hessians of a layer (6.84 GiB) beside the unsharded layer (1.16 GiB)"
    )


# ---------------------------------------------------------------- giant MoE models, expert parallel

GIANT_MOE = ("qwen3-235b-a22b", "deepseek-v3", "kimi-k2")
# Qwen3-235B-A22B by hand: 64 heads and 4 KV heads of 128, q/k norms, 128 experts of 3 x 1536 x 4096.
Q235_EXPERTS = 128 * 3 * 1536 * 4096
Q235_LAYER = 4096 * 8192 + 2 * 512 * 4096 + 8192 * 4096 + 2 * 128 + Q235_EXPERTS + 128 * 4096 + 2 * 4096
Q235_EXPERT_HESSIANS = 128 * 12 * (4096**2 + 1536**2)  # gate/up read 4096 columns, down 1536


@pytest.fixture(scope="module")
def giant_moe() -> dict[str, planner.ModelShape]:
    return {name: load_model_shape(CONFIGS / f"{name}.json") for name in GIANT_MOE}


def test_giant_moe_parameter_counts(giant_moe):
    """The public configs give the published sizes (DeepSeek-V3 671 B without its MTP layer, which
    transformers does not build; Kimi-K2 about 1 T)."""
    assert giant_moe["qwen3-235b-a22b"].total_params == 94 * Q235_LAYER + 2 * 151936 * 4096 + 4096 == 235_093_634_560
    assert round(giant_moe["deepseek-v3"].total_params / 1e9) == 671
    assert round(giant_moe["kimi-k2"].total_params / 1e9) == 1026


def test_expert_parallel_holds_only_each_ranks_own_experts(giant_moe):
    """Qwen3-235B-A22B on 8 x 80 GiB, 128 x 2048 tokens: every rank holds all 128 experts' Hessians
    (27.4 GiB) and unshards all experts of a layer, so it needs 10 ranks; expert-parallel, a rank
    holds its 16 experts' Hessians, the layer without experts, and one batch's dispatch buffers
    (8 x 2048 tokens x top-8: hidden states out and in, expert outputs both ways, each with its
    routing weight and keep flag), so 8 fit. Its
    Hessians are summed where they are used (no reduce); the routed hidden states travel instead."""
    shape = giant_moe["qwen3-235b-a22b"]
    options = PlanOptions(world_size=8, gpu_memory=MEM80)
    plain, parallel = plan(shape, options), plan(shape, options.with_(expert_parallel=True))
    assert [r.expert_hessians for r in plain.ranks] == [Q235_EXPERT_HESSIANS] * 8
    assert not plain.fits and plain.suggestions[0].startswith("more ranks: --world-size 10 fits")
    assert [r.expert_hessians for r in parallel.ranks] == [Q235_EXPERT_HESSIANS // 8] * 8
    assert all(r.layer == (Q235_LAYER - Q235_EXPERTS) * 2 for r in parallel.ranks)
    routed = 8 * 2048 * 8
    assert all(r.dispatch == routed * (4 * 4096 * 2 + 2 * 2 * 8) for r in parallel.ranks)
    traffic = parallel.traffic[0]
    assert traffic.expert_reduce == 0 and plain.traffic[0].expert_reduce == Q235_EXPERT_HESSIANS * 2 // 3
    assert traffic.dispatch == 2 * 2 * (16 * 2048 * 8) * 4096 * 2 * 7 // 8  # 2 passes, out and back, 7/8 away
    assert traffic.layer_gather == 7 * (Q235_LAYER - Q235_EXPERTS) * 2 // 8
    assert parallel.fits
    assert parallel.time.dispatch == pytest.approx(94 * traffic.dispatch / 200e9)
    assert "expert-parallel calibration (--expert-parallel): each routed token" in planner.format_plan(parallel)


def test_deepseek_v3_fits_8_gpus_only_expert_parallel_with_offloaded_parameters(giant_moe):
    """DeepSeek-V3 at 8 x 80 GiB: all 512 expert Hessians of a layer (97.75 GiB) on every rank fit
    at no world size; expert-parallel, the parameter shards (156 GiB per rank) are what is left, and
    in host memory (FSDP2 CPUOffloadPolicy / ZeRO-3 offload_param) the rest fits."""
    shape = giant_moe["deepseek-v3"]
    options = PlanOptions(world_size=8, gpu_memory=MEM80)
    plain = plan(shape, options)
    assert not plain.fits and plain.suggestions[0].startswith("more ranks: no world size up to 128")
    assert not plan(shape, options.with_(param_offload=True), advise=False).fits
    parallel = plan(shape, options.with_(expert_parallel=True))
    assert not parallel.fits and "--offload-param fits at --world-size 8" in "".join(parallel.suggestions)
    both = plan(shape, options.with_(expert_parallel=True, param_offload=True))
    assert both.fits
    assert [(r.shards, r.host_shards) for r in both.ranks] == [(0, r.shards) for r in plain.ranks]
    assert [r.expert_hessians for r in both.ranks] == [plain.ranks[0].expert_hessians // 8] * 8


def test_expert_parallel_needs_fsdp2_and_routed_calibration(giant_moe):
    options = PlanOptions(world_size=8, gpu_memory=MEM80).with_(expert_parallel=True, backend="zero3")
    problems = plan(giant_moe["qwen3-235b-a22b"], options, advise=False).problems
    assert any("expert-parallel calibration needs each expert whole on one rank: FSDP2" in p for p in problems)
    with pytest.raises(GPTQError, match="all-tokens calibration runs every expert on every token"):
        options.with_(expert_calibration="all_tokens")


def test_parameter_offload_needs_a_sharded_run(giant_moe):
    result = plan(giant_moe["qwen3-235b-a22b"], PlanOptions(world_size=1, gpu_memory=MEM80, param_offload=True))
    assert "give 2 or more ranks" in result.problems[0]


def test_ignored_experts_are_listed_as_not_quantized():
    ignore = GPTQConfig.from_options(ignore=["lm_head", "re:.*mlp.experts$"])
    shape = load_model_shape(CONFIGS / "mixtral-8x7b.json", config=ignore)
    structure = shape.structures[0]
    assert structure.experts == ()
    assert structure.unquantized == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # not mlp.gate
    assert structure.unquantized_params == 8 * 3 * 14336 * 4096 == 1_409_286_144
    result = plan(shape, PlanOptions(world_size=4, gpu_memory=MEM80))
    assert all(r.hessians == MIXTRAL_LINEAR_HESSIANS and r.expert_hessians == 0 for r in result.ranks)
    assert result.time.expert_gptq == 0 and result.traffic[0].expert_reduce == 0
    text = planner.format_plan(result)
    assert (
        "not quantized (no target covers them, or ignored): mlp.experts.gate_up_proj, mlp.experts.down_proj - "
        "1,409,286,144 parameters per layer"
    ) in text
    assert "--true-sequential: estimated time" in text  # without experts the other order is planned


@pytest.mark.slow  # whole-model plans with advice searches
def test_true_sequential_refuses_experts_as_the_run_does(shapes):
    config = GPTQConfig.from_options(true_sequential=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / "qwen3-30b-a3b.json"))
    with pytest.raises(GPTQError, match="--true-sequential does not quantize fused MoE experts yet"):
        target_experts(model, config)
    shape = load_model_shape(CONFIGS / "qwen3-30b-a3b.json", config=config)  # the shapes load all the same
    assert shape.structures[0].experts == shapes["qwen3-30b-a3b"].structures[0].experts
    result = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80, config=config))
    assert not result.fits and result.suggestions == []
    assert result.problems == [
        "--true-sequential does not quantize fused MoE experts yet: use the standard order, or ignore the experts "
        "modules (e.g. model.layers.0.mlp.experts)"
    ]
    standard = plan(shape, PlanOptions(world_size=8, gpu_memory=MEM80))
    assert result.other_order == (standard.time.total, standard.peak) and standard.other_order is None
    text = planner.format_plan(result)
    assert "        owners: none, the true-sequential order refuses them (below)\n" in text
    assert f"standard order: estimated time {_seconds(standard.time.total)}, peak 15.63 GiB" in text


def test_invalid_sample_split_is_reported(shapes):
    result = plan(shapes["llama-3.1-8b"], PlanOptions(world_size=8, gpu_memory=MEM80).with_(num_samples=4))
    assert not result.fits and "cannot be split across 8 ranks" in result.problems[0]


def test_every_fixture_groups_by_meta_forward(shapes):
    for shape in shapes.values():
        assert {s.grouping for s in shape.structures} == {"forward"}
        assert len(shape.structures) == 1  # every layer alike in these five


TINY = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "opt": dict(model_type="opt", ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64),
    "gpt_neox": dict(model_type="gpt_neox", max_position_embeddings=64),
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=16, sliding_window=8),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_meta_groups_equal_a_real_forward(family, tmp_path):
    """The meta-device grouping equals what HessianHooks finds in a real CPU forward of the same model,
    and so do the bytes per token that a forward holds while paused before a target (true-sequential)."""
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    (tmp_path / "config.json").write_text(json.dumps({**config, **TINY[family]}))
    shape = load_model_shape(tmp_path / "config.json", torch.float32, GPTQConfig.from_options(group_size=None))
    assert shape.structures[0].grouping == "forward"

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)).eval()
    modules = target_modules(model, GPTQConfig.from_options(group_size=None))[0]
    _, layers = find_decoder_layers(model)
    ids = torch.randint(0, 128, (1, 8))
    hidden, calls = capture_layer_inputs(model, layers, [(ids, torch.ones_like(ids))])
    hooks = HessianHooks(modules, stop_early=False)  # as in true-sequential order
    paused = []
    made = planner_shapes.NewTensors()

    def at_pause(_module, _args) -> None:
        paused.append(made.bytes_alive(hooks))

    with torch.no_grad(), hooks.attached(), hooks.forward(None), made:
        handles = [m.register_forward_pre_hook(at_pause) for m in modules.values()]
        args, kwargs = calls[0][0]
        layers[0](hidden[0], *args, **kwargs)
    for handle in handles:
        handle.remove()
    prefix = f"{shape.layers_name}.0."
    real = [tuple(n.removeprefix(prefix) for n in g.names) for g in hooks.groups]
    assert [g.names for g in shape.structures[0].groups] == real
    assert shape.structures[0].paused_bytes_per_token == max(paused) / ids.numel() > 0


@pytest.mark.parametrize("name", ["llama-3.1-8b", "mixtral-8x7b"])
def test_rule_fallback_gives_the_same_groups(shapes, name, monkeypatch):
    """Without a meta forward (data-dependent layers), the sibling-name rule finds the same groups here."""
    monkeypatch.setattr(planner_shapes, "_probe_layer_calls", lambda model, layers: [])
    ruled = load_model_shape(CONFIGS / f"{name}.json").structures[0]
    assert ruled.grouping == "rule"
    assert sorted(g.names for g in ruled.groups) == sorted(g.names for g in shapes[name].structures[0].groups)


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30 == parse_size("80G") == parse_size("81920MiB")
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1024") == 1024 and parse_size("1.5TiB") == 3 * 2**39
    with pytest.raises(ValueError):
        parse_size("eighty")


@pytest.mark.slow
def test_cli_plans_a_true_sequential_run(capsys):
    main(["plan", "--model-config", str(CONFIGS / "llama-3.1-8b.json"), "--world-size", "8", "--true-sequential"])
    out = capsys.readouterr().out
    assert ", true-sequential" in out and "rows all-gather" in out and "forward = 1 pass x" in out
    assert "true-sequential GPTQ, layer 0" in out and "FITS" in out
    standard = plan(load_model_shape(CONFIGS / "llama-3.1-8b.json"), PlanOptions(world_size=8, gpu_memory=MEM80))
    assert f"standard order: estimated time {_seconds(standard.time.total)}, peak" in out
    assert (
        standard.other_order is not None
        and standard.other_order[1] == plan(standard.shape, standard.options.with_(true_sequential=True)).peak
    )


@pytest.mark.slow
def test_cli_prints_the_per_rank_table(tmp_path, capsys):
    main(["plan", "--model-config", str(CONFIGS / "llama-3.1-8b.json"), "--world-size", "8", "--gpu-memory", "80GiB"])
    out = capsys.readouterr().out
    assert "per rank (GiB" in out and "shards" in out and "GPTQ ws" in out and "peak" in out
    table = [line for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(line.split()[0]) for line in table] == list(range(8))
    assert "owner balance (assign_owners" in out and "estimated time" in out and "FITS: peak" in out
    assert "8,030,261,248 parameters" in out

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(CONFIGS / "llama-3.1-405b.json", folder / "config.json")
    main(["plan", "--model-config", str(folder), "--world-size", "8", "--gpu-memory", "80GiB", "--backend", "zero3"])
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "what would make it fit" in out and "--offload-activations" in out


@pytest.mark.slow  # whole-model plans with advice searches
def test_cli_sample_and_length_options_have_their_quantize_names(tmp_path, capsys):
    """--num-samples/--max-seq-length as for quantize; --samples/--seq-len are aliases that plan the same."""
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    (tmp_path / "config.json").write_text(json.dumps({**config, **TINY["llama"]}))
    outputs = []
    for names in (("--num-samples", "--max-seq-length"), ("--samples", "--seq-len")):
        flags = [names[0], "40", names[1], "512", "--group-size", "32"]
        main(["plan", "--model-config", str(tmp_path), "--world-size", "4", *flags])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "40 samples x 512 tokens (16 on rank 0" in outputs[0]  # 5 batches of 8


def test_cli_refuses_what_quantize_refuses(tmp_path, capsys):
    for flags, message in [
        (["--true-sequential", "--offload-activations"], "use one of the two"),
        (["--actorder", "group"], "act-order 'group'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--model-config", str(CONFIGS / "llama-3.1-8b.json"), "--world-size", "2", *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_wants_a_unit_for_gpu_memory(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model-config", str(CONFIGS / "llama-3.1-8b.json"), "--world-size", "2", "--gpu-memory", "80"])
    assert exit_info.value.code == 2 and "would be 80 bytes: give a unit, e.g. 80GiB" in capsys.readouterr().err


def test_cli_rejects_a_missing_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model-config", str(tmp_path), "--world-size", "2"])
    assert exit_info.value.code == 2 and "config.json" in capsys.readouterr().err


# case: (model, true_sequential, expert calibration, expert-parallel)
MEASURED_CASES = {
    "standard": ("smollm2", False, "routed", False),
    "true-sequential": ("smollm2", True, "routed", False),
    "moe-experts": ("mixtral", False, "routed", False),
    "moe-experts-all-tokens": ("mixtral", False, "all_tokens", False),
    "moe-expert-parallel": ("mixtral", False, "routed", True),
}


@pytest.fixture(scope="module")
def measured_runs(smollm2_dir, austen, tmp_path_factory):
    """2-rank FSDP2 runs of the MEASURED_CASES, in one launch: SmolLM2's config cut to 2 of its 30
    layers (random weights) and the tiny Mixtral."""
    from conftest import make_tiny_model
    from sharded_helpers import run_workers

    directory = tmp_path_factory.mktemp("measured")
    make_tiny_model("mixtral", directory / "mixtral-2-layers", smollm2_dir)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(smollm2_dir, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory / "smollm2-2-layers")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(directory / "smollm2-2-layers")
    jobs = [
        [str(directory / f"{model}-2-layers"), str(directory / case), str(directory / f"{case}.json"),
         "--text", str(austen / "emma.txt"), "--samples", "6", "--batch-size", "2",
         *(["--true-sequential"] if true_sequential else []), "--expert-calibration", experts,
         *(["--expert-parallel"] if parallel else [])]
        for case, (model, true_sequential, experts, parallel) in MEASURED_CASES.items()
    ]  # fmt: skip
    run_workers(2, jobs, directory)
    return directory


@pytest.mark.distributed
@pytest.mark.parametrize("case", MEASURED_CASES)
def test_memory_model_equals_a_measured_two_rank_run(case, measured_runs):
    """The planner's per-rank shards, unsharded layer, Hessians and activations against the
    MemoryStats that a real 2-rank FSDP2 run of SmolLM2's shapes (its config, 2 of its 30 layers,
    random weights: the figures are per layer, and the shards follow the config) measured from its
    own tensors; and of the tiny Mixtral (4 fused experts, top 2), whose expert slices are GPTQ
    units: every rank holds all 4 x 2 expert Hessians beside the attention ones (all-tokens
    calibration: one gate/up Hessian for the 4 experts, and 4 down ones) and the whole experts
    beside its own; expert-parallel, a rank holds its own 2 experts' Hessians and weights only,
    the layer unsharded without them, and dispatch buffers.

    Margin 0: for these four the planner counts the very tensors the run allocates (FSDP2's dim-0
    chunks, the whole layer, HessianGroup's float64 upper blocks and fp32 block of XᵀX in the CPU
    layout, the rank's calibration hidden states in and out of a layer), shapes times element sizes,
    nothing estimated."""
    model, true_sequential, experts, parallel = MEASURED_CASES[case]
    model_dir = measured_runs / f"{model}-2-layers"
    report = json.loads((measured_runs / f"{case}.json").read_text())
    measured = report["memory_per_rank"]
    config = GPTQConfig.from_options(
        group_size=32, num_samples=6, max_seq_length=32, batch_size=2, true_sequential=true_sequential,
        expert_calibration=experts, expert_parallel=parallel,
    )  # fmt: skip
    shape = load_model_shape(model_dir / "config.json", dtype=torch.float32, config=config)
    options = PlanOptions(world_size=2, gpu_memory=MEM80, config=config, device_type="cpu")
    result = plan(shape, options, advise=False)
    planned = result.ranks
    assert len(measured) == len(planned) == 2
    if model == "mixtral":  # hidden 64, intermediate 128: one CPU block each, 12 bytes per element
        held = (1 if experts == "all_tokens" else 4) * 12 * 64**2 + 4 * 12 * 128**2
        held //= 2 if parallel else 1
        assert [p.expert_hessians for p in planned] == [held] * 2
        assert [p.hessians for p in planned] == [held + 2 * 12 * 64**2] * 2  # + q/k/v and o_proj
        # The experts' owners are the ranks storing them (2 each), as the run recorded them.
        assert result.expert_owners[0] == [0, 0, 1, 1] * 2
        for layer in range(2):
            slices = [f"model.layers.{layer}.mlp.experts.{e}.{leaf}" for leaf in ("w1", "w2") for e in range(4)]
            if experts == "all_tokens":
                assert [report["hessians"][n] for n in slices] == ["shared"] * 4 + ["own"] * 4
            assert [report["owners"][n] for n in slices] == result.expert_owners[0]
    for rank, (m, p) in enumerate(zip(measured, planned, strict=True)):
        figures = {
            "shards": (p.shards, m["shard_bytes"]),
            "unsharded layer": (p.layer, m["layer_unsharded_bytes"]),
            "Hessians": (p.hessians, m["hessian_bytes"]),
            "activations in and out": (2 * p.activations, m["activation_bytes"]),  # planned: at rest
        }
        if model == "mixtral":
            figures["expert Hessians"] = (p.expert_hessians, m["expert_hessian_bytes"])
            figures["expert weights"] = (p.expert_weights, m["expert_weight_bytes"])
        # Dispatch buffers follow the routing; the plan's assume it balanced (a rank receives as many
        # rows as it sends). What a rank sends and gets back is fixed, what it receives lies between
        # none and every rank's rows: between half the plan's figure and (1 + ranks) / 2 of it.
        assert (m["dispatch_bytes"] > 0) == (p.dispatch > 0) == parallel
        assert not parallel or p.dispatch / 2 <= m["dispatch_bytes"] <= p.dispatch * 3 / 2
        assert all(v > 0 for pair in figures.values() for v in pair), figures
        assert {k: a for k, (a, _) in figures.items()} == {k: b for k, (_, b) in figures.items()}, f"rank {rank}"
