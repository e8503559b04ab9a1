"""The `polysae` console script: --version, --help, and errors exit non-zero. CPU only."""

from __future__ import annotations

import os
import subprocess
import sys

import polysae
from polysae.__main__ import main


def test_version_and_help(capsys):
    out = subprocess.run([sys.executable, "-m", "polysae", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"polysae {polysae.__version__}"
    assert main([]) == 2  # no subcommand: help, non-zero
    assert "COMMAND" in capsys.readouterr().out


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_import_is_light():
    """On a CPU machine `import polysae` pulls in no heavy optional stack."""
    code = ("import sys, polysae; heavy = [m for m in ('transformer_lens', 'triton', "
            "'transformers', 'sklearn', 'matplotlib') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_clean_env())
    assert out.stdout.strip() == "[]"


def test_import_and_cpu_path_without_triton():
    """Triton absent (import blocked): polysae imports, picks the torch path and decodes."""
    code = ("import sys; sys.modules['triton'] = None; import torch, polysae, polysae.kernels as k;"
            "s = polysae.SAE(polysae.SAEConfig(d_in=8, d_sae=16, k=2, ranks=(8, 2, 2)));"
            "print(k.BACKEND, tuple(s(torch.randn(3, 8)).shape))")
    env = _clean_env()
    env["TRITON_INTERPRET"] = "1"  # even when asked for, a missing triton falls back cleanly
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip() == "torch (3, 8)"


def test_help_lists_every_command(capsys):
    """`polysae --help` shows every subcommand of polysae.cli.COMMANDS (none silently skipped)."""
    from polysae.__main__ import build_parser
    from polysae.cli import COMMANDS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)


def test_broken_subcommand_module_surfaces(monkeypatch):
    """A subcommand module that fails to import raises, naming it, instead of vanishing."""
    import pytest

    from polysae.__main__ import build_parser

    # None in sys.modules makes `import polysae.cli.browse` raise ModuleNotFoundError for exactly
    # that module: the case the CLI used to skip without a word.
    monkeypatch.setitem(sys.modules, "polysae.cli.browse", None)
    with pytest.raises(ImportError, match=r"polysae\.cli\.browse failed to import"):
        build_parser()
