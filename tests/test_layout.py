"""The code layout rules of docs/development.md, checked on the source tree.

- no module over 500 lines;
- no private name (leading underscore) imported from, or read off, another polysae module;
- the package's functions ``harvest``/``train``/``evaluate`` are never shadowed by a submodule of
  the same name (the modules are ``data.harvesting``, ``training``, ``evaluation``), and no name a
  package ``__init__`` re-exports is one of its own submodules;
- every package directory is listed in ``pyproject.toml`` (or a wheel would silently lack it);
- no import cycle among polysae modules, lazy (function-level) imports included, and no module
  imports the package face ``polysae/__init__.py`` (``__version__`` is in ``polysae.version``);
- at most 16 loose modules at the top of ``polysae/``: the rest live in one folder per stage.
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


# -- import graph ---------------------------------------------------------------------------------
def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the polysae modules its source imports (``modules``: dotted name -> source).

    Every import statement counts wherever it sits: top level, inside a function (a lazy import
    only postpones a cycle to the first call, it does not remove the loop) and under
    ``TYPE_CHECKING``. An edge goes to the module the statement names: ``from pkg import sub``
    (``sub`` a submodule) to ``pkg.sub``, ``from pkg import name`` (a name defined in
    ``pkg/__init__.py``) to ``pkg``, ``import pkg.sub`` to ``pkg.sub``.

    The packages above the named module get no edge, although Python runs their ``__init__``
    first: a package initialises before any of its submodules, so ``pkg/__init__.py`` re-exporting
    ``pkg.sub`` while ``pkg.sub`` imports its sibling ``pkg.other`` never re-enters a
    half-initialised module, and counting the implicit parent edge would make every re-exporting
    package a "cycle" with its own submodules. What does count is a submodule importing a name
    from its own package's ``__init__`` that re-exports it (``from pkg import name`` inside
    ``pkg.sub``): that works or fails depending on which module is imported first, and shows up
    here as the cycle ``pkg -> pkg.sub -> pkg``.
    """
    graph: dict[str, set[str]] = {}
    for module, source in modules.items():
        is_pkg = module in PACKAGES
        edges: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    src = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    src = node.module or ""
                for a in node.names:
                    if f"{src}.{a.name}" in modules:
                        edges.add(f"{src}.{a.name}")
                    elif src in modules:
                        edges.add(src)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
        graph[module] = edges - {module}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}
GRAPH = import_graph({name: p.read_text() for name, p in MODULES.items()})


def test_the_cycle_finder_finds_cycles():
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": set()}
    assert sorted(strongly_connected(toy)) == [["a", "b", "c"], ["d", "e"], ["f"]]
    mods = {"polysae.p": "from polysae.p.x import f\n",   # a package re-exporting a submodule
            "polysae.p.x": "def f():\n    from polysae.p.y import g\n",  # lazy, sibling
            "polysae.p.y": "from polysae.p import f\n",    # a name off its own package: a cycle
            "polysae.q": "from polysae import p\nimport polysae.p.x\n"}
    PACKAGES.add("polysae.p")
    try:
        graph = import_graph(mods)
    finally:
        PACKAGES.discard("polysae.p")
    assert graph == {"polysae.p": {"polysae.p.x"}, "polysae.p.x": {"polysae.p.y"},
                     "polysae.p.y": {"polysae.p"}, "polysae.q": {"polysae.p", "polysae.p.x"}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [
        ["polysae.p", "polysae.p.x", "polysae.p.y"]]


def test_the_import_graph_sees_lazy_imports():
    """Spot checks against imports known to be in the tree (one of them inside a function)."""
    assert "polysae.data.corpora" in GRAPH["polysae.data.chunking"]
    assert "polysae.evaluation.probing_stage" in GRAPH["polysae.evaluation.orchestrator"]  # lazy
    # ``from polysae.training import distributed``: an edge to the submodule, not to the package
    assert "polysae.training.distributed" in GRAPH["polysae.training.trainer"]


def test_no_import_cycles():
    cycles = [c for c in strongly_connected(GRAPH) if len(c) > 1]
    assert cycles == [], "import cycles (each list imports itself round the loop): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_module_imports_the_package_face():
    """``polysae/__init__.py`` is the API for users; a module that imports it (for ``__version__``
    or ``SAE``) depends on every module the face pulls in. Read ``polysae.version`` instead."""
    assert sorted(m for m, edges in GRAPH.items() if "polysae" in edges) == []


def test_package_reexports_are_not_submodule_names():
    """``from pkg.sub import sub`` in ``pkg/__init__.py`` would make ``pkg.sub`` the function or
    the module depending on import order (``polysae.replicate.compare`` stays the module)."""
    for pkg in PACKAGES:
        tree = ast.parse(MODULES[pkg].read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    name = a.asname or a.name
                    src = f"{node.module}.{a.name}"
                    assert src in MODULES or f"{pkg}.{name}" not in MODULES, (pkg, name)


MAX_LOOSE = 16


def test_few_loose_modules_at_the_top():
    loose = sorted(p.name for p in (ROOT / "polysae").glob("*.py"))
    assert len(loose) <= MAX_LOOSE, (f"{len(loose)} modules at the top of polysae/ "
                                     f"(> {MAX_LOOSE}): move stage modules into their folder: "
                                     f"{loose}")
