"""``polysae browse``: build the static feature browser of an SAE over harvested activations."""

from __future__ import annotations

import argparse
import dataclasses
import html
import logging
from pathlib import Path

from polysae.cli import CLIError
from polysae.cli.eval import checkpoint_folders  # same RUN layout rules as `polysae eval`
from polysae.fileio import atomic_write_text

HELP = "build a static HTML feature browser (latents, interactions) from a run and activations"
log = logging.getLogger("polysae.browse")


# Old spellings of the generated flags (deprecated, still accepted).
ALIASES = {"n_contexts": ("--contexts",), "n_pairs": ("--pairs",)}
# BrowseConfig fields the command sets itself (the title names each SAE and its hook).
EXCLUDE = ("title",)
# This command's default where it differs from the API's (StatsConfig.chunk_rows is 512).
STATS_DEFAULTS = {"chunk_rows": 2048}
# The <title> of the page linking the sites of a run's SAEs (it marks that page as ours).
LISTING_TITLE = "<title>polysae browsers</title>"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polysae.browser import BrowseConfig, StatsConfig
    from polysae.cli.flags import add_config_flags

    p.add_argument("--sae", required=True, metavar="RUN",
                   help="a checkpoint folder, or a run folder holding one per SAE (RUN/<name>/); "
                        "one site is built per SAE")
    p.add_argument("--acts", required=True, metavar="DIR", help="harvest folder (polysae harvest)")
    p.add_argument("--out", required=True, metavar="SITE",
                   help="output folder for the site (an earlier site there is an error unless "
                        "--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier polysae site in the output folder (a folder holding "
                        "anything else is never replaced)")
    p.add_argument("--hook", help="hook to read (default: the SAE's recorded hook, else the "
                                  "harvest's only hook)")
    p.add_argument("--split", default="val", choices=("val", "all", "train"),
                   help="store split to browse (default: the held-out val shards; a one-shard "
                        "harvest has none, then all rows are used with a warning)")
    p.add_argument("--model", help="model for token text and the unembedding (default: the one "
                                   "named in the harvest manifest)")
    from polysae.data.backend import BACKENDS

    p.add_argument("--backend", default=BACKENDS[0], choices=BACKENDS,
                   help="what runs the model: transformer_lens, hf (plain transformers) or "
                        "nnsight (pip install 'polysae[nnsight]'); the browser reads its "
                        "tokenizer and unembedding (default: transformer_lens)")
    p.add_argument("--no-model", action="store_true",
                   help="do not load a model: contexts show token ids, no promoted tokens")
    p.add_argument("--report", metavar="JSON",
                   help="eval report (polysae eval's metrics.json) to link metrics to latents "
                        "(default: report.json beside the SAE, or RUN/../report/metrics.json "
                        "as `polysae run` lays it out, if present)")
    p.add_argument("--device", default=None,
                   help="device for the SAE and model (default: cuda when present, else cpu)")
    add_config_flags(p, BrowseConfig, exclude=EXCLUDE, aliases=ALIASES, title="site")
    add_config_flags(p, StatsConfig, defaults=STATS_DEFAULTS, aliases=ALIASES,
                     title="statistics")


def viewer_config(args: argparse.Namespace, cls: type):
    """A viewer's config ``cls`` (:class:`~polysae.browser.BrowseConfig` here,
    :class:`~polysae.formats.neuronpedia.NeuronpediaConfig` for ``polysae export``) from the parsed
    flags, its ``stats`` from the :class:`~polysae.browser.StatsConfig` flags; a rejected value
    is a CLIError naming the flag the user typed."""
    from polysae.browser import StatsConfig
    from polysae.cli.flags import config_error, config_from_args

    try:
        return config_from_args(args, cls, stats=config_from_args(args, StatsConfig))
    except ValueError as e:
        raise CLIError(config_error(e, args, **{cls.__name__: "", "StatsConfig": ""})) from None


def open_store(acts: Path, hook: str | None, split: str, device: str, sae=None,
               source: str = ""):
    """The unshuffled :class:`~polysae.data.store.ActivationStore` of harvest folder ``acts`` for
    ``hook`` and ``split`` (also used by ``polysae export --format neuronpedia``). A harvest with
    no held-out shards falls back from ``split="val"`` to all rows, with a warning; any other
    problem is a :class:`~polysae.cli.CLIError` naming ``--acts``, and so is a hook whose width
    is not the d_in of ``sae`` (when given; ``source`` names the SAE in that message)."""
    from polysae.data.store import ActivationStore

    if not (acts / "manifest.json").is_file():
        raise CLIError(f"--acts {acts}: not a harvest folder (no manifest.json)")
    try:
        store = ActivationStore(acts, hook, split=split, shuffle=False, device="cpu")
    except ValueError as e:
        if split != "val" or "no rows" not in str(e):
            raise CLIError(f"--acts {acts}: {e}") from e
        log.warning("%s has no held-out (val) shards; browsing all rows, which may include "
                    "the training rows", acts)
        store = ActivationStore(acts, hook, split="all", shuffle=False, device="cpu")
    if sae is not None and store.d_in != sae.cfg.d_in:
        raise CLIError(f"{source} reads d_in={sae.cfg.d_in} but --acts {acts} hook "
                       f"{store.hook!r} holds d_in={store.d_in}; pass the matching --hook")
    return store


def load_store_model(store, acts: Path, name: str | None, device: str, hint: str,
                     backend: str = "transformer_lens"):
    """``(name, model)``: the model ``name`` (``--model``), else the one the harvest manifest of
    ``store`` names, loaded on ``device`` through ``backend``. A :class:`~polysae.cli.CLIError`
    ending in ``hint`` (what the command needs the model for) when there is no name or it cannot
    be loaded."""
    mname = name or store.manifest.get("model")
    if not mname:
        raise CLIError(f"--acts {acts}: the manifest names no model; {hint}")
    from polysae.data.models import load_model

    try:
        return mname, load_model(mname, device=device, backend=backend).model
    except (ValueError, OSError) as e:
        raise CLIError(f"--model {mname!r}: cannot load it ({e}); {hint}") from e


def check_outputs(out: Path, names: list[str], overwrite: bool) -> None:
    """Check every site's folder before building any (``out``, or ``out/<name>`` per SAE with
    several): an earlier site is replaced only with ``overwrite``, anything else never. With
    several SAEs, ``out`` itself must not be one SAE's site, nor hold an ``index.html`` other than
    the page listing them (``ValueError``, as for the sites themselves)."""
    from polysae.browser import SITE_MARKER, check_site_target

    if len(names) == 1:
        check_site_target(out, overwrite)
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"browser: output {out} exists and is not a folder")
    if (out / SITE_MARKER).is_file():
        raise ValueError(f"browser: output folder {out} holds the polysae site of one SAE; the "
                         f"sites of {len(names)} SAEs go in sub-folders of it: choose another "
                         "folder")
    index = out / "index.html"
    try:
        ours = not index.exists() or LISTING_TITLE in index.read_text(errors="replace")
    except OSError:
        ours = False
    if not ours:
        raise ValueError(f"browser: output folder {out} holds an index.html that is not a "
                         "polysae page listing sites; refusing to overwrite it")
    for name in names:
        check_site_target(out / name, overwrite)


def main(args: argparse.Namespace) -> int:
    from polysae.browser import BrowseConfig, build_site
    from polysae.device import resolve_device
    from polysae.sae import load_checkpoint

    args.device = resolve_device(args.device)
    run, acts, out = Path(args.sae), Path(args.acts), Path(args.out)
    cfg = viewer_config(args, BrowseConfig)
    cks = checkpoint_folders(run, "--sae")
    check_outputs(out, [name for name, _ in cks], args.overwrite)
    model = None
    loaded_name = None
    built = []
    for name, ck in cks:
        sae, meta = load_checkpoint(ck, device=args.device)
        hook = args.hook or meta.get("hook")
        store = open_store(acts, hook, args.split, args.device, sae=sae, source=f"--sae {ck}")
        if not args.no_model and model is None:
            loaded_name, model = load_store_model(store, acts, args.model, args.device,
                                                  "pass --model or --no-model", args.backend)
        report = args.report
        if report is None:
            # `polysae run` layout: out/train/<name>/ beside out/report/metrics.json
            for cand in (ck / "report.json", run / "report.json", run / "metrics.json",
                         run.parent / "report" / "metrics.json"):
                if cand.is_file():
                    report = cand
                    break
        if report is not None and not Path(report).is_file():
            raise CLIError(f"--report {report}: no such file")
        dest = out if len(cks) == 1 else out / name
        title = f"polysae browser: {name} @ {store.hook}"
        m = {"sae": str(ck), "model": loaded_name or store.manifest.get("model"),
             "tokens_trained": meta.get("tokens_trained"), "split": store.split}
        build_site(sae, store, dest, model=model, report=report,
                   config=dataclasses.replace(cfg, title=title), meta=m, progress=True,
                   overwrite=args.overwrite)
        built.append((name, dest))
        print(f"browser for {name}: {dest / 'index.html'}")
    if len(built) > 1:
        links = "\n".join(f'<li><a href="{html.escape(n)}/index.html">{html.escape(n)}</a></li>'
                          for n, _ in built)
        page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\n<meta http-equiv="
                "\"Content-Security-Policy\" content=\"default-src 'self'\">\n"
                f"{LISTING_TITLE}</head>\n<body><h1>polysae browsers</h1><ul>\n{links}\n</ul>"
                "</body></html>\n")
        atomic_write_text(out / "index.html", page)
    return 0
