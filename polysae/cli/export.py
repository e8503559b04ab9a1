"""``polysae export SOURCE DIR --format saelens|polysae-ref|polysae``: write a dictionary in a
layout other tools read (SAELens for linear decoders, the reference PolySAE layout for poly ones,
or polysae's own to convert a foreign checkpoint)."""

from __future__ import annotations

import argparse

HELP = "export a dictionary as SAELens, reference-PolySAE or polysae format"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from polysae.formats import EXPORT_FORMATS

    parser.add_argument("source", help="checkpoint folder, registry name, hf:// source or URL")
    parser.add_argument("out", help="output folder (created; existing files of the format are "
                                    "replaced atomically)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="saelens (linear decoders), polysae-ref (poly decoders: the "
                             "reference PolySAE/SAELens-fork layout) or polysae")
    parser.add_argument("--model", default=None, help="model name to record (default: the "
                                                      "source's)")
    parser.add_argument("--hook", default=None, help="hook name to record (default: the "
                                                     "source's)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polysae.cli import CLIError
    from polysae.formats import export
    from polysae.loader import load_with_metadata

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"output {out_dir} exists and is not a folder")
    src = load_with_metadata(args.source)
    meta = {k: v for k, v in src.metadata.items() if k not in ("source_cfg", "format")}
    meta["source_format"] = src.format
    if args.model:
        meta["model"] = args.model
    if args.hook:
        meta["hook"] = args.hook
    export(src.sae, out_dir, args.format, metadata=meta)
    print(f"wrote {args.format} checkpoint to {out_dir} (from {src.format} source {args.source})")
    return 0
