"""README.md and docs/*.md: every relative link and image resolves to a file that exists and, with a
``#fragment``, to a heading of that file (GitHub's anchor rules); every docs page is in the mkdocs
nav (``mkdocs build --strict`` in ``make docs`` fails on a page left out). CPU only, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than '-' and
    '_' removed, each space a hyphen."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(page.read_text(encoding="utf-8")))]


def test_slug_rules():
    assert _slug("The `metrics.json` schema") == "the-metricsjson-schema"
    assert _slug("Multi-GPU (data parallel, `torchrun`)") == "multi-gpu-data-parallel-torchrun"
    assert _slug("Where polysae deviates from the reference and why") == (
        "where-polysae-deviates-from-the-reference-and-why")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):       # http:, https:, mailto: ...
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif frag and dest.suffix == ".md" and frag not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{frag} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_every_docs_page_is_in_the_mkdocs_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.M))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - listed == set(), "docs pages missing from mkdocs.yml nav"
    assert listed - pages == set(), "mkdocs.yml nav lists pages that do not exist"


def test_readme_test_command_is_what_make_test_runs():
    """The README states the exact command `make test` runs, and CI runs `make test`."""
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = make.split("\ntest: setup\n", 1)[1].splitlines()[0].strip()
    cmd = recipe.replace("$(VENV)", ".venv")
    assert cmd in (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "make test" in ci and ci.index("make test") < ci.index("make docs")
