#!/usr/bin/env bash
# The CPU-scale `polysae replicate` run behind benchmarks/results/replicate_cpu.{json,md}: the
# bundled SmolLM2-135M, layer 9 residual stream, the whole bundled BBC corpus (1.15M tokens),
# d_sae 4096, k 32, half an epoch per SAE, 3 seeds per sparsifier. Resumable: re-run to continue.
#   bash benchmarks/replicate_cpu.sh                 # all three sparsifiers
#   SPARSIFIERS="topk batchtopk" bash benchmarks/replicate_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/replicate-cpu}
SPARSIFIERS=${SPARSIFIERS:-topk batchtopk matryoshka}
$PY -m polysae harvest --hooks blocks.9.hook_resid_post --dataset bbc --tokens 1200000 --ctx 128 \
    --shard-size 8192 --dtype float16 --out "$OUT/acts"
# shellcheck disable=SC2086
$PY -m polysae replicate --acts "$OUT/acts" --sparsifiers $SPARSIFIERS --seeds 3 \
    --sae.d-sae 4096 --sae.k 32 --batch-size 1024 --epochs 0.5 --out "$OUT/rep" "$@"
mkdir -p benchmarks/results
cp "$OUT/rep/replicate.json" benchmarks/results/replicate_cpu.json
cp "$OUT/rep/replicate.md" benchmarks/results/replicate_cpu.md
cp "$OUT/rep/paired_f1.png" benchmarks/results/replicate_cpu_paired_f1.png
