#!/usr/bin/env bash
# The CPU-scale `polysae replicate` run behind benchmarks/results/replicate_cpu.{json,md}: the
# bundled SmolLM2-135M, layer 9 residual stream, the whole bundled BBC corpus (1.15M tokens),
# d_sae 4096, k 32, half an epoch per SAE, 3 seeds per sparsifier. Resumable: re-run to continue.
#   bash benchmarks/replicate_cpu.sh                 # all three sparsifiers
#   SPARSIFIERS="topk batchtopk" bash benchmarks/replicate_cpu.sh
#   SEEDS=5 TOKENS=600000 bash benchmarks/replicate_cpu.sh   # more seeds, a smaller store
# The paper's BatchTopK evaluation (batch-level top-k at eval, so both SAEs have L0 = k exactly)
# beside ours (the learned threshold), on the same store:
#   SPARSIFIERS=batchtopk REP=runs/replicate-cpu/rep-batch RESULT=replicate_cpu_batchtopk_batch \
#     bash benchmarks/replicate_cpu.sh --sae.batchtopk-inference batch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/replicate-cpu}
SPARSIFIERS=${SPARSIFIERS:-topk batchtopk matryoshka}
REP=${REP:-$OUT/rep}
RESULT=${RESULT:-replicate_cpu}
SEEDS=${SEEDS:-3}
TOKENS=${TOKENS:-1200000}
EPOCHS=${EPOCHS:-0.5}
$PY -m polysae harvest --hooks blocks.9.hook_resid_post --dataset bbc --tokens "$TOKENS" --ctx 128 \
    --shard-size 8192 --dtype float16 --out "$OUT/acts"
# shellcheck disable=SC2086
$PY -m polysae replicate --acts "$OUT/acts" --sparsifiers $SPARSIFIERS --seeds "$SEEDS" \
    --sae.d-sae 4096 --sae.k 32 --batch-size 1024 --epochs "$EPOCHS" --out "$REP" "$@"
mkdir -p benchmarks/results
cp "$REP/replicate.json" "benchmarks/results/$RESULT.json"
cp "$REP/replicate.md" "benchmarks/results/$RESULT.md"
cp "$REP/paired_f1.png" "benchmarks/results/${RESULT}_paired_f1.png"
