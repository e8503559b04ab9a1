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
                "layout), polysae, or neuronpedia (feature dashboards + interaction pairs; needs "
                "--acts)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from polysae.formats import EXPORT_FORMATS

    parser.add_argument("source", help="checkpoint folder, registry name, hf:// source or URL")
    parser.add_argument("out", help="output folder (created; existing files of the format are "
                                    "replaced atomically)")
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
    g.add_argument("--sae-set", default=None,
                   help="Neuronpedia SAE set name written in every batch (default: polysae-"
                        "<decoder>)")
    g.add_argument("--features-per-batch", type=int, default=128,
                   help="features per batch-N.json file (128)")
    g.add_argument("--contexts", type=int, default=20, help="top activations per feature (20)")
    g.add_argument("--left", type=int, default=16, help="context tokens before the peak (16)")
    g.add_argument("--right", type=int, default=8, help="context tokens after the peak (8)")
    g.add_argument("--pairs", type=int, default=100,
                   help="PolySAE interaction pairs exported (100; 0 = none)")
    g.add_argument("--min-pair-count", type=int, default=2,
                   help="tokens on which a pair must co-fire to be exported (2)")
    g.add_argument("--device", default="cpu", help="device for the SAE and model (cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    export(src.sae, out_dir, args.format, metadata=meta, linearise=args.linearise)
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
    from polysae.cli.browse import open_store
    from polysae.loader import load_with_metadata
    from polysae.neuronpedia import NeuronpediaConfig, export_neuronpedia

    if not args.acts:
        raise CLIError("--format neuronpedia needs --acts DIR (a harvest folder): top "
                       "activations, densities and token contexts are computed over it")
    try:
        cfg = NeuronpediaConfig(features_per_batch=args.features_per_batch,
                                n_contexts=args.contexts, left=args.left, right=args.right,
                                n_pairs=args.pairs, min_pair_count=args.min_pair_count,
                                sae_set=args.sae_set)
    except ValueError as e:
        raise CLIError(str(e)) from e
    src = load_with_metadata(args.source, device=args.device)
    sae = src.sae
    hook = args.hook or src.metadata.get("hook")
    acts = Path(args.acts)
    store = open_store(acts, hook, args.split, args.device)
    if store.d_in != sae.cfg.d_in:
        raise CLIError(f"{args.source} reads d_in={sae.cfg.d_in} but --acts {acts} hook "
                       f"{store.hook!r} holds d_in={store.d_in}; pass the matching --hook")
    mname = args.model or store.manifest.get("model")
    if not mname:
        raise CLIError(f"--acts {acts}: the manifest names no model; pass --model (its tokenizer "
                       "gives the token text, its unembedding the logit effects)")
    from polysae.models import load_model

    try:
        model = load_model(mname, device=args.device).model
    except (ValueError, OSError) as e:
        raise CLIError(f"--model {mname!r}: cannot load it ({e}); the Neuronpedia export needs "
                       "the model's tokenizer and unembedding") from e
    meta = {"model": mname, "hook": store.hook, "source": str(args.source),
            "dataset": store.manifest.get("dataset"), "ctx": store.manifest.get("ctx"),
            "split": store.split}
    res = export_neuronpedia(sae, store, out_dir, model=model, config=cfg, meta=meta,
                             progress=not args.no_progress)
    extra = f", {res.n_pairs} interaction pairs" if res.n_pairs else ""
    print(f"wrote Neuronpedia export to {out_dir}: {res.n_features} features in {res.n_batches} "
          f"batch file(s) over {res.n_rows:,} tokens{extra}")
    return 0
