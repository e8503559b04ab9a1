"""``polysae export SOURCE OUT --format saelens|polysae-ref|sparsify|polysae|neuronpedia``: write a
dictionary in a layout other tools read: SAELens (linear decoders), the reference PolySAE layout
(poly decoders), EleutherAI sparsify (linear TopK), polysae's own (to convert a foreign
checkpoint), or Neuronpedia feature batches computed over harvested activations (``--acts``),
with PolySAE's interaction pairs as an extra file (see docs/exports.md)."""

from __future__ import annotations

import argparse

HELP = ("export a dictionary as SAELens, reference-PolySAE, sparsify or polysae checkpoint, or as "
        "Neuronpedia feature batches")
FORMATS_HELP = ("saelens (linear decoders), polysae-ref (poly decoders: the reference "
                "PolySAE/SAELens-fork layout), sparsify (linear TopK SAEs, EleutherAI sparsify's "
                "layout), polysae, or neuronpedia (SAEDashboard-layout feature batches + "
                "interaction pairs, --upload adds the Neuronpedia client's upload bodies; needs "
                "--acts)")


# Old spellings of the generated Neuronpedia flags (deprecated, still accepted).
NEURONPEDIA_ALIASES = {"n_contexts": ("--contexts",), "n_pairs": ("--pairs",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from polysae.browser import StatsConfig
    from polysae.cli.flags import add_config_flags, field_values
    from polysae.formats import EXPORT_FORMATS
    from polysae.formats.neuronpedia import NeuronpediaConfig

    parser.add_argument("source", help="checkpoint folder, registry name, hf:// source or URL")
    parser.add_argument("out", help="output folder (created; a different checkpoint or an "
                                    "earlier Neuronpedia export already there is an error unless "
                                    "--overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different checkpoint already in the output folder "
                             "(each file atomically), or an earlier Neuronpedia export (the "
                             "folder as a whole); a folder holding anything else is never "
                             "replaced by --format neuronpedia")
    parser.add_argument("--format", required=True, choices=(*EXPORT_FORMATS, "neuronpedia"),
                        help=FORMATS_HELP)
    parser.add_argument("--model", default=None,
                        help="checkpoints: model name to record (default: the source's); "
                             "neuronpedia: the model to load for token text and the unembedding "
                             "(default: the one the harvest manifest names)")
    parser.add_argument("--hook", default=None,
                        help="checkpoints: hook name to record (default: the source's); "
                             "neuronpedia: the harvested hook to read (default: the SAE's "
                             "recorded hook, else the harvest's only hook)")
    parser.add_argument("--linearise", action="store_true",
                        help="sparsify only: export a poly-decoder SAE's linear atoms U C1^T "
                             "alone, dropping its interaction terms (an approximation, marked "
                             "polysae_linearised in cfg.json)")
    g = parser.add_argument_group("neuronpedia")
    g.add_argument("--acts", metavar="DIR", default=None,
                   help="harvest folder (polysae harvest) the statistics are computed over")
    g.add_argument("--split", default="val", choices=("val", "all", "train"),
                   help="store split (default: the held-out val shards; a one-shard harvest "
                        "has none, then all rows are used with a warning)")
    g.add_argument("--device", default=None,
                   help="device for the SAE and model (default: cuda when present, else cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(parser, NeuronpediaConfig, aliases=NEURONPEDIA_ALIASES,
                     title="neuronpedia")
    add_config_flags(parser, StatsConfig, defaults=field_values(NeuronpediaConfig().stats),
                     aliases=NEURONPEDIA_ALIASES, title="neuronpedia statistics")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from polysae.cli import CLIError
    from polysae.formats import export
    from polysae.loader import load_with_metadata

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"output {out_dir} exists and is not a folder")
    if args.linearise and args.format != "sparsify":
        raise CLIError("--linearise applies to --format sparsify only")
    if args.format != "neuronpedia" and args.acts:
        raise CLIError(f"--acts is used by --format neuronpedia only, not {args.format}")
    if args.format == "neuronpedia":
        return _neuronpedia(args, out_dir)
    src = load_with_metadata(args.source)
    meta = {k: v for k, v in src.metadata.items() if k not in ("source_cfg", "format")}
    meta["source_format"] = src.format
    if args.model:
        meta["model"] = args.model
    if args.hook:
        meta["hook"] = args.hook
    export(src.sae, out_dir, args.format, metadata=meta, linearise=args.linearise,
           overwrite=args.overwrite)
    note = ""
    if args.format == "sparsify":
        from polysae.formats import sparsify_hookpoint

        hp = sparsify_hookpoint(meta.get("hook"))
        if hp and out_dir.name != hp:
            note = (f"; sparsify's load_many/load_from_hub find a hookpoint by folder name: "
                    f"name it {hp}")
        if args.linearise:
            note += "; LINEARISED: the poly decoder's interaction terms were dropped"
    print(f"wrote {args.format} checkpoint to {out_dir} (from {src.format} source "
          f"{args.source}){note}")
    return 0


def _neuronpedia(args: argparse.Namespace, out_dir) -> int:
    from pathlib import Path

    from polysae.cli import CLIError
    from polysae.cli.browse import load_store_model, open_store, viewer_config
    from polysae.formats.neuronpedia import (
        NeuronpediaConfig,
        check_export_target,
        export_neuronpedia,
    )
    from polysae.loader import load_with_metadata

    if not args.acts:
        raise CLIError("--format neuronpedia needs --acts DIR (a harvest folder): top "
                       "activations, densities and token contexts are computed over it")
    check_export_target(out_dir, args.overwrite)  # before loading the SAE, data and model
    from polysae.device import resolve_device

    cfg = viewer_config(args, NeuronpediaConfig)
    args.device = resolve_device(args.device)
    src = load_with_metadata(args.source, device=args.device)
    sae = src.sae
    hook = args.hook or src.metadata.get("hook")
    acts = Path(args.acts)
    store = open_store(acts, hook, args.split, args.device, sae=sae, source=str(args.source))
    mname, model = load_store_model(
        store, acts, args.model, args.device, "the Neuronpedia export needs the model's "
        "tokenizer (token text) and unembedding (logit effects); pass --model")
    meta = {"model": mname, "hook": store.hook, "source": str(args.source),
            "dataset": store.manifest.get("dataset"), "ctx": store.manifest.get("ctx"),
            "split": store.split}
    res = export_neuronpedia(sae, store, out_dir, model=model, config=cfg, meta=meta,
                             progress=not args.no_progress, overwrite=args.overwrite)
    extra = f", {res.n_pairs} interaction pairs" if res.n_pairs else ""
    if res.n_masked:
        extra += f"; {res.n_masked:,} special tokens masked (--include-special counts them)"
    if res.n_dead:
        extra += f"; {res.n_dead} dead features"
    if cfg.upload:
        extra += (f"; {res.n_upload} upload request bod{'y' if res.n_upload == 1 else 'ies'} "
                  f"in {out_dir / 'upload'} (dead features skipped, listed in upload.json)")
    print(f"wrote Neuronpedia export to {out_dir}: {res.n_features} features in {res.n_batches} "
          f"batch file(s) over {res.n_rows:,} tokens{extra}")
    return 0
