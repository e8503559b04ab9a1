"""Neuronpedia export (polysae.formats.neuronpedia, ``polysae export --format neuronpedia``) over a
tiny random HookedTransformer's harvested activations: top activations against a brute-force top-k
of the dense codes, densities against numpy, logit effects against the dense atom @ W_U,
interaction pairs against co-occurrence counted from the dense codes and ||C2 (u_i * u_j)||
computed in numpy, the token text against the tokenizer's own decode, and the JSON keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.browser import StatsConfig
from polysae.formats.neuronpedia import (
    ACTIVATION_KEYS,
    FEATURE_KEYS,
    NeuronpediaConfig,
    count_prompts,
    export_neuronpedia,
    logit_effects,
)

HOOK = "blocks.0.hook_resid_post"
L, R, T = 3, 2, 4


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    from test_harvest import word_tokenizer  # a real fast tokenizer over a word vocabulary
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from polysae.data.harvesting import HarvestConfig, harvest

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=len(tok), act_fn="gelu",
        seed=0)).eval()
    model.tokenizer = tok  # set after construction: TL's tokenizer set-up wants a hub name
    root = tmp_path_factory.mktemp("np")
    txt = root / "docs.txt"
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran far away big red sun".split()
    txt.write_text("\n".join(" ".join(rng.choice(words, size=7)) for _ in range(50)) + "\n")
    acts = root / "acts"
    harvest(HarvestConfig(model="tiny-words", hooks=[HOOK], dataset=str(txt), tokens=320,
                          ctx=16, out=str(acts), dtype="float32", progress=False,
                          shard_size=100), model=model)
    torch.manual_seed(1)
    poly = SAE(SAEConfig(d_in=32, d_sae=40, k=3, ranks=(32, 8, 8))).eval()
    with torch.no_grad():
        poly.b_enc.normal_(0, 0.05)
    ck = root / "poly"
    poly.save(ck, metadata={"hook": HOOK, "model": "tiny-words"})
    lin = SAE(SAEConfig(d_in=32, d_sae=20, k=3, decoder="linear")).eval()
    lin.save(root / "vanilla", metadata={"hook": HOOK})
    return model, tok, acts, ck, root / "vanilla"


def _store(acts):
    from polysae.data.store import ActivationStore

    return ActivationStore(acts, split="all", shuffle=False)


def _batches(out: Path) -> list[dict]:
    files = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in files]


def _window(info, row):
    """Rows of the window around ``row`` inside its document and forward context."""
    n = info.token_ids.numel()
    return [q for q in range(row - L, row + R + 1)
            if 0 <= q < n and info.doc_ids[q] == info.doc_ids[row]
            and info.positions[q] - info.positions[row] == q - row]


def _matches_a_tied_row(a, info, tok, z_col, row, values_of):
    """The exported window ``a`` is the window of ``row`` or of a row with the same activation
    (the first tokens of contexts that start alike give identical activations: a true tie)."""
    tied = np.flatnonzero(np.abs(z_col - z_col[row]) < 1e-6)
    for q in tied:
        rows = _window(info, int(q))
        if ("".join(a["tokens"]) == tok.decode([int(info.token_ids[r]) for r in rows])
                and len(a["tokens"]) == len(rows) and rows[a["maxValueTokenIndex"]] == q
                and all(np.allclose(a[k], v(rows), atol=1e-3) for k, v in values_of.items())):
            return True
    return False


def test_feature_batches_match_dense_references(harvested, tmp_path):
    from polysae.sae import load_checkpoint

    model, tok, acts, ck, _ = harvested
    sae, _ = load_checkpoint(ck)
    store = _store(acts)
    cfg = NeuronpediaConfig(features_per_batch=10, n_pairs=0,
                            stats=StatsConfig(n_contexts=T, left=L, right=R, chunk_rows=37,
                                              n_logit_tokens=5))
    res = export_neuronpedia(sae, store, tmp_path / "np", model=model, config=cfg,
                             meta={"model": "tiny-words"})
    assert (res.n_batches, res.n_features, res.n_pairs) == (4, 40, 0)
    batches = _batches(tmp_path / "np")
    assert len(batches) == 4
    for b in batches:
        assert set(b) == {"model_id", "layer", "sae_set", "features"}
        assert (b["model_id"], b["layer"], b["sae_set"]) == ("tiny-words", 0, "polysae-poly")
    feats = [f for b in batches for f in b["features"]]
    assert [f["feature_index"] for f in feats] == list(range(40))
    x = store.read_rows(0, store.n_rows)
    info = store.tokens()
    with torch.no_grad():
        z = sae.encode(x).numpy().astype(np.float64)
    # dense reference for the logit effects: the linear atom U C1^T of each latent through W_U
    U = sae.decoder.U.detach().double().numpy()
    C1 = sae.decoder.C1.detach().double().numpy()
    lg = (U @ C1.T) @ model.W_U.detach().double().numpy()  # [F, vocab]
    density = (z > 0).mean(0)
    n_ctx = 1 + int((info.positions[1:] != info.positions[:-1] + 1).sum())
    fired = 0
    for f, feat in enumerate(feats):
        assert tuple(feat) == FEATURE_KEYS
        assert feat["frac_nonzero"] == pytest.approx(density[f], abs=1e-12)
        assert sum(feat["freq_hist_data_bar_heights"]) == int((z[:, f] > 0).sum())
        assert feat["n_prompts_total"] == n_ctx and feat["n_tokens_in_prompt"] == 16
        up = np.argsort(-lg[f], kind="stable")[:5]
        dn = np.argsort(lg[f], kind="stable")[:5]
        np.testing.assert_allclose(feat["pos_values"], lg[f, up], atol=2e-3)
        np.testing.assert_allclose(feat["neg_values"], lg[f, dn], atol=2e-3)
        assert feat["pos_str"] == [tok.decode([int(t)]) for t in up]
        assert feat["neg_str"] == [tok.decode([int(t)]) for t in dn]
        assert sum(feat["logits_hist_data_bar_heights"]) == lg.shape[1]
        assert feat["neuron_alignment_indices"] == np.argsort(
            -np.abs(U[f] @ C1.T), kind="stable")[:3].tolist()
        # top activations: brute-force top-k of the dense codes
        pos = np.flatnonzero(z[:, f] > 0)
        order = pos[np.argsort(-z[pos, f], kind="stable")][:T]
        assert len(feat["activations"]) == len(order)
        fired += len(order) > 0
        for a, row in zip(feat["activations"], order):
            assert tuple(a) == ACTIVATION_KEYS
            assert a["maxValue"] == pytest.approx(z[row, f], abs=1e-3)
            assert (a["bin_min"], a["bin_contains"]) == (-1, -1)
            assert a["bin_max"] == pytest.approx(z[order[0], f], abs=1e-3)
            assert len(a["tokens"]) == len(a["values"])
            assert _matches_a_tied_row(a, info, tok, z[:, f], int(row),
                                       {"values": lambda rows, f=f: z[rows, f]})
    assert fired >= 10  # the planted store really exercises the top activations
    settings = json.loads((tmp_path / "np" / "run_settings.json").read_text())
    assert settings["n_rows"] == store.n_rows and settings["interactions"] is None
    # the flat config record, keys in the order of before the stats settings were nested
    assert list(settings["config"].items()) == [
        ("features_per_batch", 10), ("n_contexts", T), ("left", L), ("right", R),
        ("n_logit_tokens", 5), ("logit_hist_bins", 32), ("hist_bins", 48), ("hist_lo", -3.0),
        ("hist_hi", 3.0), ("n_alignment", 3), ("n_pairs", 0), ("min_pair_count", 2),
        ("n_pair_contexts", 10), ("chunk_rows", 37), ("sae_set", None), ("decimals", 3)]
    assert not (tmp_path / "np" / "interactions.json").exists()


def test_interaction_pairs_match_brute_force(harvested, tmp_path):
    from polysae.sae import load_checkpoint

    model, tok, acts, ck, _ = harvested
    sae, _ = load_checkpoint(ck)
    store = _store(acts)
    n_pairs, min_count = 6, 2
    cfg = NeuronpediaConfig(n_pairs=n_pairs, min_pair_count=min_count,
                            stats=StatsConfig(n_contexts=2, left=L, right=R, n_pair_contexts=3,
                                              n_logit_tokens=4))
    res = export_neuronpedia(sae, store, tmp_path / "np", model=model, config=cfg)
    doc = json.loads((tmp_path / "np" / "interactions.json").read_text())
    assert res.n_pairs == len(doc["pairs"]) == n_pairs
    x = store.read_rows(0, store.n_rows)
    info = store.tokens()
    with torch.no_grad():
        z = sae.encode(x).numpy().astype(np.float64)
    on = (z > 0).astype(np.int64)
    N = on.T @ on  # co-occurrence of every pair
    U = sae.decoder.U.detach().double().numpy()
    C2 = sae.decoder.C2.detach().double().numpy()
    lam = float(sae.decoder.lambda2.detach())
    r2 = C2.shape[1]
    F_ = z.shape[1]
    cand = [(abs(lam) * np.linalg.norm(C2 @ (U[i, :r2] * U[j, :r2])), i, j)
            for i in range(F_) for j in range(i + 1, F_) if N[i, j] >= min_count]
    cand.sort(key=lambda c: -c[0])
    assert doc["lambda2"] == pytest.approx(lam)
    W_U = model.W_U.detach().double().numpy()
    for p, (s, i, j) in zip(doc["pairs"], cand[:n_pairs]):
        assert (p["feature_a"], p["feature_b"]) == (i, j)
        assert p["strength"] == pytest.approx(s, rel=1e-4)
        assert p["cooccurrence"] == N[i, j]
        lg = lam * (C2 @ (U[i, :r2] * U[j, :r2])) @ W_U
        np.testing.assert_allclose(p["pos_values"], np.sort(lg)[::-1][:4], atol=2e-3)
        prod = z[:, i] * z[:, j]
        order = np.argsort(-prod, kind="stable")[:3]
        order = order[prod[order] > 0]
        assert [a["maxValue"] for a in p["activations"]] == pytest.approx(prod[order], abs=1e-3)
        for a, row in zip(p["activations"], order):
            assert _matches_a_tied_row(a, info, tok, prod, int(row), {
                "values_a": lambda rows, i=i: z[rows, i], "values_b": lambda rows, j=j: z[rows, j],
                "values": lambda rows, i=i, j=j: z[rows, i] * z[rows, j]})
    assert json.loads((tmp_path / "np" / "run_settings.json").read_text())["interactions"] == \
        "interactions.json"


def test_logit_effects_and_prompt_count_vs_numpy(gen):
    d = torch.randn(7, 5, generator=gen)
    W = torch.randn(5, 30, generator=gen)
    eff = logit_effects(d, W, 4, 6, block=3)
    lg = d.double().numpy() @ W.double().numpy()
    np.testing.assert_allclose(eff.up_vals.numpy(), -np.sort(-lg, 1)[:, :4], atol=1e-5)
    np.testing.assert_array_equal(eff.down_ids.numpy(), np.argsort(lg, 1)[:, :4])
    for m in range(7):
        h, edges = np.histogram(lg[m], bins=6)
        np.testing.assert_array_equal(eff.hist_heights[m].numpy(), h)
        np.testing.assert_allclose(eff.hist_values[m].numpy(), (edges[1:] + edges[:-1]) / 2,
                                   atol=1e-5)
    assert count_prompts(torch.tensor([1, 2, 3, 0, 1, 2, 5, 6]), 8) == 3


def test_linear_sae_and_bad_inputs(harvested, tmp_path):
    from polysae.formats.neuronpedia import export_neuronpedia_from_rows
    from polysae.sae import load_checkpoint

    model, tok, acts, _, vanilla = harvested
    sae, _ = load_checkpoint(vanilla)
    store = _store(acts)
    res = export_neuronpedia(sae, store, tmp_path / "v", model=model,
                             config=NeuronpediaConfig(stats=StatsConfig(n_contexts=2)))
    assert res.n_pairs == 0 and not (tmp_path / "v" / "interactions.json").exists()
    feats = _batches(tmp_path / "v")[0]["features"]
    with torch.no_grad():
        lg = sae.decoder.W_dec.double() @ model.W_U.double()
    assert feats[3]["pos_values"] == pytest.approx(lg[3].topk(10).values.tolist(), abs=2e-3)
    x = store.read_rows(0, 4)
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        export_neuronpedia_from_rows(sae, lambda a, b: x[a:b], 4, tmp_path / "e",
                                     token_ids=ids, tokenizer=None, W_U=model.W_U)
    with pytest.raises(ValueError, match="unembedding W_U is needed"):
        export_neuronpedia_from_rows(sae, lambda a, b: x[a:b], 4, tmp_path / "e",
                                     token_ids=ids, tokenizer=tok, W_U=None)
    with pytest.raises(ValueError, match=r"W_U has shape \(5, 3\)"):
        export_neuronpedia_from_rows(sae, lambda a, b: x[a:b], 4, tmp_path / "e",
                                     token_ids=ids, tokenizer=tok, W_U=torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"token_ids has shape \(3,\)"):
        export_neuronpedia_from_rows(sae, lambda a, b: x[a:b], 4, tmp_path / "e",
                                     token_ids=ids[:3], tokenizer=tok, W_U=model.W_U)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a polysae Neuronpedia export"):
        export_neuronpedia(sae, store, foreign, model=model)
    assert (foreign / "keep.txt").read_text() == "mine"
    # a second export replaces the first in place
    export_neuronpedia(sae, store, tmp_path / "v", model=model,
                       config=NeuronpediaConfig(features_per_batch=5,
                                                stats=StatsConfig(n_contexts=1)))
    assert len(_batches(tmp_path / "v")) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="StatsConfig.n_contexts must be >= 1"):
        NeuronpediaConfig(stats=StatsConfig(n_contexts=0))
    with pytest.raises(ValueError, match="NeuronpediaConfig.min_pair_count must be >= 1"):
        NeuronpediaConfig(min_pair_count=0)


def test_cli_export_neuronpedia(harvested, tmp_path, monkeypatch, capsys):
    import polysae.data.models as models

    model, tok, acts, ck, _ = harvested

    class Loaded:
        def __init__(self, m):
            self.model = m

    def fake_load(name, device="cpu", dtype=None):
        if name != "tiny-words":
            raise ValueError(f"unknown model {name!r}")
        return Loaded(model)

    monkeypatch.setattr(models, "load_model", fake_load)
    out = tmp_path / "np"
    assert cli_main(["export", str(ck), str(out), "--format", "neuronpedia", "--acts", str(acts),
                     "--split", "all", "--contexts", "3", "--pairs", "5",
                     "--features-per-batch", "8", "--no-progress"]) == 0
    assert "40 features in 5 batch file(s)" in capsys.readouterr().out
    b = _batches(out)
    assert len(b) == 5 and b[0]["model_id"] == "tiny-words"
    assert len(json.loads((out / "interactions.json").read_text())["pairs"]) == 5
    assert cli_main(["export", str(ck), str(tmp_path / "x"), "--format", "neuronpedia"]) == 2
    assert "needs --acts" in capsys.readouterr().err
    assert cli_main(["export", str(ck), str(tmp_path / "x"), "--format", "neuronpedia",
                     "--acts", str(acts), "--model", "nope"]) == 2
    assert "cannot load it" in capsys.readouterr().err
    assert cli_main(["export", str(ck), str(tmp_path / "x"), "--format", "neuronpedia",
                     "--acts", str(tmp_path)]) == 2
    assert not (tmp_path / "x").exists()


def test_store_requirements_are_named(harvested, tmp_path):
    from polysae.sae import load_checkpoint

    model, _, acts, _, vanilla = harvested
    sae, _ = load_checkpoint(vanilla)
    real = _store(acts)

    class Stub:
        d_in, n_rows, manifest, path = real.d_in, real.n_rows, real.manifest, "stub"

        def __init__(self, hook, has_tokens=True):
            self.hook, self.has_tokens = hook, has_tokens

        def read_rows(self, a, b):
            return real.read_rows(a, b)

        def tokens(self):
            if not self.has_tokens:
                raise FileNotFoundError("no tokens/ shards")
            return real.tokens()

    with pytest.raises(ValueError, match="hook blocks.0.attn.hook_z is not in the residual"):
        export_neuronpedia(sae, Stub("blocks.0.attn.hook_z"), tmp_path / "a", model=model)
    with pytest.raises(ValueError, match="has no token ids .*no tokens/ shards"):
        export_neuronpedia(sae, Stub(HOOK, has_tokens=False), tmp_path / "b", model=model)
    wide = SAE(SAEConfig(d_in=8, d_sae=16, k=2, decoder="linear"))
    with pytest.raises(ValueError, match="holds d_in=32 activations but the SAE expects d_in=8"):
        export_neuronpedia(wide, real, tmp_path / "c", model=model)
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
