"""``polysae list``: the pretrained dictionaries the registry knows, and which are cached."""

from __future__ import annotations

import argparse

HELP = "list pretrained dictionaries (registry names for `polysae download` and polysae.load)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("filter", nargs="?", default="",
                        help="show only entries whose name, model or hook contains this text")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--cached", action="store_true", help="show only downloaded entries")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default $POLYSAE_CACHE or ~/.cache/polysae)")


def main(args: argparse.Namespace) -> int:
    import json

    from polysae.pretrained import entry_info, list_entries

    f = args.filter.lower()
    rows = [entry_info(e, args.cache_dir) for e in list_entries()
            if f in f"{e.name} {e.model} {e.hook}".lower()]
    if args.cached:
        rows = [r for r in rows if r["cached"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no matching entries")
        return 0
    cols = ("name", "model", "hook", "architecture", "d_sae", "cached")
    table = [[str(r[c] if c != "cached" else ("yes" if r["cached"] else "-")) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    return 0
