"""`gptq-fsdp quantize` end to end on a tiny model, and bad options failing early with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from sharded_helpers import dequantized, rank_threads, single_process
from transformers import AutoModelForCausalLM

from gptq_fsdp import GPTQConfig
from gptq_fsdp.cli import build_parser, main
from gptq_fsdp.cli.common import config_from_args
from gptq_fsdp.core.scheme import OBSERVER_DEFAULTS


def quantize_args(model_dir, output, austen, *extra: str) -> list[str]:
    return [
        "quantize", str(model_dir), "--dataset", str(austen / "emma.txt"), "--output", str(output),
        "--num-samples", "4", "--max-seq-length", "32", "--batch-size", "2", "--group-size", "32", *extra,
    ]  # fmt: skip


def test_quantize_end_to_end(tiny_llama_dir, austen, tmp_path, capsys):
    output = tmp_path / "quantized"
    with rank_threads():
        main(quantize_args(tiny_llama_dir, output, austen, "--actorder", "static"))
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "quantized 14 modules" in printed
    log = (output / "gptq_fsdp_log.txt").read_text()
    assert "model.layers.0.self_attn.q_proj" in log and "total wall time" in log

    qconfig = json.loads((output / "config.json").read_text())["quantization_config"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (qconfig["format"], weights["num_bits"], weights["group_size"], weights["actorder"]) == (
        "pack-quantized", 4, 32, "static",
    )  # fmt: skip
    assert qconfig["ignore"] == ["lm_head"]
    # The reloaded weights are the API's one-process result for these settings (same batches and
    # threads: bit for bit), and quantized ones: every decoder Linear moved off its original weight.
    reloaded, weights = dequantized(output)
    _, expected = dequantized(single_process(tiny_llama_dir, tmp_path / "api", austen / "emma.txt", 4))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert len(weights) == 14 and all(not torch.equal(w, original[k]) for k, w in weights.items())


@pytest.mark.distributed
def test_module_entry_point_runs(tiny_llama_dir, austen, tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = quantize_args(
        tiny_llama_dir, output, austen, "--bits", "8", "--group-size", "0", "--threads", "1",
        "--matmul-precision", "medium", "--true-sequential",
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "gptq_fsdp", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    weights = json.loads((output / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["num_bits"] == 8 and weights["weights"]["strategy"] == "channel"
    assert "activations MiB" in done.stdout, "the memory report lists the activations on the device"


BAD_OPTIONS = [
    (["--group-size", "48"], "group_size 48 does not divide its 64 input columns"),
    (["--scheme", "W9A16"], "unsupported scheme"),
    (["--actorder", "group"], "act-order 'group'"),
    (["--bits", "1"], "num_bits must be in 2..8"),
    (["--num-samples", "0"], "must be positive"),
    (["--num-samples", "100000"], "fewer than the 100000 asked"),
    (["--targets", "re:.*nothing.*"], "match no module"),
    (["--ignore"], "target outside the decoder layers"),  # lm_head becomes a target
    (["--backend", "fsdp2"], "needs several processes"),
    (["--matmul-precision", "low"], "matmul_precision must be one of"),  # FSDP2 asked for, but no launcher
    (["--offload-activations", "--true-sequential"], "offloading would save nothing: use one of the two"),
    (["--scale-search", "imatrix"], "invalid choice: 'imatrix'"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS)
def test_bad_options_fail_clearly_and_write_nothing(
    tiny_llama_dir, austen, tmp_path, capsys, weights_never_read, extra, message
):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(quantize_args(tiny_llama_dir, output, austen, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing may be written on a bad option"


@pytest.mark.parametrize("choice,observer", [("minmax", "minmax"), ("mse", "mse"), ("imatrix-mse", "imatrix_mse")])
def test_scale_search_option(tiny_llama_dir, austen, tmp_path, choice, observer):
    args = build_parser().parse_args(quantize_args(tiny_llama_dir, tmp_path / "out", austen, "--scale-search", choice))
    config = config_from_args(args)
    assert config.scale_search == observer == config.weights.observer
    assert config.weights.observer_kwargs == OBSERVER_DEFAULTS.get(observer, {})
    default = config_from_args(build_parser().parse_args(quantize_args(tiny_llama_dir, tmp_path, austen)))
    assert default.scale_search == "imatrix_mse" == GPTQConfig.from_options().scale_search  # the CLI's and the API's


def test_world_size_without_a_launcher(tiny_llama_dir, austen, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(quantize_args(tiny_llama_dir, tmp_path / "out", austen))
    assert exit_info.value.code == 2
    assert "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_not_a_causal_lm_and_missing_tokenizer(tiny_llama_dir, austen, tmp_path, capsys):
    import shutil

    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    with pytest.raises(SystemExit):
        main(quantize_args(vit, tmp_path / "out", austen))
    assert "'vit' model, not a causal language model" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, bare / name)
    with pytest.raises(SystemExit):
        main(quantize_args(bare, tmp_path / "out", austen))
    assert "no usable tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_model_and_non_empty_output(tiny_llama_dir, austen, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(quantize_args(tmp_path / "no-model", tmp_path / "out", austen))
    assert "not a HF model folder" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(quantize_args(tiny_llama_dir, occupied, austen))
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    main(quantize_args(tiny_llama_dir, occupied, austen, "--overwrite"))
    assert (occupied / "config.json").exists() and not (occupied / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"], "no temporary directory may remain"
