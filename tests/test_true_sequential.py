"""True-sequential GPTQ (`true_sequential=True`): each Linear quantized inside the layer's one forward."""

from __future__ import annotations

import json

import pytest
import torch
from sharded_helpers import dequantized, logits_at_rank_threads, run_workers, single_process
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, load_texts, quantize_model
from gptq_fsdp.core.gptq import gptq_quantize
from gptq_fsdp.core.hessian import hessian_from_sum
from gptq_fsdp.data import rank_batches
from gptq_fsdp.model.capture import capture_layer_inputs
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.model.layers import find_decoder_layers, target_modules


def straightforward_true_sequential(model, calibration, config) -> None:
    """The obvious version: the whole layer forward again for every Hessian group (slow, clearly right).

    It runs the batches quantize_model runs (same shapes), so every matmul is the one of the pipeline."""
    _, layers = find_decoder_layers(model)
    per_layer = target_modules(model, config)
    batches = [calibration.batch(b) for b in rank_batches(len(calibration), 0, 1, config.batch_size)]
    xs, calls = capture_layer_inputs(model, layers, batches)
    masks = [mask for _, mask in batches]
    for layer, modules, layer_calls in zip(layers, per_layer, calls, strict=True):
        done: set[str] = set()
        while len(done) < len(modules):
            hooks = HessianHooks(modules, stop_early=False)
            with hooks.attached():
                for x, mask, (args, kwargs) in zip(xs, masks, layer_calls, strict=True):
                    with hooks.forward(mask):
                        layer(x, *args, **kwargs)
            group = next(g for g in hooks.groups if not set(g.names) <= done)  # first in call order
            for name in group.names:
                weight = modules[name].weight
                hessian = hessian_from_sum(group.sum, group.tokens, group.columns)
                result = gptq_quantize(weight, hessian, config.weights, block_size=config.block_size)
                weight.data.copy_(result.weight)
                done.add(name)
        outs = [layer(x, *args, **kwargs) for x, (args, kwargs) in zip(xs, layer_calls, strict=True)]
        xs = [out[0] if isinstance(out, tuple) else out for out in outs]


@pytest.fixture(scope="module")
def calibration(tiny_llama_dir, austen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return build_calibration(load_texts(str(austen / "emma.txt")), tokenizer, num_samples=12, max_seq_length=32)


@torch.no_grad()
def test_equals_the_straightforward_version(tiny_llama_dir, calibration):
    config = GPTQConfig.from_options(group_size=32, true_sequential=True)
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    result = quantize_model(ours, calibration, config)
    expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    straightforward_true_sequential(expected, calibration, config)
    quantized = [n for n, m in ours.named_modules() if n.endswith("proj")]
    assert sorted(result.modules) == sorted(quantized) and len(quantized) == 14
    # Same batches, same process and threads, same sequence of operations: the same bits.
    for name in quantized:
        assert torch.equal(ours.get_submodule(name).weight, expected.get_submodule(name).weight), name
    assert result.phases["propagate"] == 0  # one forward per layer
    assert result.phases["forward"] > 0 and result.phases["gptq"] > 0 and result.phases["hessian"] > 0


@torch.no_grad()
def test_differs_from_the_standard_order_but_not_by_much(tiny_llama_dir, calibration):
    """Later Linears see inputs from quantized earlier ones, so their weights differ from the standard
    run; the first Linears of the first layer (whose inputs nothing quantized has touched) do not."""
    models = {}
    for mode in (False, True):
        models[mode] = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        quantize_model(models[mode], calibration, GPTQConfig.from_options(group_size=32, true_sequential=mode))
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(models[False].get_submodule(first).weight, models[True].get_submodule(first).weight)
    later = "model.layers.1.mlp.down_proj"
    assert not torch.equal(models[False].get_submodule(later).weight, models[True].get_submodule(later).weight)
    ids = calibration.input_ids[:4]
    losses = {
        mode: torch.nn.functional.cross_entropy(m(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        for mode, m in models.items()
    }
    # Not a rounding tolerance: two GPTQ orders of one model land within 2 % of each other's loss
    # (they differ by quantization steps, not by fp32 rounding).
    assert abs(losses[True] - losses[False]) / losses[False] < 0.02


# case: (--load, --scale-search); 7 samples at 3 ranks: 2, 1 and 1 batches of 2
SHARDED_CASES = {"sharded-minmax": ("sharded", "minmax"), "zero3-minmax": ("zero3", "minmax"),
                 "sharded-imatrix_mse": ("sharded", "imatrix_mse")}  # fmt: skip
NARROW = dict(hidden_size=2, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1, head_dim=2)
NARROW_LOADS = ("sharded", "zero3")


@pytest.fixture(scope="module")
def sharded_runs(tiny_llama_dir, smollm2_dir, austen, tmp_path_factory):
    """Every 3-rank run of this file in one launch: the cases of test_sharded_equals_single_process,
    and a Llama 2 features wide (test_units_with_fewer_rows_than_ranks...) in each backend."""
    from conftest import make_tiny_model

    directory = tmp_path_factory.mktemp("true-sequential-3-ranks")
    narrow = make_tiny_model("llama", directory / "narrow", smollm2_dir, **NARROW)
    text = ["--text", str(austen / "emma.txt"), "--true-sequential"]
    jobs = [
        [str(tiny_llama_dir), str(directory / case), str(directory / f"{case}.json"), *text, "--load", load,
         "--samples", "7", "--scale-search", scale_search]
        for case, (load, scale_search) in SHARDED_CASES.items()
    ] + [
        [str(narrow), str(directory / f"narrow-{load}"), str(directory / f"narrow-{load}.json"), *text, "--load", load,
         "--group-size", "0"]
        for load in NARROW_LOADS
    ]  # fmt: skip
    run_workers(3, jobs, directory)
    return directory


@pytest.mark.distributed
@pytest.mark.parametrize("case", SHARDED_CASES)
def test_sharded_equals_single_process(case, sharded_runs, tiny_llama_dir, austen, tmp_path):
    """Against one process: the same bits. At 3 ranks the batches (7 samples: 2, 1 and 1 batches of 2)
    and the row shares (32 k_proj rows: 11, 11, 10) are uneven; each row's GPTQ (searched scales too)
    does not depend on the rows quantized beside it. 2 ranks run in test_faults (resume) and test_vllm (served)."""
    (load, scale_search), world = SHARDED_CASES[case], 3
    output, report = sharded_runs / case, json.loads((sharded_runs / f"{case}.json").read_text())
    assert report["world"] == world and report["backend"] == ("zero3" if load == "zero3" else "fsdp2")
    assert len(set(report["owners"].values())) == world
    single = single_process(
        tiny_llama_dir, tmp_path / "single", austen / "emma.txt", 7, true_sequential=True, scale_search=scale_search
    )
    sharded_model, sharded = dequantized(output)
    _, expected = dequantized(single)
    assert sharded.keys() == expected.keys()
    assert all(torch.equal(sharded[k], expected[k]) for k in expected)
    # What each rank stored equals what it computed with: the saved model gives the in-memory logits.
    ids = torch.tensor(report["input_ids"])
    assert torch.equal(logits_at_rank_threads(sharded_model, ids), torch.tensor(report["logits"]))


@pytest.mark.distributed
@pytest.mark.parametrize("load", NARROW_LOADS)
def test_units_with_fewer_rows_than_ranks_are_quantized_whole_on_every_rank(load, sharded_runs, austen, tmp_path):
    """A Llama 2 features wide at 3 ranks: o_proj and down_proj have 2 rows, too few to split over the
    ranks, so every rank quantizes all of them (q/k/v with 6 rows and gate/up with 8 are split)."""
    output, report = sharded_runs / f"narrow-{load}", json.loads((sharded_runs / f"narrow-{load}.json").read_text())
    single = single_process(
        sharded_runs / "narrow", tmp_path / "single", austen / "emma.txt", 12, true_sequential=True, group_size=None
    )
    sharded_model, sharded = dequantized(output)
    _, expected = dequantized(single)
    assert sharded["model.layers.0.self_attn.o_proj.weight"].shape == (2, 2)
    assert all(torch.equal(sharded[k], expected[k]) for k in expected)
    ids = torch.tensor(report["input_ids"])
    assert torch.equal(logits_at_rank_threads(sharded_model, ids), torch.tensor(report["logits"]))


@torch.no_grad()
def test_a_failure_inside_the_paused_forwards_is_raised_and_leaves_no_thread(tiny_llama_dir, calibration, monkeypatch):
    import threading

    from gptq_fsdp import pipeline
    from gptq_fsdp.core.scheme import GPTQError
    from gptq_fsdp.pipeline import owners

    def fail_on_o_proj(weight, hessian, args, *, name, **options):
        if "o_proj" in name:
            raise GPTQError(f"{name}: refused by the test")
        return gptq_quantize(weight, hessian, args, name=name, **options)

    monkeypatch.setattr(owners, "gptq_quantize", fail_on_o_proj)
    before = threading.active_count()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = GPTQConfig.from_options(group_size=32, batch_size=4, true_sequential=True)  # 3 paused forwards
    with pytest.raises(pipeline.LayerError, match=r"layer 0 .*o_proj: refused by the test"):
        quantize_model(model, calibration, config)
    assert threading.active_count() == before


@torch.no_grad()
def test_a_failure_inside_a_forward_thread_is_raised_and_leaves_no_thread(tiny_llama_dir, calibration):
    import threading

    from gptq_fsdp.pipeline import LayerError

    before = threading.active_count()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    def boom(module, args):
        raise RuntimeError("boom in the forward")

    model.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(boom)
    config = GPTQConfig.from_options(group_size=32, batch_size=4, true_sequential=True)
    with pytest.raises(LayerError, match="layer 1 .*boom in the forward"):
        quantize_model(model, calibration, config)
    assert threading.active_count() == before
