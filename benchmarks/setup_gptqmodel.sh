#!/usr/bin/env bash
# Create benchmarks/.venv-gptqmodel with GPTQModel 7.7 (CPU only) for the peer benchmark.
# Idempotent: re-running reuses the venv and skips installs already satisfied.
#
# GPTQModel 7.7 is an sdist only. Its setup.py builds no extension (the wheel it makes is
# py3-none-any): every C++/CUDA kernel is compiled just in time on first use
# (gptqmodel/utils/cpp.py), so no BUILD_CUDA_EXT-style switch exists or is needed. The one
# that would be compiled on the CPU path, pack_block_cpu, is switched off at run time by
# peer_gptqmodel.py (GPTQMODEL_DISABLE_PACK_EXT=1: the Python packer writes the same layout).
#
# Its requirements.txt asks for torch>=2.14.1: a plain `pip install gptqmodel==7.7.*` resolves
# torch 2.14.1 with its CUDA 13 wheels (nvidia-cublas, -cudnn-cu13, -nccl-cu13, triton, ...,
# GBs), and with torch pinned to 2.13.0 pip refuses ("gptqmodel 7.7.0 depends on torch>=2.14.1").
# So torch 2.13.0 (the local CPU wheel) goes in first, then GPTQModel's other requirements
# (requirements.txt of the 7.7.0 sdist, Python 3.11 markers applied) under a torch==2.13.0
# constraint, then GPTQModel itself with --no-deps. GPTQModel 7.7.0 imports and quantizes on
# torch 2.13.0+cpu; `pip check` reports only the torch>=2.14.1 pin.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${here}/.venv-gptqmodel"
py="${venv}/bin/python"

if [ ! -x "${py}" ]; then
    python3 -m venv "${venv}"
fi

if ! "${py}" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
    "${py}" -m pip install --quiet "torch==2.13.0"
fi

if ! "${py}" -c "import importlib.metadata as m, sys; sys.exit(not m.version('gptqmodel').startswith('7.7.'))" 2>/dev/null; then
    constraint="${venv}/torch-constraint.txt"
    echo "torch==2.13.0" >"${constraint}"
    # pypcre is built from its sdist (C, a few seconds); keep compilers to one job
    MAX_JOBS=1 "${py}" -m pip install --quiet -c "${constraint}" \
        "accelerate>=1.15.0" "numpy>=2.4.6" "safetensors>=0.8.0" "filelock>=4.2.4" \
        "transformers>=5.20.2" "threadpoolctl>=3.7.0" "packaging>=26.3" "device-smi>=0.5.7" \
        "protobuf>=7.36.2" "pillow>=13.0.0" "requests>=2.34.2" "pypcre>=0.6.4" "tokenicer>=0.0.14" \
        "logbar>=0.4.15" "jinja2>=3.1.6" "ninja>=1.13.2" "maturin>=1.15.0" "datasets>=5.1.0" \
        "pyarrow>=26.0.0" "dill>=0.4.1" "torchao>=0.18.0" "defuser>=0.0.28"
    "${py}" -m pip install --quiet --no-deps "gptqmodel==7.7.*"
fi

"${py}" -c "import torch, gptqmodel, transformers; print('torch', torch.__version__, '| gptqmodel', gptqmodel.__version__, '| transformers', transformers.__version__)" 2>/dev/null | tail -n 1 >&2
echo "${py}"
