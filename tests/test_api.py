"""The one-call API on every model form it accepts, the Trainer callback, and clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sharded_helpers import ENV, REPO, dequantized, rank_threads, torchrun
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import gptq_fsdp
from gptq_fsdp.distributed import UnsupportedModelError


def assert_same_as_reference(checkpoint, reference):
    """Bit for bit: `reference` ran the same batches of 2 at the ranks' thread count (conftest)."""
    _, weights = dequantized(checkpoint)
    _, expected = reference[12]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.slow  # builds the one-process reference (two runs)
def test_plain_model_in_one_call(tiny_llama_dir, austen, tmp_path, reference):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = gptq_fsdp.GPTQConfig.from_options(group_size=32, batch_size=2, num_samples=12, max_seq_length=32)
    with rank_threads():
        result = gptq_fsdp.quantize(model, str(austen / "emma.txt"), config, tokenizer=tokenizer)
    assert result.backend.name == "single" and len(result.modules) == 14
    gptq_fsdp.save_quantized(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert_same_as_reference(tmp_path / "ckpt", reference)
    # The model stays usable and holds the quantized weights.
    reloaded, _ = dequantized(tmp_path / "ckpt")
    ids = torch.arange(10)[None]
    assert torch.equal(model(ids).logits, reloaded(ids).logits)  # same weights, ids and threads


@pytest.mark.distributed
@pytest.mark.parametrize("form", ["fully_shard", "deepspeed"])
def test_sharded_forms_under_torchrun(form, tiny_llama_dir, austen, tmp_path, reference):
    done = torchrun(2, str(REPO / "tests" / "api_worker.py"), form, str(tiny_llama_dir), str(tmp_path / "ckpt"),
                    str(austen / "emma.txt"))  # fmt: skip
    assert f"backend={'fsdp2' if form == 'fully_shard' else 'zero3'} world=2" in done.stdout
    assert_same_as_reference(tmp_path / "ckpt", reference)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "form,config,backend",
    [("accelerate-deepspeed", "deepspeed_zero3_cpu.yaml", "zero3"), ("accelerate-fsdp-cpu", "fsdp2_cpu.yaml", "fsdp2")],
)
def test_accelerator_prepare_forms(form, config, backend, tiny_llama_dir, austen, tmp_path, reference):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
        str(REPO / "tests" / "api_worker.py"), form, str(tiny_llama_dir), str(tmp_path / "ckpt"),
        str(austen / "emma.txt"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert f"backend={backend} world=2" in done.stdout
    assert_same_as_reference(tmp_path / "ckpt", reference)


def test_unsupported_wrappers_are_clear_errors(tiny_llama_dir):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(UnsupportedModelError, match="keeps a full copy on every rank.*Supported: a plain model"):
        gptq_fsdp.quantize(nn.DataParallel(model), ["text"], tokenizer=object())
    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # the type is what matters
    with pytest.raises(UnsupportedModelError, match="FSDP1 .* not supported; use FSDP2"):
        gptq_fsdp.quantize(fsdp1, ["text"], tokenizer=object())


def test_save_before_quantize_is_an_error(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match="has not been quantized"):
        gptq_fsdp.save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_trainer_callback_checkpoint_reloads_with_the_same_logits(tiny_llama_dir, austen, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from gptq_fsdp.integrations import GPTQCallback

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    texts = gptq_fsdp.load_texts(str(austen / "emma.txt"))
    train = gptq_fsdp.build_calibration(texts, tokenizer, num_samples=4, max_seq_length=32)
    dataset = Dataset.from_dict({"input_ids": train.input_ids.tolist(), "labels": train.input_ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                             save_strategy="no", report_to=[], use_cpu=True)  # fmt: skip
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    config = gptq_fsdp.GPTQConfig.from_options(group_size=32, num_samples=4, max_seq_length=32)
    callback = GPTQCallback(texts, tmp_path / "ckpt", config, tokenizer=tokenizer)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    assert callback.result is not None and len(callback.result.modules) == 14
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    reloaded, _ = dequantized(tmp_path / "ckpt")
    ids = train.input_ids[:1]
    assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)  # same weights, ids and threads


@pytest.mark.slow  # builds the one-process reference (two runs)
def test_cli_run_equals_the_api_reference(tiny_llama_dir, austen, tmp_path, reference):
    """The API forms above are compared with `reference`; this ties `reference` to the direct CLI run."""
    from gptq_fsdp.cli import main

    with rank_threads():
        main(["quantize", str(tiny_llama_dir), "--dataset", str(austen / "emma.txt"), "--output",
              str(tmp_path / "cli"), "--num-samples", "12", "--max-seq-length", "32", "--batch-size", "2",
              "--group-size", "32"])  # fmt: skip
    assert_same_as_reference(tmp_path / "cli", reference)
