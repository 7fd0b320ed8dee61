#!/usr/bin/env bash
# Create benchmarks/.venv-llmc with llm-compressor 0.14 for the peer benchmark.
# Idempotent: re-running reuses the venv and skips installs already satisfied.
# torch is installed first so that llmcompressor's torch dependency resolves to
# the local CPU wheel instead of pulling CUDA wheels.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${here}/.venv-llmc"
py="${venv}/bin/python"

if [ ! -x "${py}" ]; then
    python3 -m venv "${venv}"
fi

if ! "${py}" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
    "${py}" -m pip install --quiet "torch==2.13.0"
fi

if ! "${py}" -c "import importlib.metadata as m, sys; sys.exit(not m.version('llmcompressor').startswith('0.14.'))" 2>/dev/null; then
    "${py}" -m pip install --quiet "torch==2.13.0" "llmcompressor==0.14.*"
fi

"${py}" -c "import torch, llmcompressor, transformers, compressed_tensors as ct; print('torch', torch.__version__, '| llmcompressor', llmcompressor.__version__, '| transformers', transformers.__version__, '| compressed-tensors', ct.__version__)" >&2
echo "${py}"
