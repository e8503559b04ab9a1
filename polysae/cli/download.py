"""``polysae download SOURCE``: fetch a registry name, hf:// source or URL into the cache."""

from __future__ import annotations

import argparse

HELP = "download a pretrained dictionary (registry name, hf://owner/repo/path@rev or URL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="+",
                        help="registry name (see `polysae list`), hf://owner/repo/path@revision "
                             "or http(s) URL of a checkpoint folder")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default $POLYSAE_CACHE or ~/.cache/polysae)")
    parser.add_argument("--force", action="store_true", help="download again even if cached")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="network timeout per request in seconds (default 60)")
    parser.add_argument("--check", action="store_true",
                        help="also load each download and print its shape and format")


def main(args: argparse.Namespace) -> int:
    from polysae.cache import download, is_remote
    from polysae.cli import CLIError
    from polysae.registry import REGISTRY

    if args.timeout <= 0:
        raise CLIError(f"--timeout must be positive, got {args.timeout}")
    for s in args.source:
        if s not in REGISTRY and not is_remote(s):
            raise CLIError(f"{s!r} is not a registry name (see `polysae list`), an hf:// source "
                           "or an http(s) URL")
    for s in args.source:
        folder = download(s, cache_dir=args.cache_dir, force=args.force, timeout=args.timeout)
        line = f"{s}: {folder}"
        if s in REGISTRY:
            line += (" (sha256 verified)" if REGISTRY[s].verified else
                     " (unverified: no published sha256; pinned to revision "
                     f"{REGISTRY[s].revision[:12]})")
        if args.check:
            from polysae.formats import read_checkpoint

            out = read_checkpoint(folder)
            c = out.sae.cfg
            line += (f" ({out.format}, d_in={c.d_in}, d_sae={c.d_sae}, {c.sparsifier}, "
                     f"{c.decoder} decoder)")
        print(line)
    return 0
