"""CUDA and NCCL paths, run on a GPU machine by scripts/gpu_checks.sh (not collected without a GPU).

The CPU suite checks the same behaviour on the CPU; these check what only a GPU shows: 16-bit XᵀX
through the tensor cores, host syncs, GPTQ on CUDA, a bf16 model end to end, FSDP2 over NCCL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq_fsdp import GPTQConfig, build_calibration, quantize_model, save_quantized
from gptq_fsdp.core.gptq import gptq_quantize
from gptq_fsdp.core.hessian import HessianGroup, unpack_symmetric

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")


class OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def cuda_syncs(fn) -> int:
    """How many times `fn()` makes the host wait for the GPU (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_xtx_goes_through_the_tensor_cores_exactly(dtype):
    """Products of 16-bit numbers are exact in fp32; what is left is fp32 accumulation, within the
    classic recursive-summation bound n·u·(|X|ᵀ|X|) (doubled: tensor cores may truncate, not round)."""
    x = torch.randn(2048, 6144, device=CUDA).to(dtype)  # 6144 columns: two symmetric blocks on CUDA
    group = HessianGroup(["w"], 6144, CUDA)
    with OpNames() as ops:
        group.add(x)
    group.add(x[:1000])
    assert any(n.startswith("aten.mm.dtype") for n in ops.names), ops.names
    assert not any(n.startswith("aten._to_copy") for n in ops.names), "16-bit input was up-cast"
    xd = torch.cat([x, x[:1000]]).double()
    bound = 2 * 2048 * 2.0**-24 * (xd.abs().T @ xd.abs())
    error = (unpack_symmetric(group.sum, 6144, torch.float64) - xd.T @ xd).abs()
    print(f"{dtype}: max |error| / bound {(error / bound).max().item():.3f}")
    assert (error <= bound).all()
    assert group.tokens == 3048


def test_xtx_accumulation_never_syncs():
    group = HessianGroup(["w"], 6144, CUDA)
    x = torch.randn(1024, 6144, device=CUDA).bfloat16()
    assert cuda_syncs(lambda: torch.ones(1, device=CUDA).item()) == 1  # the detector sees a sync
    assert cuda_syncs(lambda: group.add(x)) == 0


@pytest.mark.parametrize("actorder", [None, "static"])
def test_gptq_syncs_do_not_grow_with_columns(actorder):
    quant = QuantizationArgs(num_bits=4, strategy="group", group_size=128, actorder=actorder)
    counts = []
    for cols in (512, 2048):
        x = torch.randn(4096, cols, device=CUDA)
        weight, hessian = torch.randn(256, cols, device=CUDA), x.T @ x / 4096
        gptq_quantize(weight, hessian, quant)  # warm-up (cuSOLVER handles, allocator)
        counts.append(cuda_syncs(lambda w=weight, h=hessian: gptq_quantize(w, h, quant)))
    print(f"host syncs per gptq_quantize ({actorder}), 512 and 2048 columns: {counts}")
    if actorder == "static":  # scales up front: the syncs are all outside the column loop
        assert counts[0] == counts[1], counts
    else:  # scales on entry to each group: compressed-tensors' calculate_qparams copies a scalar
        # (torch.tensor(eps, device=...)) to the GPU, one sync per group and none per column
        assert 0 < counts[1] - counts[0] <= 2048 // 128 - 512 // 128, counts


def test_gptq_on_cuda_matches_cpu():
    torch.manual_seed(0)
    mix = torch.randn(1024, 1024) / 32
    x = torch.randn(4096, 1024) @ mix
    weight, hessian = (torch.randn(512, 1024) * 0.02).bfloat16(), x.T @ x / 4096
    quant = QuantizationArgs(num_bits=4, strategy="group", group_size=128, actorder="static")
    on_cpu = gptq_quantize(weight, hessian, quant)
    on_cuda = gptq_quantize(weight.to(CUDA), hessian.to(CUDA), quant)
    same = (on_cuda.weight.cpu() == on_cpu.weight).float().mean().item()
    assert same >= 0.999, same  # cuSOLVER vs LAPACK rounding may move a rare element by one level
    torch.testing.assert_close(on_cuda.scale.cpu(), on_cpu.scale)  # static scales: from W alone


@pytest.fixture(scope="module")
def tokenizer_dir(request) -> Path:
    path = os.environ.get("GPTQ_FSDP_TOKENIZER")
    return Path(path) if path else request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A small random bf16 Llama (SmolLM2's tokenizer) saved to disk."""
    directory = tmp_path_factory.mktemp("bf16-llama")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def quantize_on_one_gpu(model_dir: Path, text: Path, output: Path, **options):
    """(checkpoint, logits of the quantized model in memory, input ids) from one process on CUDA."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = build_calibration([text.read_text()], tokenizer, num_samples=8, max_seq_length=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(CUDA)
    result = quantize_model(model, calibration, GPTQConfig.from_options(group_size=64, batch_size=4, **options))
    assert all(r.loss > 0 for r in result.modules.values())
    ids = calibration.input_ids[:2].to(CUDA)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return save_quantized(model, output, result, tokenizer=tokenizer), logits, ids


@pytest.fixture(scope="module")
def single_gpu_checkpoint(bf16_llama, austen, tmp_path_factory):
    return quantize_on_one_gpu(bf16_llama, austen / "emma.txt", tmp_path_factory.mktemp("single") / "ckpt")


def dequantized_weights(checkpoint: Path) -> tuple[AutoModelForCausalLM, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint).to(CUDA)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=CUDA))  # the first forward decompresses
    return model, {k: v for k, v in model.state_dict().items() if k.endswith("proj.weight")}


def test_bf16_model_on_cuda_reloads_to_the_same_logits(single_gpu_checkpoint):
    checkpoint, logits, ids = single_gpu_checkpoint
    model, _ = dequantized_weights(checkpoint)
    with torch.no_grad():
        reloaded = model(input_ids=ids).logits
    assert reloaded.dtype == torch.bfloat16
    torch.testing.assert_close(reloaded, logits, atol=0, rtol=0)


@pytest.mark.parametrize("order", ["standard", "true-sequential"])
def test_fsdp2_over_nccl_equals_one_process(order, single_gpu_checkpoint, bf16_llama, austen, tmp_path):
    """True-sequential also runs each batch's forward in a thread of its own, CUDA graphs and NCCL inside."""
    output = tmp_path / "fsdp2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    args = [str(REPO / "tests" / "gpu" / "cuda_worker.py"), str(bf16_llama), str(austen / "emma.txt"), str(output)]
    done = subprocess.run(
        [*command, *args, order], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    if order == "standard":
        expected = single_gpu_checkpoint[0]
    else:
        expected, logits, ids = quantize_on_one_gpu(
            bf16_llama, austen / "emma.txt", tmp_path / "single", true_sequential=True
        )
        model, _ = dequantized_weights(expected)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=0, rtol=0)
    _, sharded = dequantized_weights(output)
    _, single = dequantized_weights(expected)
    assert sharded.keys() == single.keys() and len(single) == 3 * 7
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_offloaded_activations_give_the_same_checkpoint(single_gpu_checkpoint, bf16_llama, austen, tmp_path):
    """Activations kept in pinned host memory between layers, copied to the GPU per batch (non-blocking)."""
    tokenizer = AutoTokenizer.from_pretrained(bf16_llama)
    calibration = build_calibration([(austen / "emma.txt").read_text()], tokenizer, num_samples=8, max_seq_length=64)
    model = AutoModelForCausalLM.from_pretrained(bf16_llama, dtype=torch.bfloat16).to(CUDA)
    config = GPTQConfig.from_options(group_size=64, batch_size=4, offload_activations=True)
    result = quantize_model(model, calibration, config)
    assert result.memory.activation_bytes < 8 * 64 * 256 * 2 * 2  # at most a batch in and out, not all 8 samples
    _, offloaded = dequantized_weights(save_quantized(model, tmp_path / "ckpt", result, tokenizer=tokenizer))
    _, single = dequantized_weights(single_gpu_checkpoint[0])
    assert all(torch.equal(offloaded[k], single[k]) for k in single)


@pytest.mark.parametrize("strategy,columns", [("group", 1024), ("group", 1088), ("channel", 1088)])
def test_cuda_graph_column_loop_equals_eager(strategy, columns):
    """Static scales: the column loop replayed as a CUDA graph gives the eager result bit for bit
    (1088 columns: the last, partial block runs eagerly)."""
    torch.manual_seed(0)
    x = torch.randn(4096, columns, device=CUDA) @ (torch.randn(columns, columns, device=CUDA) / columns**0.5)
    weight, hessian = (torch.randn(512, columns, device=CUDA) * 0.02).bfloat16(), x.T @ x / 4096
    group_size = 64 if strategy == "group" else None
    quant = QuantizationArgs(num_bits=4, strategy=strategy, group_size=group_size, actorder="static")
    graphed = gptq_quantize(weight, hessian, quant)
    eager = gptq_quantize(weight, hessian, quant, cuda_graph=False)
    assert torch.equal(graphed.weight, eager.weight)
    assert torch.equal(graphed.scale, eager.scale)
    assert torch.equal(graphed.row_losses, eager.row_losses)
