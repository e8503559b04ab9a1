"""``polysae hooks``: list a model's hook names (what ``harvest --hooks`` accepts)."""

from __future__ import annotations

import argparse

HELP = "list the hook points of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="model name or local folder, as for `polysae harvest` "
                        "(default smollm2-135m)")
    from polysae.data.backend import BACKENDS

    p.add_argument("--backend", default=BACKENDS[0], choices=BACKENDS,
                   help="list the names this backend accepts: transformer_lens (its own hook "
                        "points), hf / nnsight (TransformerLens-style names where the "
                        "architecture is known, then every module name) (default: "
                        "transformer_lens)")
    p.add_argument("--filter", default=None, metavar="TEXT",
                   help="only hooks whose name contains TEXT (e.g. resid_post)")


def main(args: argparse.Namespace) -> int:
    from polysae.cli import CLIError
    from polysae.data.models import list_hooks, load_model

    names = list_hooks(load_model(args.model, backend=args.backend))
    if args.filter:
        names = [n for n in names if args.filter in n]
        if not names:
            raise CLIError(f"no hook of {args.model} contains {args.filter!r}")
    print("\n".join(names))
    return 0
