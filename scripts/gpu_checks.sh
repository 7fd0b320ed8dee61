#!/usr/bin/env bash
# What only a GPU shows, for a machine with CUDA: the CUDA/NCCL tests (tests/gpu) and the XᵀX and
# GPTQ speed per Linear (writes benchmarks/results/hessian_gptq_speed_cuda.{json,md}).
# Uses the python on PATH (or $PYTHON), which must have a CUDA build of torch and the package's
# dependencies; GPTQ_FSDP_TOKENIZER may name a tokenizer folder when SmolLM2 is not prepared.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'scripts/gpu_checks.sh needs a CUDA GPU'"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m pytest -q -s -p no:cacheprovider tests/gpu
"$PYTHON" benchmarks/hessian_gptq_speed.py --repeats 3
