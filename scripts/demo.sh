#!/usr/bin/env bash
# The main job on an embedded default: quantize SmolLM2-135M (W4A16, group 64, act-order static) on
# 64 x 512 tokens of Emma across 2 CPU ranks (FSDP2, gloo), reload the checkpoint, print perplexity
# before/after on Persuasion and the time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL="${GPTQ_FSDP_CACHE:-$HOME/.cache/gptq_fsdp}/smollm2-135m"
TEXT="${GPTQ_FSDP_AUSTEN:-../shared/data/austen}"
OUT="${1:-out/smollm2-135m-w4a16}"
mkdir -p "$(dirname "$OUT")"
export PYTHONWARNINGS=ignore TQDM_MININTERVAL=5
start=$(date +%s)
.venv/bin/torchrun --standalone --nproc_per_node 2 -m gptq_fsdp quantize "$MODEL" --dataset "$TEXT/emma.txt" \
    --num-samples 64 --max-seq-length 512 --group-size 64 --actorder static --threads 1 --output "$OUT" --overwrite
end=$(date +%s)
echo "== before (fp32):"
.venv/bin/gptq-fsdp perplexity "$MODEL" --text "$TEXT/persuasion.txt"
echo "== after (W4A16 checkpoint, reloaded):"
.venv/bin/gptq-fsdp perplexity "$OUT" --text "$TEXT/persuasion.txt"
echo "quantize + save wall time: $((end - start)) s"
