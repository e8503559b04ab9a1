"""Evaluation orchestration: reconstruction, probing F1, Wasserstein separation, interactions and
steering for one or more SAEs on the same model, hook and data, plus the report.

    from polysae import evaluate
    metrics = evaluate({"vanilla": "runs/x/vanilla", "poly": "runs/x/poly"}, out="eval/x")

Every SAE sees exactly the same held-out tokens, probing texts and steering prompts; model
activations are computed once and shared. Stages and their definitions live in the sibling modules
(reconstruction, probing, wasserstein, interactions, steering); ``report`` writes the files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from polysae.data.backend import BACKENDS
from polysae.sae import SAE


@dataclass
class EvalConfig:
    """What to evaluate and how much data to use. Defaults keep a SmolLM2 run with two small SAEs
    to ~2-3 minutes on 2 CPU cores; raise the sizes for publication-grade numbers (SAEBench:
    ``probe_train_per_class=4000, probe_test_per_class=1000, probe_ctx=128``)."""

    datasets: tuple[str, ...] = ("bbc", "tweets", "fortunes")
    """Probing datasets: bundled corpus names, local labelled .csv/.jsonl files, or (online)
    Hugging Face dataset names ``owner/name[:split]``."""
    text_column: str = "text"
    """Column/key holding the text in .csv/.jsonl files and Hugging Face datasets."""
    label_column: str = "label"
    """Column/key holding the class label in .csv/.jsonl files and Hugging Face datasets."""
    probe_train_per_class: int = 24
    """Training documents per class (positives of its one-vs-rest task)."""
    probe_test_per_class: int = 12
    """Test documents per class."""
    probe_ctx: int = 64
    """Tokens per probing text including BOS (SAEBench: 128)."""
    ks: tuple[int, ...] = (1, 2, 5)
    """Probe sparsities k (top-k latents by |mean difference|)."""
    seed: int = 0
    """Seed of the probing splits, negative sampling and live held-out document order."""
    recon_tokens: int = 8192
    """Held-out tokens for reconstruction, density and interaction statistics."""
    live_dataset: str | None = None
    """Text of the live held-out set (without an activation store) and of the CE/KL contexts
    (default: the dataset and text column the checkpoint was trained on, else ``bbc``; an
    unreadable one falls back to ``bbc``, recorded in ``held_out.text``)."""
    live_ctx: int = 64
    """Context length of live held-out contexts (each starts with BOS, which is not scored)."""
    ce_contexts: int = 16
    """Contexts (of ``live_ctx`` tokens) for CE/KL loss recovered."""
    interactions: bool = True
    """Compute co-occurrence statistics and top interacting pairs."""
    n_pairs: int = 10
    """Top pairs listed in the report (with contexts)."""
    n_pair_contexts: int = 3
    """Contexts shown per pair."""
    min_pair_count: int = 2
    """Minimum co-occurrence count for a pair to be listed."""
    steering: bool = True
    """Run the steering protocol (needs a tokenizer)."""
    alpha_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    """Steering strengths as multiples of the median hook-activation norm."""
    concepts: str | None = None
    """Steering concepts ``.jsonl`` (fields name, word_i, word_j, target, prompt; see
    :func:`polysae.evaluation.steering.load_concepts`); default: the paper's five published
    examples."""
    absorption: bool = True
    """SAEBench's first-letter feature absorption, variants ``linear`` and ``full``."""
    absorption_train_words: int = 3072
    """Training words of the absorption task (SAEBench: 80% of the single-token vocabulary,
    ~37k words for SmolLM2). On the bundled SmolLM2 at layer 9, 768 train / 256 test words
    leave 13 letters above SAEBench's ground-truth probe bar (F1 > 0.6), 1,536 / 512 leave 16 and
    3,072 / 1,024 leave 21, enough for SAEBench's minimum of 20; the word forwards cost ~70 s
    on a 2-core CPU, once for all SAEs."""
    absorption_test_words: int = 1024
    """Test words of the absorption task (SAEBench: the other 20%)."""
    absorption_icl: int = 4
    """In-context examples per absorption prompt (SAEBench: 10; 4 keeps the prompts' forward
    to ~140k tokens at the default word counts)."""
    tpp: bool = True
    """SAEBench's TPP on the probing datasets, variants ``linear`` and ``full``."""
    tpp_n_values: tuple[int, ...] = (2, 5, 10, 20, 50, 100, 500)
    """Numbers of latents TPP ablates (SAEBench's); values above d_sae are skipped."""
    saebench_batch_tokens: int = 2048
    """Batch size in tokens behind SAEBench's MSE normalisation (16 prompts x 128)."""
    dense_threshold: float = 0.1
    """Latent density above which a latent counts as dense."""
    batch_size: int = 32
    """Texts or contexts per model forward (on CPU a forward's cost is dominated by streaming
    the weights, so larger batches are nearly free)."""
    device: str | None = None
    """Device for the model and SAEs (default: cuda when present, else cpu)."""
    backend: str = field(default="transformer_lens", metadata={"choices": BACKENDS})
    """What runs the model when it is loaded by name: transformer_lens (default), hf (plain
    transformers with forward hooks) or nnsight (pip install 'polysae[nnsight]'); CE/KL splices
    and steering additions go through the same backend (see docs/evaluation.md)."""
    progress: bool = True
    """Show progress bars on stderr."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"EvalConfig.{name} {why}")

        if self.backend not in BACKENDS:
            raise bad("backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        if isinstance(self.datasets, str):
            self.datasets = (self.datasets,)
        self.datasets = tuple(d for d in self.datasets if d)
        self.ks = tuple(self.ks)
        self.alpha_scales = tuple(float(a) for a in self.alpha_scales)
        self.tpp_n_values = tuple(self.tpp_n_values)
        for name in ("recon_tokens", "probe_train_per_class", "probe_test_per_class",
                     "batch_size", "saebench_batch_tokens", "min_pair_count",
                     "absorption_train_words", "absorption_test_words", "absorption_icl"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, f"must be >= 1, got {v!r}")
        for name in ("ce_contexts", "n_pairs", "n_pair_contexts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, f"must be >= 0, got {v!r}")
        for name in ("probe_ctx", "live_ctx"):
            if getattr(self, name) < 2:
                raise bad(name, f"must be >= 2 (BOS plus a token), got {getattr(self, name)!r}")
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise bad("ks", f"must be positive integers, got {self.ks!r}")
        if self.tpp and (not self.tpp_n_values or any(
                not isinstance(n, int) or n < 1 for n in self.tpp_n_values)):
            raise bad("tpp_n_values", f"must be positive integers, got {self.tpp_n_values!r}")
        if self.steering and (not self.alpha_scales
                              or not all(math.isfinite(a) for a in self.alpha_scales)):
            raise bad("alpha_scales", f"must be finite numbers, got {self.alpha_scales!r}")
        if not 0 < self.dense_threshold <= 1:
            raise bad("dense_threshold", f"must lie in (0, 1], got {self.dense_threshold!r}")


def _bar(cfg: EvalConfig, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, file=sys.stderr, leave=False)


def _load_saes(saes: Any, device: str) -> tuple[dict[str, SAE], dict[str, dict]]:
    """Normalise SAE arguments to {name: SAE} and {name: metadata}."""
    from polysae.sae import load_checkpoint

    if isinstance(saes, (SAE, str, os.PathLike)):
        saes = {"sae": saes}
    out, meta = {}, {}
    for name, s in saes.items():
        if isinstance(s, SAE):
            out[name], meta[name] = s.to(device).eval(), {}
        else:
            out[name], meta[name] = load_checkpoint(s, device=device)
            meta[name] = dict(meta[name], path=str(s))
    if not out:
        raise ValueError("evaluate: no SAE given")
    return out, meta


def _describe(sae: SAE, meta: dict) -> dict[str, Any]:
    c = sae.cfg
    return {"path": meta.get("path"), "decoder": c.decoder, "sparsifier": c.sparsifier,
            "d_in": c.d_in, "d_sae": c.d_sae, "k": c.k,
            "ranks": list(c.ranks) if c.decoder == "poly" else None,
            "order": c.order if c.decoder == "poly" else 1,
            "params": sae.param_counts()._asdict(),
            "tokens_trained": meta.get("tokens_trained")}


def _special_ids(tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return []
    from polysae.data.chunking import special_tokens

    return sorted(special_tokens(tokenizer, "decoder").all_ids)


def _text_contexts(dataset: str, tokenizer, cfg: EvalConfig, n: int, text_column: str | None):
    """``n`` contexts of ``cfg.live_ctx`` tokens for held-out text and CE, from ``dataset`` (the
    SAE's training data by default: a bundled corpus, a local text/parquet/.npy file or an
    ``hf:`` dataset) -> (chunks, the dataset used, why it is not ``dataset`` or None). A dataset
    that cannot be read here (an ``hf:`` dataset offline, a moved file) falls back to the bundled
    ``bbc`` corpus, with a warning and the reason recorded in metrics.json."""
    from polysae.data.chunking import build_chunks

    # A seed different from harvesting's default reorders the corpus, so these contexts come
    # mostly from documents the SAE was not trained on (not guaranteed: pass --acts for a true
    # held-out split).
    kw = dict(seed=cfg.seed + 1000)
    try:
        return build_chunks(dataset, tokenizer, cfg.live_ctx, n, text_column=text_column,
                            **kw), dataset, None
    except (OSError, ValueError, ImportError) as e:
        if dataset == "bbc":
            raise
        why = f"{dataset!r} cannot be read here ({str(e).splitlines()[0][:200]})"
        logging.getLogger(__name__).warning("held-out text: %s; using the bundled bbc corpus",
                                            why)
        return build_chunks("bbc", tokenizer, cfg.live_ctx, n, **kw), "bbc", why


def _live_heldout(model, tokenizer, hook, cfg: EvalConfig, chunks, dataset: str):
    """Held-out contexts from a live model: rows of non-special tokens + token table."""
    from polysae.data.models import capture

    # 20% spare contexts: document separators (EOS) inside contexts are special and dropped.
    n_ctx = live_contexts_needed(cfg)
    special = torch.tensor(_special_ids(tokenizer), dtype=torch.long)
    rows, toks, docs = [], [], []
    bar = _bar(cfg, chunks.tokens.shape[0], "held-out activations")
    dev = model.device
    with torch.inference_mode():
        kept = 0
        for s in range(0, min(n_ctx, chunks.tokens.shape[0]), cfg.batch_size):
            if kept >= cfg.recon_tokens:
                break
            t = chunks.tokens[s:s + cfg.batch_size]
            a = capture(model, t.to(dev), [hook])[hook].float().cpu()
            keep = ~torch.isin(t, special)
            keep[:, 0] = False  # position 0 is BOS / attention sink under every BOS policy
            rows.append(a[keep])
            toks.append(t[keep])
            kept += int(keep.sum())
            # Context-local document ids keep rendered contexts from crossing contexts.
            docs.append((chunks.doc_ids[s:s + cfg.batch_size] * 100000
                         + torch.arange(s, s + t.shape[0])[:, None])[keep])
            bar.update(t.shape[0])
    bar.close()
    return (torch.cat(rows)[:cfg.recon_tokens], torch.cat(toks)[:cfg.recon_tokens],
            torch.cat(docs)[:cfg.recon_tokens], chunks.tokens[:cfg.ce_contexts],
            f"live:{dataset} (seed {cfg.seed + 1000}, ctx {cfg.live_ctx})")


def live_contexts_needed(cfg: EvalConfig) -> int:
    """Contexts to tokenise for ``cfg.recon_tokens`` held-out tokens (20% spare: document
    separators inside contexts are special tokens and dropped)."""
    return -(-cfg.recon_tokens * 6 // (5 * (cfg.live_ctx - 1))) + 1


def _store_heldout(acts: str, hook: str, cfg: EvalConfig):
    from polysae.data.store import ActivationStore

    st = ActivationStore(acts, hook, split="val", batch_size=4096, shuffle=False)
    n = min(cfg.recon_tokens, st.n_rows)
    rows = st.read_rows(0, n).float()
    info = st.tokens()
    doc = info.doc_ids[:n]
    return rows, info.token_ids[:n], doc, f"store:{acts} (split val, {n} of {st.n_rows} rows)"


def evaluate(saes: Any, *, model: Any = None, hook: str | None = None, acts: str | None = None,
             out: str | os.PathLike | None = None, config: EvalConfig | None = None,
             tokenizer: Any = None) -> dict[str, Any]:
    """Evaluate SAEs side by side and return the metrics dict (written with the report when
    ``out`` is given).

    Args:
        saes: an SAE, a checkpoint folder, or a mapping name -> SAE/folder (e.g. ``{"vanilla":
            ..., "poly": ...}``); names become the report's columns.
        model: a :class:`polysae.data.models.LoadedModel`, a backend, a HookedTransformer, or a
            model name for :func:`polysae.data.models.load_model` (run through
            ``config.backend``); default: the checkpoint metadata's ``model``.
        hook: hook name; default: the checkpoint metadata's ``hook``.
        acts: an activation store folder; its ``val`` split is the held-out set. Without it a
            small held-out set is harvested live.
        out: folder for ``metrics.json``, ``report.md`` and plots.
        config: sizes and switches (:class:`EvalConfig`).
        tokenizer: needed with a bare HookedTransformer that has none attached.
    """
    from polysae.device import resolve_device

    cfg = config or EvalConfig()
    cfg = dataclasses.replace(cfg, device=resolve_device(
        cfg.device, None if isinstance(model, str) else model))
    models, metas = _load_saes(saes, cfg.device)
    first_meta = next(iter(metas.values()))
    hook = hook or first_meta.get("hook")
    if hook is None:
        raise ValueError("evaluate: no hook given and the checkpoint metadata records none "
                         "(pass hook= / --hook)")
    if model is None:
        model = first_meta.get("model")
        if model is None:
            raise ValueError("evaluate: no model given and the checkpoint metadata records none "
                             "(pass model= / --model)")
    model_name = model if isinstance(model, str) else getattr(model, "name", None)
    from polysae.data.models import as_backend, check_hooks, load_model

    if isinstance(model, str):
        print(f"[eval] loading model {model} ({cfg.backend})", file=sys.stderr)
        model = load_model(model, device=cfg.device, backend=cfg.backend)
    model = as_backend(model, tokenizer)  # a LoadedModel, HookedTransformer, Backend, ...
    tokenizer = tokenizer or model.tokenizer
    model_name = model_name or model.model_name
    if not model.causal and (cfg.ce_contexts > 0 or cfg.steering):
        model.require_causal("CE/KL loss recovered and steering",
                             "pass --ce-contexts 0 and --no-steering (EvalConfig(ce_contexts=0, "
                             "steering=False)) to evaluate it on reconstruction and probing")
    check_hooks(model, [hook])
    width = model.hook_width(hook)
    for name, sae in models.items():
        if sae.cfg.d_in != width:
            raise ValueError(f"SAE {name!r} has d_in={sae.cfg.d_in} but hook {hook!r} of the "
                             f"model has width {width}")
    specials = _special_ids(tokenizer)
    result: dict[str, Any] = {
        "schema_version": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "polysae_version": _version(), "torch_version": torch.__version__,
        "model": model_name, "backend": model.name, "hook": hook, "device": cfg.device,
        "config": jsonable(dataclasses.asdict(cfg)),
        "saes": {n: {"info": _describe(s, metas[n])} for n, s in models.items()},
    }
    plots: dict[str, Any] = {"pairs": {}, "density": {}}
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(timings.get(stage, 0.0) + now - clock[0], 2)
        clock[0] = now

    # -- held-out activations --------------------------------------------------------------
    ds = cfg.live_dataset or first_meta.get("dataset") or "bbc"
    text_column = None if cfg.live_dataset else first_meta.get("text_column")
    text = {"dataset": None, "fallback": None}
    if acts is not None:
        rows, tok_ids, doc_ids, source = _store_heldout(acts, hook, cfg)
        ce_tokens = None
        if tokenizer is not None and cfg.ce_contexts > 0:
            chunks, text["dataset"], text["fallback"] = _text_contexts(
                ds, tokenizer, cfg, cfg.ce_contexts, text_column)
            ce_tokens = chunks.tokens
    else:
        if tokenizer is None:
            raise ValueError("evaluate: without an activation store (acts=/--acts) a tokenizer is "
                             "needed to harvest held-out text")
        chunks, text["dataset"], text["fallback"] = _text_contexts(
            ds, tokenizer, cfg, max(live_contexts_needed(cfg), cfg.ce_contexts), text_column)
        rows, tok_ids, doc_ids, ce_tokens, source = _live_heldout(model, tokenizer, hook, cfg,
                                                                  chunks, text["dataset"])
    result["held_out"] = {"source": source, "n_tokens": int(rows.shape[0]), "text": text}
    lap("held_out_activations")
    to_string = (lambda t: tokenizer.decode(t.tolist())) if tokenizer is not None else (
        lambda t: " ".join(str(int(v)) for v in t))

    from polysae.evaluation import interactions as inter
    from polysae.evaluation.reconstruction import (
        ce_recovered_many,
        reconstruction_stats,
        stats_dict,
    )

    ces: dict[str, Any] = {}
    if ce_tokens is not None and cfg.ce_contexts > 0:
        print("[eval] CE/KL loss recovered", file=sys.stderr)
        bar = _bar(cfg, ce_tokens.shape[0], "CE/KL contexts")
        ces = ce_recovered_many(
            model, hook, ce_tokens,
            {n: (lambda a, s=s: s(a.to(s.W_enc.dtype))) for n, s in models.items()},
            specials, batch_size=cfg.batch_size, progress=bar.update)
        bar.close()
        lap("ce_kl")

    for name, sae in models.items():
        print(f"[eval] {name}: reconstruction", file=sys.stderr)
        st = reconstruction_stats(sae, torch.split(rows, 4096),
                                  saebench_batch_tokens=cfg.saebench_batch_tokens,
                                  dense_threshold=cfg.dense_threshold)
        ce = ces.get(name)
        result["saes"][name]["reconstruction"] = stats_dict(st, ce, cfg.saebench_batch_tokens,
                                                            cfg.dense_threshold)
        plots["density"][name] = st.density
        lap("reconstruction")
        if cfg.interactions:
            print(f"[eval] {name}: interactions", file=sys.stderr)
            ps = inter.cooccurrence(sae, torch.split(rows, 4096))
            strength = None
            is_poly = sae.cfg.decoder == "poly" and sae.cfg.order >= 2
            if is_poly:
                strength = inter.pair_strength(sae, ps.i, ps.j)
            block = inter.correlations(ps, strength)
            pairs = inter.top_pairs(sae, None, n=cfg.n_pairs, min_count=cfg.min_pair_count,
                                    stats=ps)
            ctx_rows = inter.top_pair_rows(sae, torch.split(rows, 4096), pairs,
                                           n=cfg.n_pair_contexts)
            block["definition"] = ("polysae's own (the paper publishes no code): strength = "
                                   "|lambda2|*||B_ij||, N_ij = held-out tokens with both latents "
                                   "active, cov = Cov(z_i, z_j)")
            block["top_pairs"] = [
                dict(p._asdict(), contexts=[inter.render_context(tok_ids, doc_ids, r, to_string)
                                            for r, _ in rr])
                for p, rr in zip(pairs, ctx_rows)]
            result["saes"][name]["interactions"] = jsonable(block)
            plots["pairs"][name] = (ps.count, strength if strength is not None else ps.cov,
                                    "strength" if is_poly else "cov")
            lap("interactions")

    # -- probing ------------------------------------------------------------------------------
    probing_acts: dict[str, tuple] = {}
    if cfg.datasets:
        if tokenizer is None:
            raise ValueError("evaluate: probing needs a tokenizer (set datasets=() to skip)")
        from polysae.evaluation.probing_stage import run_probing

        probing_acts = run_probing(models, model, tokenizer, hook, cfg, specials, result)
        lap("probing")

    # -- SAEBench absorption and TPP, variants linear and full --------------------------------
    if cfg.absorption or cfg.tpp:
        from polysae.evaluation.saebench_metrics import run as saebench_metrics

        saebench_metrics(models, model, tokenizer, hook, cfg, probing_acts, result)
        lap("absorption_tpp")

    # -- steering -----------------------------------------------------------------------------
    if cfg.steering and tokenizer is not None:
        from polysae.evaluation.steering import DEFAULT_CONCEPTS, load_concepts, steering_eval

        concepts = DEFAULT_CONCEPTS if cfg.concepts is None else load_concepts(cfg.concepts)
        print("[eval] steering", file=sys.stderr)
        bar = _bar(cfg, len(concepts), "steering concepts")
        result["steering"] = steering_eval(model, hook, models, concepts=concepts,
                                           alpha_scales=cfg.alpha_scales, progress=bar.update)
        bar.close()
        lap("steering")
    from polysae.evaluation.saebench import decoder_norm_warnings
    decoder_norm_warnings(result, models)  # saes.*.decoder_norms; warnings for W_dec metrics
    result["timings_s"] = timings

    if out is not None:
        from polysae.evaluation.report import write_report

        write_report(result, out, plots)
    return result


def _version() -> str:
    from polysae.version import __version__

    return __version__


def jsonable(x: Any) -> Any:
    """Tuples -> lists, tensors -> lists, NaN -> None, recursively (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


__all__ = ["EvalConfig", "evaluate", "jsonable"]
