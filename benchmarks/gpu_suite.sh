#!/usr/bin/env bash
# The GPU suite (issue 24): every GPU figure in one run of at most 8 minutes on one H100.
#
#   bash benchmarks/gpu_suite.sh                 # on a CUDA machine: benchmarks/results/*_gpu.{json,md}
#   bash benchmarks/gpu_suite.sh --cpu-dry-run   # anywhere: the same steps at toy sizes (<= 3 min)
#   bash benchmarks/gpu_suite.sh --help          # options (--out, --budget, --skip, ...)
#
# Runs polysae from this working tree on the machine's own python (PYTHON=..., else the repo's
# .venv when there is one, else python3): nothing is installed into it. Missing packages
# (transformer-lens and the few of its dependencies a bare CUDA image lacks) travel as wheels in
# ${POLYSAE_WHEELS:-<repo>/build/gpu-assets} (made by benchmarks/gpu_wheels.sh, together with SmolLM2's
# tokenizer); when transformer_lens does not import, they are installed into a scratch folder put
# on PYTHONPATH. Steps, outputs and the dry run: docs/benchmarks.md#gpu-suite and gpu_suite.py.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
assets=${POLYSAE_WHEELS:-$repo/build/gpu-assets}
if compgen -G "$assets/*.whl" >/dev/null && ! "$py" -c "import transformer_lens" >/dev/null 2>&1; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/polysae-suite-site.XXXXXX")
  echo "[gpu_suite.sh] installing $(ls "$assets"/*.whl | wc -l) carried wheels into $site"
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$assets"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_suite.sh] warning: the carried wheels did not install; going on without them" >&2
  fi
fi
# The driver keeps its own budget (450 s on GPU); this is only the backstop.
exec timeout -k 15 "${SUITE_TIMEOUT:-480}" "$py" "$here/gpu_suite.py" --assets "$assets" \
  --python "$py" "$@"
