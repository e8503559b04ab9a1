"""Peer virtualenvs for tests that compare polysae with the real peer packages (a helper, not a test
file).

The peers' pins clash with ours (transformer-lens 3.9 and transformers 5.x here; sae-dashboard
wants transformer-lens < 3), so each lives in its own virtualenv under ``.peers/<name>/``, built by
``scripts/peers.sh`` (``make peers``) from the lock ``scripts/peers/<name>.txt``. A test asks for
one by name and skips, with the reason, when it is not built, out of date or failed to build::

    from peers import peer_python, run_peer

    def test_saelens_loads_our_export(tmp_path):
        ...  # write the export to tmp_path with polysae
        r = run_peer("sae-lens", '''
            import sys
            from sae_lens import SAE
            sae = SAE.load_from_disk(sys.argv[1])
            print(sae.cfg.d_sae)
        ''', tmp_path)
        assert r.stdout.split()[-1] == "..."

Peers: ``sae-lens`` (sae-lens 6.54.12), ``sae-bench`` (sae-bench 0.6.0, in the sae-lens venv),
``sae-dashboard`` (sae-dashboard 0.8.0), ``neuronpedia`` (the neuronpedia client 1.2.1, no torch).
The snippet runs with the hub forced offline, wandb disabled and a fresh temporary working directory
(never the repository root, so neither ``polysae`` nor ``kernels/`` can shadow anything there).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / os.environ.get("POLYSAE_PEERS_DIR", ".peers")  # as scripts/peers.sh; absolute wins
SPECS = ROOT / "scripts" / "peers"
BUILD = "run `make peers` (or `bash scripts/peers.sh {name}`)"

# environment every peer snippet runs under: no network at test time, no telemetry, no GPU
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "DO_NOT_TRACK": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
}


def _directive(spec: Path, key: str) -> str | None:
    m = re.search(rf"^# {key}: *(.*)$", spec.read_text(), re.M)
    return m.group(1).strip() if m else None


def _venv_name(name: str) -> str:
    """The venv a peer lives in: itself, or the target of its ``# alias:`` line."""
    spec = SPECS / f"{name}.txt"
    if not spec.is_file():
        raise ValueError(f"unknown peer {name!r}: no {spec.relative_to(ROOT)} "
                         f"(known: {', '.join(sorted(p.stem for p in SPECS.glob('*.txt')))})")
    return _directive(spec, "alias") or name


@functools.cache
def _health(venv: str) -> str | None:
    """None when ``.peers/<venv>`` is built from the current lock and its interpreter starts; else
    why not (the skip reason)."""
    d = PEERS / venv
    failed = d / "FAILED"
    if failed.is_file():
        why = failed.read_text().strip() or "unknown reason"
        return (f"peer venv .peers/{venv} failed to build: {why} "
                f"(log: .peers/{venv}/build.log; {BUILD.format(name=venv)} to retry)")
    python = d / "bin" / "python"
    stamp = d / ".stamp"
    if not python.exists() or not stamp.is_file():
        return f"peer venv .peers/{venv} is not built: {BUILD.format(name=venv)}"
    want = hashlib.sha256((SPECS / f"{venv}.txt").read_bytes()).hexdigest()[:16]
    if stamp.read_text().strip() != want:
        return (f"peer venv .peers/{venv} is out of date with scripts/peers/{venv}.txt: "
                f"{BUILD.format(name=venv)}")
    try:
        subprocess.run([str(python), "-c", ""], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"peer venv .peers/{venv} is broken ({e}): {BUILD.format(name=venv)}"
    return None


def peer_python(name: str) -> Path:
    """The interpreter of peer ``name``'s virtualenv, or ``pytest.skip`` with the reason it is not
    usable (not built: run ``make peers``; out of date; or the recorded build failure)."""
    venv = _venv_name(name)
    why = _health(venv)
    if why is not None:
        pytest.skip(why if venv == name else f"peer {name} lives in {venv}: {why}")
    return PEERS / venv / "bin" / "python"


def run_peer(name: str, script: str, *args: object, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the Python snippet ``script`` (dedented) with ``args`` as ``sys.argv[1:]`` in peer
    ``name``'s virtualenv, offline (``OFFLINE_ENV``), from a fresh temporary working directory.

    Skips like ``peer_python``; raises ``AssertionError`` carrying stdout and stderr on a non-zero
    exit; returns the ``CompletedProcess`` (text ``stdout``/``stderr``) otherwise. Paths in ``args``
    should be absolute (the working directory is a temporary one).
    """
    python = peer_python(name)
    full_env = {k: v for k, v in os.environ.items()
                if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    full_env.update(OFFLINE_ENV)
    if env:
        full_env.update(env)
    with tempfile.TemporaryDirectory(prefix=f"peer-{name}-") as cwd:
        full_env["HOME"] = full_env.get("HOME") or cwd
        try:
            r = subprocess.run([str(python), "-c", textwrap.dedent(script), *map(str, args)],
                               cwd=cwd, env=full_env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"peer {name}: snippet timed out after {timeout} s\n"
                                 f"--- stdout ---\n{_text(e.stdout)}\n"
                                 f"--- stderr ---\n{_text(e.stderr)}") from None
    if r.returncode != 0:
        raise AssertionError(f"peer {name}: snippet exited {r.returncode}\n"
                             f"--- stdout ---\n{r.stdout[-20000:]}\n"
                             f"--- stderr ---\n{r.stderr[-20000:]}")
    return r


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return (b.decode(errors="replace") if isinstance(b, bytes) else b)[-20000:]
