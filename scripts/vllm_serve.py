"""Serve checkpoints with vLLM's CPU build (offline `LLM` API) and write what it computes.

Runs in the vLLM virtual env (`scripts/setup_vllm.sh`; vLLM pins its own torch, transformers and
compressed-tensors), called by `scripts/vllm_check.py`, which compares the results with
transformers. For each checkpoint folder: the log-probability vLLM gives each token of the request's
token ids (prompt logprobs, bf16, in windows of `window` tokens, each window predicting its last
window-1 tokens as `gptq_fsdp.evaluate.perplexity` does), a greedy continuation of the first 32
tokens, and the linear kernels vLLM chose; or, where vLLM refuses the checkpoint, its error.

    VLLM_VENV/bin/python scripts/vllm_serve.py REQUEST.json RESULT.json

REQUEST.json: {"checkpoints": [DIR, ...], "ids": [int, ...], "window": int, "generate": int}.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import traceback

# One process: the engine core and its single worker run in this interpreter, which saves a spawned
# interpreter (and its imports) per engine and lets `kernels` look at the loaded model directly.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
# On CPUs with AMX vLLM runs 4-bit checkpoints as W4A8 by default (activations quantized to int8 on
# the fly; vLLM 0.32 kernels/linear/mixed_precision/cpu.py): the check serves what the checkpoint
# says, W4A16. Set VLLM_CPU_INT4_W4A8=1 to score vLLM's default on such CPUs.
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
KV_CACHE_BYTES = 256 << 20  # SmolLM2-135M: 30 layers x K,V x 3 heads x 64 x bf16 = 23 KiB/token, 11 windows of 1024
GREEDY_PROMPT = 32  # tokens of the request's ids the greedy continuation starts from


_DEQUANTIZED: dict = {}  # (weight, scales) storage addresses -> dequantized W [inputs, outputs]


def reference_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
    """x @ dequantized W from the layout vLLM's `CPUWNA16LinearKernel` prepares, for CPUs whose vLLM
    build lacks `cpu_gemm_wna16` (the AVX2 build, `_C_AVX2`, has no W4A16 GEMM). Only the GEMM is
    replaced: the checkpoint is still parsed, loaded and repacked by vLLM's own code, and the layout
    is undone with vLLM's own unpacking helper. Checked on vLLM 0.32.0 (kernels/linear/
    mixed_precision/cpu.py: `_process_gptq_weights_w4a16` blocks 16 output channels)."""
    key = (q_weight.data_ptr(), scales.data_ptr())
    if key not in _DEQUANTIZED:  # once per layer: the weights do not change while serving
        _DEQUANTIZED[key] = _dequantize(q_weight, scales, zeros, pack_factor).to(input.dtype)
    weight = _DEQUANTIZED[key]
    out = input.reshape(-1, weight.shape[0]).float() @ weight.float()
    if bias is not None:
        out += bias.float()
    return out.to(input.dtype).reshape(*input.shape[:-1], weight.shape[1])


def _dequantize(q_weight, scales, zeros, pack_factor):
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    uint4 = scalar_types.uint4
    groups, outputs = scales.shape
    inputs = q_weight.shape[1] * pack_factor // 16
    packed = q_weight.view(outputs // 16, inputs, 16 // pack_factor).permute(1, 0, 2).reshape(inputs, -1)
    levels = unpack_quantized_values_into_int32(packed, uint4, 1)  # [inputs, outputs], 0..15
    per_group = inputs // groups
    if zeros is None:  # uint4b8: the zero point is 8
        levels = levels - 8
    else:
        levels = levels - unpack_quantized_values_into_int32(zeros, uint4, 1).repeat_interleave(per_group, 0)
    return levels.float() * scales.float().repeat_interleave(per_group, 0)


def supply_missing_kernels() -> str | None:
    """Put `reference_gemm_wna16` in place of vLLM's W4A16 CPU GEMM when this build lacks it; say so."""
    import torch
    from vllm import _custom_ops

    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    _custom_ops.cpu_gemm_wna16 = reference_gemm_wna16
    return "cpu_gemm_wna16 is missing from this CPU's vLLM build: the W4A16 GEMM is the reference one"


def kernels(llm) -> list[str]:
    """The linear kernels (or, unquantized, the linear methods) of the loaded model's layers."""

    def names(model) -> list[str]:
        found = set()
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            scheme = getattr(module, "scheme", None)
            kernel = getattr(scheme, "kernel", None)
            if kernel is not None:
                found.add(f"{type(scheme).__name__}/{type(kernel).__name__}")
            elif scheme is not None:
                found.add(type(scheme).__name__)
            elif method is not None and "Linear" in type(method).__name__:
                found.add(type(method).__name__)
        return sorted(found)

    return sorted({name for worker in llm.apply_model(names) for name in worker})


def serve(checkpoint: str, ids: list[int], window: int, generate: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=checkpoint,
        dtype="bfloat16",
        max_model_len=max(window + 1, GREEDY_PROMPT + generate),  # +1: the one token each window samples
        max_num_batched_tokens=max(window + 1, GREEDY_PROMPT + generate),  # the start-up profile runs this many
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,  # on the CPU backend the default takes most of host memory
        max_num_seqs=4,  # the start-up warm-up samples this many sequences over the whole vocabulary
        seed=0,
    )
    try:
        windows = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]
        prompts = [{"prompt_token_ids": w} for w in windows]
        outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        logprobs = [
            step[token].logprob
            for window_ids, output in zip(windows, outputs, strict=True)
            for token, step in zip(window_ids[1:], output.prompt_logprobs[1:], strict=True)
        ]
        greedy = SamplingParams(max_tokens=generate, temperature=0.0, ignore_eos=True)
        continuation = llm.generate([{"prompt_token_ids": ids[:GREEDY_PROMPT]}], greedy, use_tqdm=False)
        return {
            "token_logprobs": logprobs,
            "greedy_prompt": GREEDY_PROMPT,
            "greedy_ids": list(continuation[0].outputs[0].token_ids),
            "kernels": kernels(llm),
        }
    finally:
        del llm
        _DEQUANTIZED.clear()  # the next model's weights may reuse these addresses
        gc.collect()


def main() -> None:
    request_path, result_path = sys.argv[1:]
    with open(request_path) as f:
        request = json.load(f)
    import vllm

    result = {"vllm": vllm.__version__, "note": supply_missing_kernels(), "checkpoints": {}}
    for checkpoint in request["checkpoints"]:
        try:
            served = serve(checkpoint, request["ids"], request["window"], request["generate"])
        except Exception as error:  # vLLM's refusal is a result too: the caller asserts it precisely
            lines = [line for line in traceback.format_exception_only(error) if line.strip()]
            served = {"error": re.sub(r"\s+", " ", " ".join(lines)).strip()}
        result["checkpoints"][checkpoint] = served
        print(json.dumps({checkpoint: {k: v for k, v in served.items() if k != "token_logprobs"}}), flush=True)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main()
