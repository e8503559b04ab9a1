"""``polysae list``: the pretrained dictionaries the registry knows, whether their files' sha256
is known (``verified``; an entry without one for every file is shown ``unverified``: its download
is checked only against the pinned revision), and which are cached."""

from __future__ import annotations

import argparse

HELP = "list pretrained dictionaries (registry names for `polysae download` and polysae.load)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("filter", nargs="?", default="",
                        help="show only entries whose name, model or hook contains this text")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--cached", action="store_true", help="show only downloaded entries")
    parser.add_argument("--verified", action="store_true",
                        help="show only entries whose every file has a known sha256")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default $POLYSAE_CACHE or ~/.cache/polysae)")


def main(args: argparse.Namespace) -> int:
    import json

    from polysae.cache import entry_info
    from polysae.registry import list_entries

    f = args.filter.lower()
    rows = [entry_info(e, args.cache_dir) for e in list_entries()
            if f in f"{e.name} {e.model} {e.hook}".lower()]
    if args.cached:
        rows = [r for r in rows if r["cached"]]
    if args.verified:
        rows = [r for r in rows if r["verified"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no matching entries")
        return 0
    cols = ("name", "model", "hook", "architecture", "d_sae", "revision", "sha256", "cached")

    def cell(r: dict, c: str) -> str:
        if c == "cached":
            return "yes" if r["cached"] else "-"
        if c == "sha256":
            return "verified" if r["verified"] else "unverified"
        if c == "revision":
            return (r["revision"] or "-")[:12]
        return str(r[c])

    table = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    n_un = sum(not r["verified"] for r in rows)
    if n_un:
        print(f"\n{n_un} of {len(rows)} entries are unverified: no published sha256 for every "
              "file; their download is pinned to the revision shown, and the cache records the "
              "hash it saw")
    return 0
