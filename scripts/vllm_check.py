"""Serve checkpoints with vLLM (CPU) and check that it computes what transformers computes.

For each checkpoint folder: the log-probability of every token of a held-out text, from vLLM's
prompt logprobs (bf16; `scripts/vllm_serve.py` in vLLM's own venv, built by `scripts/setup_vllm.sh`)
and from transformers' reload of the same folder in our venv, in fp32 and in bf16; the perplexities;
a greedy continuation from each; the kernels vLLM chose. A checkpoint passes when vLLM's
log-perplexity is within `margin` of transformers' fp32 one (see `margin` for how it is derived);
otherwise, or when vLLM refuses the checkpoint, the exit status is 1.

    .venv/bin/python scripts/vllm_check.py OUT_DIR [OUT_DIR ...] --text persuasion.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GPTQ_FSDP_CACHE", Path.home() / ".cache" / "gptq_fsdp"))
VLLM_VENV = Path(os.environ.get("GPTQ_FSDP_VLLM_VENV", CACHE / "vllm-venv"))
SERVE = REPO / "scripts" / "vllm_serve.py"


@dataclass
class Comparison:
    """One checkpoint: vLLM against transformers on the same tokens (log-perplexities in nats)."""

    checkpoint: str
    vllm_ppl: float
    fp32_ppl: float
    bf16_ppl: float
    margin: float  # on |log vllm_ppl - log fp32_ppl|
    greedy_agree: int  # leading greedy tokens vLLM and transformers (fp32) agree on
    kernels: list[str]

    @property
    def passed(self) -> bool:
        return abs(math.log(self.vllm_ppl) - math.log(self.fp32_ppl)) <= self.margin


def margin(fp32: torch.Tensor, bf16: torch.Tensor) -> float:
    """How far a correct bf16 server's log-perplexity may lie from the fp32 one, derived from
    transformers' own bf16 run of the same checkpoint on the same tokens (per-token log-probs `bf16`,
    `fp32`; n of them).

    A bf16 run's mean log-prob differs from the fp32 one by a systematic part (where the roundings
    lean) plus the average of n per-token deviations. vLLM and transformers in bf16 round the same
    operations in another order, so take their systematic parts as equal: transformers' run measures
    it, |mean(e)| with e = bf16 - fp32, and the spread of e, sd(e). The difference of two such
    averages with independent per-token deviations has standard deviation sqrt(2) sd(e)/sqrt(n); 4 of
    them are exceeded with probability 6e-5 (normal tail). The tokens count as independent because
    the means of 1023-token windows spread about as sd(e)/sqrt(1023) predicts (docs/serving.md).
    The margin, on |log ppl_vLLM - log ppl_fp32|: |mean(e)| + 4 sqrt(2) sd(e) / sqrt(n)."""
    deviation = (bf16 - fp32).double()
    return deviation.mean().abs().item() + 4 * math.sqrt(2) * deviation.std().item() / math.sqrt(deviation.numel())


def transformers_reload(checkpoint: Path, dtype: torch.dtype):
    """The checkpoint through transformers + compressed-tensors, dequantized to `dtype` (the default
    compressed load refuses asymmetric files: a compressed-tensors 0.20 bug, test_models' xfail)."""
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    quantized = hasattr(AutoConfig.from_pretrained(checkpoint), "quantization_config")
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **options).eval()


def transformers_greedy(model, prompt: list[int], generate: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=generate, min_new_tokens=generate, do_sample=False)
    return out[0, len(prompt) :].tolist()


def serve_with_vllm(checkpoints: list[Path], ids: list[int], window: int, generate: int) -> dict:
    """Run `vllm_serve.py` in vLLM's venv on every checkpoint (one interpreter); its result JSON."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"no vLLM venv at {VLLM_VENV}: run scripts/setup_vllm.sh (or set GPTQ_FSDP_VLLM_VENV)")
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        names = [str(c) for c in checkpoints]
        request.write_text(json.dumps({"checkpoints": names, "ids": ids, "window": window, "generate": generate}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        subprocess.run([str(python), str(SERVE), str(request), str(result)], check=True, env=env)
        return json.loads(result.read_text())


def compare(checkpoint: Path, served: dict, ids: torch.Tensor, window: int) -> Comparison:
    from gptq_fsdp.evaluate import token_logprobs

    model = transformers_reload(checkpoint, torch.float32)
    fp32 = token_logprobs(model, ids, window)
    bf16 = token_logprobs(transformers_reload(checkpoint, torch.bfloat16), ids, window)
    vllm = torch.tensor(served["token_logprobs"], dtype=torch.float64)
    if vllm.shape != fp32.shape:
        raise ValueError(f"vLLM scored {vllm.numel()} tokens of {checkpoint}, transformers {fp32.numel()}")
    greedy = transformers_greedy(model, ids[0, : served["greedy_prompt"]].tolist(), len(served["greedy_ids"]))
    agree = next((i for i, (a, b) in enumerate(zip(greedy, served["greedy_ids"], strict=True)) if a != b), len(greedy))
    return Comparison(
        checkpoint=str(checkpoint),
        vllm_ppl=math.exp(-vllm.mean().item()),
        fp32_ppl=math.exp(-fp32.mean().item()),
        bf16_ppl=math.exp(-bf16.mean().item()),
        margin=margin(fp32, bf16),
        greedy_agree=agree,
        kernels=served["kernels"],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="held-out text file (UTF-8)")
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--generate", type=int, default=16, help="greedy tokens to compare")
    parser.add_argument("--json", type=Path, help="write the comparisons here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from gptq_fsdp.evaluate import text_tokens

    ids = text_tokens(AutoTokenizer.from_pretrained(args.checkpoints[0]), args.text, args.tokens)
    served = serve_with_vllm(args.checkpoints, ids[0].tolist(), args.window, args.generate)
    print(f"vLLM {served['vllm']}" + (f" ({served['note']})" if served["note"] else ""))
    failed = 0
    rows = []
    for checkpoint in args.checkpoints:
        result = served["checkpoints"][str(checkpoint)]
        if "error" in result:
            print(f"{checkpoint}: vLLM refused it: {result['error']}")
            failed += 1
            continue
        c = compare(checkpoint, result, ids, args.window)
        rows.append(c)
        failed += not c.passed
        print(
            f"{checkpoint}: perplexity vLLM {c.vllm_ppl:.4f}, transformers fp32 {c.fp32_ppl:.4f} "
            f"(bf16 {c.bf16_ppl:.4f}); |log ratio| {abs(math.log(c.vllm_ppl / c.fp32_ppl)):.5f}, margin "
            f"{c.margin:.5f}: {'PASS' if c.passed else 'FAIL'}; greedy agrees on {c.greedy_agree}/{args.generate} "
            f"tokens; {', '.join(c.kernels)}"
        )
    if args.json:
        report = {"vllm": served["vllm"], "note": served["note"], "results": [vars(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
