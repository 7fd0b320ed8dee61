"""MoE experts stored fused (transformers 5): every expert quantized, per expert, in one process and
sharded; pooled Hessians for experts short of tokens; the orders and resume that do not cover them
yet refuse them up front; FSDP2's per-rank load of per-expert files; the upcycling of
scripts/upcycle_smollm2.py keeps the dense model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import _load_script, make_tiny_model
from safetensors.torch import save_file
from sharded_helpers import REPO, dequantized, run_workers, single_process, torchrun
from test_models import EXPERT_LEAVES, check_dequantized, expert_slices, fused_experts, in_files, load_tensors
from torch.distributed.checkpoint import HuggingFaceStorageReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.core_model_loading import Interleave

from gptq_fsdp import GPTQConfig, GPTQError, build_calibration, compat, load_texts, quantize_model, save_quantized
from gptq_fsdp.distributed import Backend, FSDP2Backend, ZeRO3Backend
from gptq_fsdp.distributed.expert_parallel import check_expert_parallel
from gptq_fsdp.distributed.fsdp2 import row_counts
from gptq_fsdp.distributed.launch import LaunchError
from gptq_fsdp.distributed.loading import tensors_in_files
from gptq_fsdp.model.experts import expert_params
from gptq_fsdp.model.hooks import HessianHooks
from gptq_fsdp.model.layers import target_experts

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
    for name in map(in_files, slices, ["mixtral"] * len(slices)):  # block_sparse_moe.experts.E.w1, as in its files
        assert {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"} <= set(tensors)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    # Routers stay full precision, named as transformers (in memory) and vLLM (in the files) find them.
    routers = {f"model.layers.{i}.{block}.gate" for i in (0, 1) for block in ("mlp", "block_sparse_moe")}
    assert routers <= set(ignore)


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


def test_expert_parallel_refuses_what_it_cannot_run_on(mixtral_dir, monkeypatch):
    """Before any forward: under ZeRO-3 (flat partitions cut through experts), and under FSDP2 when
    an experts module is not an FSDP2 module of its own (its layer's unshard would gather it)."""
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    config = GPTQConfig.from_options(group_size=GROUP, expert_parallel=True)
    experts = target_experts(model, config)
    for backend in (ZeRO3Backend, FSDP2Backend):
        monkeypatch.setattr(backend, "world_size", 2)
    with pytest.raises(GPTQError, match="needs each expert whole on one rank: FSDP2"):
        check_expert_parallel(experts, ZeRO3Backend())
    with pytest.raises(GPTQError, match=r"model.layers.0.mlp.experts and 1 more is not. fully_shard every experts"):
        check_expert_parallel(experts, FSDP2Backend())
    check_expert_parallel(experts, Backend())  # one process: nothing to dispatch


def test_all_tokens_calibrates_every_expert_on_every_token(mixtral_dir, one_process):
    """All-tokens calibration: one gate/up Hessian, of the experts module's whole input, for every
    expert; each expert's down Hessian from its own intermediate activations on every token (here
    recomputed by hand from its weights); padding left out; the layer's output is the routed one."""
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir).eval()
    layer = model.model.layers[0]
    experts = layer.mlp.experts
    params = expert_params(model, layer, "model.layers.0.")
    hidden = torch.randn(2, 16, model.config.hidden_size)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # 5 padding tokens
    position_ids = torch.arange(16).expand(2, -1)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids), "attention_mask": None}
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    outputs = {}
    for mode in ("routed", "all_tokens"):
        hooks = HessianHooks({}, experts=params, device=torch.device("cpu"), all_tokens=mode == "all_tokens")
        with torch.no_grad(), hooks.attached(), hooks.forward(mask):
            outputs[mode] = layer(hidden, **kwargs)
    handle.remove()
    assert torch.equal(outputs["routed"], outputs["all_tokens"]), "the layer's output stays the routed one"
    x = seen[-1][mask.reshape(-1).bool()].double()  # the experts' input without padding: 27 tokens
    gate_up, down = params
    shared = hooks.shared_groups[gate_up]
    assert shared.tokens == 27 and not [k for k in hooks.expert_groups if k[0] is gate_up]
    torch.testing.assert_close(shared.hessian().double(), 2 * x.T @ x / 27, rtol=1e-5, atol=1e-6)
    for e in range(4):
        g, u = (x @ experts.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
        intermediate = torch.nn.functional.silu(g) * u
        group = hooks.expert_groups[down, e]
        assert group.tokens == 27
        reference = 2 * intermediate.T @ intermediate / 27  # fp32 products of 64-128 terms: ~1e-5 relative
        torch.testing.assert_close(group.hessian().double(), reference, rtol=1e-4, atol=1e-5 * reference.abs().max())


def test_all_tokens_in_the_run_table(mixtral_dir, one_process):
    calibration = one_process[3]
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    config = GPTQConfig.from_options(group_size=GROUP, batch_size=2, expert_calibration="all_tokens")
    result = quantize_model(model, calibration, config)
    for layer in range(2):
        for e in range(4):
            for leaf, kind in (("w1", "shared"), ("w3", "shared"), ("w2", "own")):
                record = result.modules[f"model.layers.{layer}.mlp.experts.{e}.{leaf}"]
                assert (record.tokens, record.hessian) == (12 * 32, kind), record
    routed = one_process[0].model.layers[1].mlp.experts.down_proj
    assert not torch.equal(model.model.layers[1].mlp.experts.down_proj, routed)


IGNORED_EXPERTS = ["lm_head", "re:.*experts$"]
# Of the experts only their down projections (Mixtral's w2), beside the attention's o_proj
DOWN_ONLY = ["re:.*experts\\.\\d+\\.w2$", "re:.*o_proj$"]
# case: (--load, --expert-calibration, other worker options, the same as GPTQConfig options), all at
# 3 ranks on 7 samples, in one launch
SHARDED_CASES = {
    "fsdp2-3": ("rank0", "routed", [], {}),
    "zero3-3": ("zero3", "routed", [], {}),
    "fsdp2-3-all-tokens": ("rank0", "all_tokens", [], {}),
    "fsdp2-3-expert-parallel": ("sharded", "routed", ["--expert-parallel"], {}),
    "fsdp2-3-expert-parallel-padded": ("sharded", "routed", ["--expert-parallel", "--no-pack"], {}),
    # experts modules fully_shard'ed on their own but not dispatched: unsharded with their layers
    "fsdp2-3-experts-wrapped": ("sharded", "routed", ["--wrap-experts"], {}),
    "fsdp2-3-expert-parallel-experts-ignored": (
        "sharded", "routed", ["--expert-parallel", "--ignore", *IGNORED_EXPERTS], {"ignore": IGNORED_EXPERTS}
    ),
    "fsdp2-3-expert-parallel-down-only": (
        "sharded", "routed", ["--expert-parallel", "--targets", *DOWN_ONLY], {"targets": DOWN_ONLY}
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def short_documents(austen, tmp_path_factory) -> Path:
    """Emma's short paragraphs as documents: unpacked, they make padded samples of 32 tokens."""
    paragraphs = [p.strip() for p in (austen / "emma.txt").read_text().split("\n\n") if 40 < len(p.strip()) < 120]
    path = tmp_path_factory.mktemp("documents") / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs[:40]) + "\n")
    return path


def calibration_text(case: str, austen, short_documents) -> Path:
    return short_documents if "--no-pack" in SHARDED_CASES[case][2] else austen / "emma.txt"


@pytest.fixture(scope="module")
def sharded_runs(mixtral_dir, austen, short_documents, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded-moe")
    jobs = [
        [str(mixtral_dir), str(directory / case), str(directory / f"{case}.json"),
         "--text", str(calibration_text(case, austen, short_documents)), "--load", load, "--samples", "7",
         "--expert-calibration", experts, *extra]
        for case, (load, experts, extra, _) in SHARDED_CASES.items()
    ]  # fmt: skip
    run_workers(3, jobs, directory)
    return directory


@pytest.mark.distributed
@pytest.mark.parametrize("case", SHARDED_CASES)
def test_sharded_experts_equal_one_process(case, sharded_runs, mixtral_dir, austen, short_documents, tmp_path):
    """FSDP2 (each rank owns the experts it stores: only their Hessians travel) and ZeRO-3 (flat
    partitions: owners balanced, results sent to every rank) write the one-process checkpoint, at 3
    ranks with uneven numbers of batches (FSDP2 at 2 ranks: test_fsdp2); so do all-tokens
    calibration (its shared gate/up Hessian all-reduced) and expert-parallel calibration (4 experts
    on 3 ranks: 2, 2 and none; with padded samples, whose padding tokens travel to the experts'
    ranks and stay out of their Hessians; with the experts ignored, which then run unsharded with
    their layers; with only the experts' down projections targeted, the gate/up ones running on the
    owners unquantized). Experts modules fully_shard'ed on their own without expert-parallel
    calibration are unsharded with their layers."""
    output, (_, experts, extra, options), samples = sharded_runs / case, SHARDED_CASES[case], 7
    text = calibration_text(case, austen, short_documents)
    pack = "--no-pack" not in extra
    expected = single_process(
        mixtral_dir, tmp_path / "single", text, samples, expert_calibration=experts, pack=pack, **options
    )
    names = {k.removesuffix(".weight_packed") for k in load_tensors(output) if k.endswith(".weight_packed")}
    leaves = {"ignore": [], "targets": ["w2"]}.get(next(iter(options), ""), EXPERT_LEAVES["mixtral"])
    assert {f"model.layers.1.block_sparse_moe.experts.3.{leaf}" for leaf in leaves} <= names
    assert bool(leaves) == any(".experts." in n for n in names)
    _, sharded = dequantized(output)
    _, single = dequantized(expected)
    assert sharded.keys() == single.keys()
    assert not [k for k in single if not torch.equal(sharded[k], single[k])]


@pytest.mark.distributed
def test_expert_parallel_ranks_hold_only_their_own_experts(sharded_runs):
    """Expert-parallel at 3 ranks (4 experts: 2, 2, none): a rank's expert Hessians and expert weights
    are those of its own experts (hidden 64 and intermediate 128 give Hessians of one CPU block,
    12 bytes per element; each expert is 256 x 64 + 64 x 128 fp32 weights), the layer it unshards
    holds no expert, and it holds dispatch buffers; the all-experts path (FSDP2, routed) holds every
    expert's Hessian and the whole experts beside its own on every rank."""
    hessian, weights, experts = 12 * (64**2 + 128**2), 4 * (256 * 64 + 64 * 128), [2, 2, 0]
    parallel = json.loads((sharded_runs / "fsdp2-3-expert-parallel.json").read_text())["memory_per_rank"]
    every = json.loads((sharded_runs / "fsdp2-3.json").read_text())["memory_per_rank"]
    assert [m["expert_hessian_bytes"] for m in parallel] == [n * hessian for n in experts]
    assert [m["expert_weight_bytes"] for m in parallel] == [n * weights for n in experts]
    assert [m["expert_hessian_bytes"] for m in every] == [4 * hessian] * 3
    assert [m["expert_weight_bytes"] for m in every] == [(4 + n) * weights for n in experts]
    unsharded = [m["layer_unsharded_bytes"] + 4 * weights for m in parallel]
    assert unsharded == [m["layer_unsharded_bytes"] for m in every]
    assert all(m["dispatch_bytes"] > 0 for m in parallel) and not any(m["dispatch_bytes"] for m in every)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--true-sequential"], "--true-sequential does not quantize fused MoE experts yet"),
        (["--scheme", "W4A16_ASYM"], "asymmetric MoE experts: transformers 5.24 cannot load"),
        (["--resume"], "--resume does not restore quantized MoE experts yet"),
        (["--backend", "zero3", "--expert-parallel"], "--expert-parallel needs each expert whole on one rank"),
        (["--expert-parallel", "--expert-calibration", "all-tokens"], "all-tokens calibration runs every expert"),
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


# ------------------------------------------------------------------- FSDP2's per-rank load of experts

EXPERTS_OPTION = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def moe_folder(family: str, directory, tokenizer_dir, experts: int):
    """A tiny random `family` model with `experts` experts per layer, saved as transformers saves it
    (per-expert tensors); DeepSeek-V3's router bias, a buffer its files hold, made non-zero."""
    make_tiny_model(family, directory, tokenizer_dir, **{EXPERTS_OPTION[family]: experts})
    if family == "deepseek_v3":
        tensors = load_tensors(directory)
        for name in [n for n in tensors if n.endswith("e_score_correction_bias")]:
            tensors[name] = torch.randn(experts)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def saved_fused(model_dir, directory):
    """`model_dir` with the in-memory layout in its files (fused experts, in-memory names)."""
    directory.mkdir()
    shutil.copy(model_dir / "config.json", directory / "config.json")
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def planned(model_dir):
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.tie_weights()  # as the sharded load does
    return tensors_in_files(model, HuggingFaceStorageReader(str(model_dir)))


def test_per_expert_files_are_planned_expert_by_expert(mixtral_dir, tmp_path):
    """Each fused parameter's file tensors, from the model's own save conversion: expert e's gate
    rows are w1, its up rows w3; files that hold the in-memory layout are read as they are."""
    reads = planned(mixtral_dir)
    pieces = reads.experts["model.layers.1.mlp.experts.gate_up_proj"]
    assert [(p.expert, p.row, p.rows) for p in pieces] == [(e, r, 128) for r in (0, 128) for e in range(4)]
    assert pieces[5].key == "model.layers.1.block_sparse_moe.experts.1.w3.weight"
    assert len(reads.experts) == 4 and "model.layers.1.block_sparse_moe.gate.weight" in reads.direct
    fused = planned(saved_fused(mixtral_dir, tmp_path / "fused"))
    assert not fused.experts and "model.layers.1.mlp.experts.gate_up_proj" in fused.direct


def test_the_sharded_load_names_what_it_cannot_read(mixtral_dir, tmp_path, monkeypatch):
    """A missing expert tensor is named; so is a conversion whose file tensors are not whole rows of
    one expert (here gate and up rows interleaved), with --load rank0 as the way out."""
    broken = tmp_path / "broken"
    shutil.copytree(mixtral_dir, broken)
    tensors = load_tensors(broken)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LaunchError, match=r"lack 1 tensor\(s\): model.layers.1.block_sparse_moe.experts.2.w3.weight$"):
        planned(broken)

    conversions = compat.weight_conversions

    def interleaved(model):
        found = conversions(model)
        for converter in found:
            if converter.target_patterns == [".experts.gate_up_proj"]:
                converter.operations.append(Interleave(dim=1))
        return found

    monkeypatch.setattr(compat, "weight_conversions", interleaved)
    with pytest.raises(LaunchError, match="--load rank0") as refused:
        planned(mixtral_dir)
    assert "model.layers.0.mlp.experts.gate_up_proj (['.experts.*.w1.weight'" in str(refused.value)
    assert "down_proj" not in str(refused.value)


@pytest.mark.distributed
@pytest.mark.parametrize("world,experts", [(2, 4), (3, 5)], ids=["2-ranks", "3-ranks-uneven"])
def test_sharded_load_reads_only_each_ranks_experts(world, experts, mixtral_dir, smollm2_dir, tmp_path):
    """load_sharded gives every rank exactly its rows of the whole model (load_pretrained, cut as FSDP2
    cuts dim 0, the experts), parameters and stored buffers, as --load rank0 does, for Mixtral,
    Qwen3-MoE and DeepSeek-V3 folders; each rank reads the file tensors of its own experts, each
    whole and once, and no other rank's (5 experts on 3 ranks: 2, 2, 1; 4 on 3: 2, 2, 0). Files
    holding the fused in-memory layout load too."""
    dirs = {moe_folder(f, tmp_path / f, smollm2_dir, experts): experts for f in EXPERTS_OPTION}
    dirs.update({saved_fused(mixtral_dir, tmp_path / "fused"): 0} if world == 2 else {mixtral_dir: 4})
    torchrun(world, str(REPO / "tests" / "load_worker.py"), str(tmp_path), *map(str, dirs))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for model_dir, count in dirs.items():
        tensors = load_tensors(model_dir)
        per_expert = {k: int(m[1]) for k in tensors if (m := re.search(r"\.experts\.(\d+)\.", k))}
        assert len(set(per_expert.values())) == count
        ends = torch.tensor([0, *row_counts(count, world)]).cumsum(0).tolist()
        for rank, report in enumerate(reports):
            mine = sorted(k for k, e in per_expert.items() if ends[rank] <= e < ends[rank + 1])
            result = report[str(model_dir)]
            assert result["sharded"] == [] and result["rank0"] == [], (model_dir.name, rank, result)
            assert sorted(result["read"]) == mine, (model_dir.name, rank)
            assert [result["read"][k] for k in mine] == [tensors[k].nbytes for k in mine]


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
