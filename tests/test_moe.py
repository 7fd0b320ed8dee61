"""MoE experts stored fused (transformers 5): every expert quantized, per expert, in one process and
sharded; pooled Hessians for experts short of tokens; the orders and resume that do not cover them
yet refuse them up front; the upcycling of scripts/upcycle_smollm2.py keeps the dense model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _load_script, make_tiny_model
from sharded_helpers import REPO, dequantized, single_process, torchrun
from test_models import EXPERT_LEAVES, check_dequantized, expert_slices, fused_experts, load_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import GPTQConfig, GPTQError, build_calibration, load_texts, quantize_model, save_quantized

GROUP = 32


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, smollm2_dir):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral"), smollm2_dir)


@pytest.fixture(scope="module")
def one_process(mixtral_dir, austen, tmp_path_factory):
    """The tiny Mixtral (4 experts, top-2) quantized in one process on 12 samples of 32 tokens."""
    tokenizer = AutoTokenizer.from_pretrained(mixtral_dir)
    calibration = build_calibration(load_texts(str(austen / "emma.txt")), tokenizer, num_samples=12, max_seq_length=32)
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    result = quantize_model(model, calibration, GPTQConfig.from_options(group_size=GROUP, batch_size=2))
    out = save_quantized(model, tmp_path_factory.mktemp("mixtral-w4") / "ckpt", result, tokenizer=tokenizer)
    return model, result, out, calibration


def test_every_expert_is_its_own_quantized_weight(one_process):
    model, result, out, calibration = one_process
    slices = expert_slices(model, "mixtral")
    assert len(slices) == 2 * 4 * 3  # layers x experts x (w1, w3, w2)
    for name, weight in slices.items():
        check_dequantized(name, weight, result.modules[name], GROUP)
    tensors = load_tensors(out)
    assert not fused_experts(model) & set(tensors), "no fused full-precision experts left"
    for name in slices:
        assert {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"} <= set(tensors)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(ignore), "routers stay full precision"


@pytest.mark.parametrize("samples", [12, 3])
def test_token_counts_and_pooled_hessians(mixtral_dir, one_process, samples):
    """Each expert's Hessian counts the tokens routed to it: top-2 of 4 experts, so each projection's
    counts sum to 2 x the calibration tokens. Slices with fewer tokens than input columns (their H
    would be singular) use the pooled one, and so are the ones with the fewest tokens; the run's
    table says which (3 samples of 32 tokens leave some experts short)."""
    calibration = one_process[3]
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    subset = type(calibration)(*calibration.batch(list(range(samples))))
    result = quantize_model(model, subset, GPTQConfig.from_options(group_size=GROUP, batch_size=2))
    pooled = 0
    for layer in range(2):
        for leaf, columns in (("w1", 64), ("w3", 64), ("w2", 128)):
            records = [result.modules[f"model.layers.{layer}.mlp.experts.{e}.{leaf}"] for e in range(4)]
            assert sum(r.tokens for r in records) == 2 * samples * 32
            for record in records:
                assert record.hessian == ("pooled" if record.tokens < columns else "own"), record
                pooled += record.hessian == "pooled"
    assert (pooled > 0) == (samples == 3), pooled
    header, *rows = result.table().splitlines()
    assert header.split()[:5] == ["module", "layer", "owner", "tokens", "hessian"]
    assert sum(" pooled " in row for row in rows) == pooled


def test_reload_gives_the_in_memory_logits(one_process):
    model, _, out, calibration = one_process
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)
    for name in fused_experts(model):
        assert torch.equal(reloaded.get_parameter(name), model.get_parameter(name)), name


def test_what_does_not_cover_experts_yet_refuses_them_up_front(mixtral_dir, one_process, tmp_path):
    _, _, _, calibration = one_process
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    with pytest.raises(GPTQError, match="--true-sequential does not quantize fused MoE experts yet"):
        quantize_model(model, calibration, GPTQConfig.from_options(group_size=GROUP, true_sequential=True))
    with pytest.raises(GPTQError, match="asymmetric MoE experts: transformers 5.24 cannot load"):
        quantize_model(model, calibration, GPTQConfig.from_options(group_size=GROUP, symmetric=False))
    with pytest.raises(GPTQError, match="--resume does not restore quantized MoE experts yet"):
        quantize_model(model, calibration, GPTQConfig.from_options(group_size=GROUP), state_dir=tmp_path, resume=True)
    # Ignoring the experts modules leaves them fused and full precision, as asked.
    config = GPTQConfig.from_options(group_size=GROUP, true_sequential=True, ignore=["lm_head", "re:.*experts$"])
    result = quantize_model(model, calibration, config)
    assert not [n for n in result.quantized if ".experts." in n]


@pytest.mark.distributed
@pytest.mark.parametrize("world,load,samples", [(3, "rank0", 7), (3, "zero3", 7)], ids=["fsdp2-3", "zero3-3"])
def test_sharded_experts_equal_one_process(world, load, samples, mixtral_dir, austen, tmp_path):
    """FSDP2 (each rank owns the experts it stores: only their Hessians travel) and ZeRO-3 (flat
    partitions: owners balanced, results sent to every rank) write the one-process checkpoint of the
    ranks' batches, at 3 ranks with uneven batches (FSDP2 at 2 ranks: test_fsdp2)."""
    output = tmp_path / "ckpt"
    torchrun(
        world, str(REPO / "tests" / "fsdp_worker.py"), str(mixtral_dir), str(output), str(tmp_path / "r.json"),
        "--text", str(austen / "emma.txt"), "--load", load, "--samples", str(samples),
    )  # fmt: skip
    expected = single_process(mixtral_dir, tmp_path / "single", austen / "emma.txt", samples, as_ranks=world)
    names = {k.removesuffix(".weight_packed") for k in load_tensors(output) if k.endswith(".weight_packed")}
    assert {f"model.layers.1.mlp.experts.3.{leaf}" for leaf in EXPERT_LEAVES["mixtral"]} <= names
    _, sharded = dequantized(output)
    _, single = dequantized(expected)
    assert sharded.keys() == single.keys()
    assert not [k for k in single if not torch.equal(sharded[k], single[k])]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--true-sequential"], "--true-sequential does not quantize fused MoE experts yet"),
        (["--scheme", "W4A16_ASYM"], "asymmetric MoE experts: transformers 5.24 cannot load"),
        (["--resume"], "--resume does not restore quantized MoE experts yet"),
    ],
)
def test_the_cli_refuses_them_before_reading_weights(
    mixtral_dir, austen, tmp_path, capsys, weights_never_read, extra, message
):
    from gptq_fsdp.cli import main

    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(mixtral_dir), "--dataset", str(austen / "emma.txt"), "--group-size", "32",
              "--output", str(output), *extra])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("layout", ["mixtral", "ernie"])
def test_upcycling_identical_experts_is_the_dense_model(tiny_llama_dir, layout):
    """scripts/upcycle_smollm2.py with noise 0: every expert is the dense MLP and the top-2 weights
    sum to 1, so the MoE computes the dense model's logits (ERNIE: its rotary pairs need the q/k
    rows permuted; layer 0 stays dense, layer 1 is MoE)."""
    upcycle = _load_script("upcycle_smollm2").upcycle
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    moe = upcycle(tiny_llama_dir, experts=4, top_k=2, noise=0.0, seed=0, layout=layout, moe_interval=2)
    assert [hasattr(layer.mlp, "experts") for layer in moe.model.layers] == [layout == "mixtral", True]
    ids = torch.randint(0, dense.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(ids).logits
        torch.testing.assert_close(moe(ids).logits, expected, rtol=0, atol=1e-5)
        noisy = upcycle(tiny_llama_dir, experts=4, top_k=2, noise=0.02, seed=0, layout=layout, moe_interval=2)
        assert not torch.allclose(noisy(ids).logits, expected, rtol=0, atol=1e-5)
