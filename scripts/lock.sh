#!/usr/bin/env bash
# Regenerates requirements-lock.txt (`make lock`): every package the CPU set-up installs, transitive
# ones included, resolved by uv from pyproject.toml's ranges (extras triton, test, nnsight, docs)
# under constraints-cpu.txt, for CPython 3.11 on Linux x86_64 (the set-up and CI machine). torch
# resolves to its CPU build: from a local wheel on pip's find-links path where there is one, else
# from PyTorch's CPU index, so no CUDA libraries enter the lock. uv runs from a throw-away tool
# virtualenv and never touches .venv. See docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tool=${LOCK_TOOL_VENV:-.venv-lock-tool}
UV_VERSION=0.13.10
[ -x "$tool/bin/uv" ] && "$tool/bin/uv" --version | grep -q " $UV_VERSION" \
    || { "$PY" -m venv "$tool" && "$tool/bin/python" -m pip install -q "uv==$UV_VERSION"; }
links=()
for d in $(python3 -m pip config get global.find-links 2>/dev/null) /opt/wheels; do
    [ -d "$d" ] && links+=(--find-links "$d")
done
[ ${#links[@]} -gt 0 ] || links=(--index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
"$tool/bin/uv" pip compile pyproject.toml --quiet \
    --extra triton --extra test --extra nnsight --extra docs \
    -c constraints-cpu.txt "${links[@]}" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --no-emit-find-links --custom-compile-command "make lock" \
    -o requirements-lock.txt
echo "lock: $(grep -c '^[A-Za-z0-9]' requirements-lock.txt) packages pinned in requirements-lock.txt"
