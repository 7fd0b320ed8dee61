"""Quantize a tiny random model of many transformers families through the CLI, in one process and
sharded, and check that every run reloads and that the sharded runs equal the one-process ones.

Slower than the test suite (13.5 min for 21 families on 2 CPU cores), so not part of CI; the
README's support matrix and its Falcon limit come from it. Each family is quantized five ways: one
process, FSDP2, ZeRO-3 and FSDP2 true-sequential on 2 ranks (gloo), and true-sequential in one
process; each checkpoint is reloaded through transformers + compressed-tensors and its tensors are
compared with the one-process run of the same order. Files whose layout transformers converts while
loading (fused MoE experts) are loaded sharded with --load rank0, as the CLI's refusal says.

    .venv/bin/python scripts/sweep_families.py [FAMILY ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import AUSTEN, TINY_FAMILIES, make_tiny_model  # noqa: E402  (the tests' tiny families)

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MORE_FAMILIES = {
    "gemma2": dict(model_type="gemma2", head_dim=16, **_BASE),
    "olmo2": dict(model_type="olmo2", **_BASE),
    "granite": dict(model_type="granite", **_BASE),
    "starcoder2": dict(model_type="starcoder2", **_BASE),
    "qwen3_moe": dict(
        model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, **_BASE
    ),
    "cohere": dict(model_type="cohere", **_BASE),
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "stablelm": dict(model_type="stablelm", **_BASE),
    "falcon": dict(
        model_type="falcon",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
    ),  # fmt: skip
    "gptj": dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4),
    "glm4": dict(model_type="glm4", head_dim=16, pad_token_id=0, **_BASE),
}
FAMILIES = {**TINY_FAMILIES, **MORE_FAMILIES}
LAUNCH = {
    "one process": [sys.executable, "-m", "gptq_fsdp"],
    "2 ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptq_fsdp"],
}
# run name: (launcher, extra options, the one-process run it must equal)
RUNS = {
    "single": ("one process", [], None),
    "fsdp2": ("2 ranks", [], "single"),
    "zero3": ("2 ranks", ["--backend", "zero3"], "single"),
    "single_ts": ("one process", ["--true-sequential"], None),
    "fsdp2_ts": ("2 ranks", ["--true-sequential"], "single_ts"),
}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def quantize(model_dir: Path, output: Path, launcher: str, extra: list[str]) -> str | None:
    """Run the CLI; None if it succeeded, else its last error line."""
    command = [
        *LAUNCH[launcher], "quantize", str(model_dir), "--dataset", str(AUSTEN / "emma.txt"), "--num-samples", "4",
        "--max-seq-length", "32", "--group-size", "16", "--batch-size", "2", "--output", str(output), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    if done.returncode != 0 and "--load rank0" in done.stderr:
        done = subprocess.run([*command, "--load", "rank0"], capture_output=True, text=True, env=ENV)
    if done.returncode == 0:
        return None
    return ([line for line in done.stderr.splitlines() if "rror" in line] or [f"exit code {done.returncode}"])[-1]


def reloaded_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model(torch.arange(8)[None])  # the first forward decompresses
    return model.state_dict()


def sweep(family: str, root: Path, tokenizer_dir: Path) -> list[str]:
    """The family's problems, if any (a failed run, a failed reload, a sharded run that differs)."""
    TINY_FAMILIES.setdefault(family, FAMILIES[family])  # make_tiny_model reads the tests' dict
    model_dir = make_tiny_model(family, root / "model", tokenizer_dir)
    problems, tensors = [], {}
    for name, (launcher, extra, reference) in RUNS.items():
        error = quantize(model_dir, root / name, launcher, extra)
        if error is not None:
            problems.append(f"{name}: {error}")
            continue
        try:
            tensors[name] = reloaded_tensors(root / name)
        except Exception as exc:  # noqa: BLE001  (any reload failure is the finding)
            problems.append(f"{name} does not reload: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if reference in tensors:
            mine, theirs = tensors[name], tensors[reference]
            differ = sorted(k for k in theirs if k not in mine or not torch.equal(mine[k], theirs[k]))
            if differ or mine.keys() != theirs.keys():
                problems.append(f"{name} != {reference}: {differ[:3]}")
    return problems


def main() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from prepare_smollm2 import prepare

    tokenizer_dir = prepare()  # the tiny models borrow SmolLM2's tokenizer
    failed = 0
    for family in sys.argv[1:] or FAMILIES:
        with tempfile.TemporaryDirectory() as root:
            problems = sweep(family, Path(root), tokenizer_dir)
        failed += bool(problems)
        print(f"{family:<14} {'ok: ' + ', '.join(RUNS) if not problems else '; '.join(problems)}", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
