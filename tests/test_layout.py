"""The code layout rules of docs/development.md, checked on the source tree.

- no module over 500 lines;
- no private name (leading underscore) imported from, or read off, another polysae module;
- the package's functions ``harvest``/``train``/``evaluate`` are never shadowed by a submodule of
  the same name (the modules are ``harvesting``, ``training``, ``evaluation``);
- every package directory is listed in ``pyproject.toml`` (or a wheel would silently lack it).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"polysae": ROOT / "polysae", "polysae.kernels": ROOT / "kernels"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the installed packages."""
    out = {}
    for pkg, folder in SOURCES.items():
        for p in sorted(folder.rglob("*.py")):
            rel = p.relative_to(folder).with_suffix("").parts
            if pkg == "polysae" and rel[0] == "kernels":
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((pkg, *parts))] = p
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def cross_module_private_uses(module: str, source: str) -> list[str]:
    """``from polysae.x import _name`` and ``x._name`` (x an imported polysae module or a name
    imported from one) in ``source``, where ``polysae.x`` is not ``module`` itself."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> polysae module (or module.attr) it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(module, node)
            if not src.startswith("polysae"):
                continue
            for a in node.names:
                if _private(a.name) and src != module:
                    found.append(f"line {node.lineno}: from {src} import {a.name}")
                bound[a.asname or a.name] = f"{src}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("polysae"):
                    bound[a.asname or a.name.split(".")[0]] = a.asname and a.name or "polysae"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in bound
                and bound[node.value.id] != module):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return sorted(found, key=lambda f: int(f.split()[1].rstrip(':')))


def test_the_private_name_checker_catches_what_it_should():
    src = ("from polysae.sae import _pack, SAE\nimport polysae.data.store as st\n"
           "from polysae import decoders\nst._to_torch(1)\ndecoders.PolyDecoder\n"
           "SAE._flatten\nself_like = 1\n")
    found = cross_module_private_uses("polysae.evaluation.report", src)
    assert found == ["line 1: from polysae.sae import _pack", "line 4: st._to_torch",
                     "line 6: SAE._flatten"]
    # a module may use its own private names, and NamedTuple's _asdict is not ours to police
    assert cross_module_private_uses("polysae.sae", "from polysae.sae import _pack\n") == []
    assert cross_module_private_uses("polysae.evaluation.report", "x = y._asdict()\n") == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_short_and_uses_no_private_name_of_another(module):
    path = MODULES[module]
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path} has {n} lines (> {MAX_LINES}): split it by concept"
    assert cross_module_private_uses(module, path.read_text()) == [], path


def test_package_functions_are_not_shadowed_by_submodules():
    import polysae

    for m in pkgutil.walk_packages(polysae.__path__, "polysae."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    for name in ("harvest", "train", "evaluate", "load", "download"):
        assert callable(getattr(polysae, name)) and not isinstance(
            getattr(polysae, name), type(polysae)), name
    for stale in ("harvest.py", "train.py", "evaluate.py"):
        assert not (ROOT / "polysae" / stale).exists()
    assert not any("__class__ =" in p.read_text() for p in MODULES.values())


def test_every_package_directory_is_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {name for name, p in MODULES.items() if p.name == "__init__.py"}
    assert on_disk == listed


def _polysae_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) of every absolute polysae import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polysae"):
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("polysae")]
    return out


@pytest.mark.parametrize("path", sorted([*(ROOT / "benchmarks").glob("*.py"),
                                         *(ROOT / "scripts").glob("*.py")]), ids=lambda p: p.name)
def test_scripts_import_names_that_exist(path):
    """Benchmarks and scripts are not imported by the suite; their polysae imports must still
    resolve after a module moves."""
    for line, module, name in _polysae_imports(path):
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            importlib.import_module(f"{module}.{name}")  # a submodule; raises if there is none


def _doc_imports() -> list[tuple[str, str]]:
    """(page:line, import statement) of every polysae import in a python block of the docs."""
    out = []
    for page in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        block = None
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                block = [] if block is None and line.strip() == "```python" else None
                continue
            if block is not None and line.lstrip().startswith(("from polysae", "import polysae")):
                out.append((f"{page.name}:{n}", line.strip()))
    return out


@pytest.mark.parametrize("where,statement", _doc_imports())
def test_documented_imports_exist(where, statement):
    """Every import in a python example of the README and docs/ resolves (catches docs left
    behind by a module move)."""
    if statement.endswith("("):  # a wrapped import: the module part is enough
        statement = statement.split(" import ")[0] + " import *"
    tree = ast.parse(statement)
    for node in tree.body:
        names = [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            mod = importlib.import_module(node.module)
            for name in names:
                if name != "*" and not hasattr(mod, name):
                    importlib.import_module(f"{node.module}.{name}")
        else:
            for name in names:
                importlib.import_module(name)
