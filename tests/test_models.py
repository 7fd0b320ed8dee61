"""End to end on tiny models of every supported family: quantize, check the weights, save, reload."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_FAMILIES, make_tiny_model
from safetensors.torch import load_file
from torch import nn

from gptq_fsdp.checkpoint import OutputDirError, save_quantized
from gptq_fsdp.config import GPTQConfig
from gptq_fsdp.data import build_calibration, load_texts
from gptq_fsdp.gptq import GPTQError
from gptq_fsdp.pipeline import quantize_model

GROUP = 32
QMIN, QMAX = -8, 7  # signed 4-bit


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def emma(austen) -> list[str]:
    return load_texts(str(austen / "emma.txt"))


@pytest.fixture(scope="module")
def calibration(emma, tokenizer):
    return build_calibration(emma, tokenizer, num_samples=4, max_seq_length=64, seed=0)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, smollm2_dir):
    """family -> saved tiny model directory, made on first use."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), smollm2_dir)
        return made[family]

    return get


def load_model(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def layer_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layer stack (all families here keep it under `.layers.N.`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def unpack_int4(packed: torch.Tensor, count: int, dim: int = 1) -> torch.Tensor:
    """Signed 4-bit values packed 8 per int32 along `dim`, low nibble first (independent decoder)."""
    if dim == 0:
        return unpack_int4(packed.T, count).T
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.reshape(packed.shape[0], -1)[:, :count] - 8).to(torch.int64)


def check_dequantized(name: str, weight: torch.Tensor, record, group: int | None) -> torch.Tensor:
    """Assert `weight` is exactly (q - z)·s for integer q in the 4-bit range; return q."""
    rows, cols = weight.shape
    size = group or cols
    assert record.scale.shape == (rows, cols // size), name
    assert record.zero_point.shape == (rows, cols // size), name
    assert record.g_idx is None, name
    scale = record.scale.float().repeat_interleave(size, dim=1)
    zero = record.zero_point.float().repeat_interleave(size, dim=1)
    assert (scale > 0).all(), name
    q = weight.float() / scale + zero
    assert (q - q.round()).abs().max() < 1e-4, f"{name}: weight/scale is not integral"
    q = q.round()
    assert q.min() >= QMIN and q.max() <= QMAX, f"{name}: outside the 4-bit range"
    torch.testing.assert_close(weight.float(), (q - zero) * scale, rtol=0, atol=1e-6)
    return q.to(torch.int64)


def quantize(directory: Path, calibration, **options):
    model = load_model(directory)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = GPTQConfig.from_options(batch_size=2, **options)
    result = quantize_model(model, calibration, config)
    return model, original, result


def logits(model: nn.Module, calibration) -> torch.Tensor:
    with torch.no_grad():
        ids, mask = calibration.batch([0, 1])
        return model(input_ids=ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------------------ every family


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def quantized(request, model_dirs, calibration, tokenizer, tmp_path_factory):
    family = request.param
    model, original, result = quantize(model_dirs(family), calibration, group_size=GROUP)
    out = tmp_path_factory.mktemp(f"quantized-{family}") / "checkpoint"
    assert save_quantized(model, out, result, tokenizer=tokenizer) == out
    return SimpleNamespace(
        family=family, source=model_dirs(family), model=model, original=original, result=result, out=out
    )


def test_every_layer_linear_quantized(quantized):
    model, result = quantized.model, quantized.result
    linears = layer_linears(model)
    assert len(linears) >= 4 * TINY_FAMILIES[quantized.family]["num_hidden_layers"]
    assert set(result.modules) == set(linears)
    changed = 0
    for name, module in linears.items():
        record = result.modules[name]
        assert name.split(".layers.")[1].split(".")[0] == str(record.layer)
        assert name in record.group
        check_dequantized(name, module.weight, record, GROUP)
        changed += not torch.equal(module.weight, quantized.original[f"{name}.weight"])
        assert record.loss >= 0 and record.loss == record.loss  # finite, not NaN
    assert changed == len(linears), "some weights were left as they were"


def test_everything_else_untouched(quantized):
    model, original = quantized.model, quantized.original
    assert "lm_head" not in quantized.result.modules
    quantized_weights = {f"{n}.weight" for n in quantized.result.modules}
    state = model.state_dict()
    assert set(state) == set(original)
    for key, value in state.items():
        if key not in quantized_weights:
            assert torch.equal(value, original[key]), f"{key} changed"
    assert torch.equal(model.get_output_embeddings().weight, original["lm_head.weight"])
    assert model.training is False


def test_checkpoint_reloads_with_same_logits(quantized, calibration):
    reloaded = load_model(quantized.out)
    expected = logits(quantized.model, calibration)
    torch.testing.assert_close(logits(reloaded, calibration), expected, rtol=0, atol=1e-5)
    # The quantization really changed the model: the original's logits differ.
    assert not torch.allclose(logits(load_model(quantized.source), calibration), expected, atol=1e-4)


def test_checkpoint_config(quantized):
    config = json.loads((quantized.out / "config.json").read_text())
    assert config["model_type"] == TINY_FAMILIES[quantized.family]["model_type"]
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert "lm_head" in qc["ignore"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["format"] == "pack-quantized"
    weights = group["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == GROUP
    assert weights["strategy"] == "group" and weights["symmetric"] is True and weights["type"] == "int"
    assert group["input_activations"] is None
    assert (quantized.out / "tokenizer.json").exists()
    assert not list(quantized.out.parent.glob(".checkpoint*")), "temporary directory left behind"


def test_checkpoint_tensors(quantized):
    tensors = load_tensors(quantized.out)
    for name, module in layer_linears(quantized.model).items():
        rows, cols = module.weight.shape
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.weight_packed"]
        scale = tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8), name
        assert scale.shape == (rows, cols // GROUP), name
        assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
        assert f"{name}.weight_zero_point" not in tensors  # symmetric
        assert f"{name}.weight_g_idx" not in tensors
        torch.testing.assert_close(scale, quantized.result.modules[name].scale, rtol=0, atol=0)
        # The packed integers times the scale give back exactly the in-memory weight.
        q = unpack_int4(packed, cols)
        assert q.min() >= QMIN and q.max() <= QMAX
        dequantized = q.float() * scale.float().repeat_interleave(GROUP, dim=1)
        torch.testing.assert_close(dequantized, module.weight.float(), rtol=0, atol=1e-6)
        if module.bias is not None:
            torch.testing.assert_close(tensors[f"{name}.bias"], quantized.original[f"{name}.bias"], rtol=0, atol=0)
    lm_head = quantized.model.get_output_embeddings()
    if not quantized.model.config.tie_word_embeddings:
        assert not any(k.startswith("lm_head.weight_") for k in tensors)
        torch.testing.assert_close(tensors["lm_head.weight"], lm_head.weight, rtol=0, atol=0)
