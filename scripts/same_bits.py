"""Proof that a change left the results alone: the SHA-256 of every tensor the tool writes for the
demo's checkpoint (SmolLM2-135M, W4A16 group 64, FSDP2 on 2 ranks, as scripts/demo.sh) and for a
tiny model of every family in scripts/sweep_families.py (one process, FSDP2, ZeRO-3, both orders),
recorded before the change and compared after it. Same machine and threads (1 per rank) both
times: GPTQ's levels follow the CPU kernels' last bits, so digests from another CPU differ.

    .venv/bin/python scripts/same_bits.py record before.json     # on the old commit (~17 min)
    .venv/bin/python scripts/same_bits.py check before.json      # on the new one: exit 1 on any difference
    .venv/bin/python scripts/same_bits.py record part.json llama demo   # only these (families, "demo")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from sweep_families import AUSTEN, ENV, FAMILIES, LAUNCH, RUNS, TINY_FAMILIES, make_tiny_model, quantize  # noqa: E402


def digests(checkpoint: Path) -> dict[str, str]:
    """tensor name -> SHA-256 of its bytes, over every safetensors file of the folder."""
    found = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                raw = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8)  # any dtype, as stored
                found[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return found


def demo(root: Path, smollm2: Path) -> dict[str, str]:
    output = root / "demo"
    command = [
        *LAUNCH["2 ranks"], "quantize", str(smollm2), "--dataset", str(AUSTEN / "emma.txt"), "--num-samples", "64",
        "--max-seq-length", "512", "--group-size", "64", "--actorder", "static", "--threads", "1",
        "--output", str(output),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=ENV)
    return digests(output)


def families(names: list[str], root: Path, tokenizer_dir: Path) -> dict[str, dict[str, str]]:
    results = {}
    for family in names:
        TINY_FAMILIES.setdefault(family, FAMILIES[family])
        model_dir = make_tiny_model(family, root / family / "model", tokenizer_dir)
        for name, (launcher, extra, _) in RUNS.items():
            output = root / family / name
            error = quantize(model_dir, output, launcher, extra)
            results[f"{family}/{name}"] = {"error": error} if error else digests(output)
        print(f"{family}: done", file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("file", type=Path)
    parser.add_argument("only", nargs="*", help="'demo' and family names (default: all of them)")
    args = parser.parse_args()
    names = args.only or ["demo", *FAMILIES]
    if unknown := set(names) - {"demo", *FAMILIES}:
        parser.error(f"unknown {sorted(unknown)}: choose from demo, {', '.join(FAMILIES)}")
    from prepare_smollm2 import prepare

    smollm2 = prepare()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        found = {"demo": demo(root, smollm2)} if "demo" in names else {}
        found |= families([n for n in names if n != "demo"], root, smollm2)
    if args.mode == "record":
        args.file.write_text(json.dumps(found, indent=1, sort_keys=True))
        print(f"recorded {len(found)} checkpoints to {args.file}")
        return 0
    expected = json.loads(args.file.read_text())
    compared = found.keys() if args.only else expected.keys() | found.keys()
    differ = [name for name in sorted(compared) if expected.get(name) != found.get(name)]
    for name in differ:
        old, new = expected.get(name, {}), found.get(name, {})
        tensors = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        print(f"{name}: {len(tensors)} tensors differ, e.g. {tensors[:3]}")
    print(f"{len(found) - len(differ)} of {len(found)} checkpoints bit-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
