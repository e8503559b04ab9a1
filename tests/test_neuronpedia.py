"""Neuronpedia export (polysae.formats.neuronpedia, ``polysae export --format neuronpedia``) over a
tiny random HookedTransformer's harvested activations, checked against references computed here from
the dense codes of the SAE on every row: top activations against a brute-force top-k, densities
and the activation histograms (50 linear bins over each feature's own range, torch.histc) against
numpy / torch, the neuron alignment against the signed atom, logit effects against the dense atom @
W_U, interaction pairs against co-occurrence counted from the dense codes, the token text against
the tokenizer's own decode; special tokens (BOS / EOS) masked by default.

The real consumers: every batch file is loaded through SAEDashboard 0.8.0's own
``NeuronpediaDashboardBatch`` in its virtualenv (tests/peers.py), the upload bodies are rebuilt with
the neuronpedia 1.2.1 client's own types and ``FeatureRequest.upload_batch`` in its virtualenv;
and, in our own words, every key Neuronpedia's converter
(``convert-saedashboard-to-neuronpedia-export.py``) reads is checked for presence and type, with
the maximum it derives from ``values`` checked against the dense window maximum."""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peers import run_peer

from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.browser import StatsConfig
from polysae.formats.neuronpedia import (
    ACTIVATION_KEYS,
    BATCH_KEYS,
    FEATURE_KEYS,
    SETTINGS_FILE,
    NeuronpediaConfig,
    count_prompts,
    export_neuronpedia,
    logit_effects,
    upload_plan,
)

HOOK = "blocks.0.hook_resid_post"
L, R, T = 3, 2, 4
BOS_LATENT, DEAD_LATENT = 9, 5


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
    # bos="chunk" (the default): every context starts with <bos>, documents end with <eos>
    harvest(HarvestConfig(model="tiny-words", hooks=[HOOK], dataset=str(txt), tokens=320,
                          ctx=16, out=str(acts), dtype="float32", progress=False,
                          shard_size=100), model=model)
    store = _store(acts)
    x = store.read_rows(0, store.n_rows)
    bos = store.tokens().token_ids == tok.bos_token_id
    assert bos.sum() >= 10
    torch.manual_seed(1)
    poly = SAE(SAEConfig(d_in=32, d_sae=40, k=3, ranks=(32, 8, 8))).eval()
    with torch.no_grad():
        poly.b_enc.normal_(0, 0.05)
        # latent 9 reads the <bos> direction: its largest activations are on <bos> (the case of
        # the issue), and it fires on some ordinary tokens too
        d = x[bos].mean(0) - poly.b_dec
        poly.W_enc[:, BOS_LATENT] = 3 * d / d.norm() ** 2
        poly.b_enc[BOS_LATENT] = -1.0
        poly.b_enc[DEAD_LATENT] = -1e4  # never fires
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


def _dense(sae, store, tok, include_special=False):
    """Dense codes [rows, F] of every row, the rows of <bos>/<eos>/<pad> zeroed unless
    ``include_special``; and the special-row mask."""
    x = store.read_rows(0, store.n_rows)
    ids = store.tokens().token_ids.numpy()
    with torch.no_grad():
        z = sae.encode(x).numpy().astype(np.float64)
    special = np.isin(ids, [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id])
    if not include_special:
        z[special] = 0.0
    return z, special


def _window(info, row):
    """Rows of the window around ``row`` inside its document and forward context."""
    n = info.token_ids.numel()
    return [q for q in range(row - L, row + R + 1)
            if 0 <= q < n and info.doc_ids[q] == info.doc_ids[row]
            and info.positions[q] - info.positions[row] == q - row]


def _rows_of(a, info, tok, z_col, row, values_of):
    """The rows of the exported window ``a``: the window of ``row`` or of a row with the same
    activation (the first tokens of contexts that start alike give identical activations: a true
    tie), its selected token (``qualifying_token_index``) on that row; None when none matches."""
    tied = np.flatnonzero(np.abs(z_col - z_col[row]) < 1e-6)
    for q in tied:
        rows = _window(info, int(q))
        if ("".join(a["tokens"]) == tok.decode([int(info.token_ids[r]) for r in rows])
                and len(a["tokens"]) == len(rows) and rows[a["qualifying_token_index"]] == q
                and all(np.allclose(a[k], v(rows), atol=1e-3) for k, v in values_of.items())):
            return rows
    return None


def _pair_rows(a, info, tok, z_col, row, values_of):
    """As :func:`_rows_of` for interactions.json, whose windows mark the selected token with
    ``maxValueTokenIndex``."""
    return _rows_of({**a, "qualifying_token_index": a["maxValueTokenIndex"]}, info, tok, z_col,
                    row, values_of)


def _export(harvested, out, **cfg):
    from polysae.sae import load_checkpoint

    model, tok, acts, ck, _ = harvested
    sae, _ = load_checkpoint(ck)
    store = _store(acts)
    stats = dict(n_contexts=T, left=L, right=R, chunk_rows=37, n_logit_tokens=5, hist_bins=50)
    stats.update(cfg.pop("stats", {}))
    config = NeuronpediaConfig(**{"features_per_batch": 10, "n_pairs": 0, **cfg},
                               stats=StatsConfig(**stats))
    res = export_neuronpedia(sae, store, out, model=model, config=config,
                             meta={"model": "tiny-words"})
    return sae, store, res


def test_feature_batches_match_dense_references(harvested, tmp_path):
    model, tok, acts, ck, _ = harvested
    sae, store, res = _export(harvested, tmp_path / "np", sae_id_suffix="l0med")
    assert (res.n_batches, res.n_features, res.n_pairs) == (4, 40, 0)
    batches = _batches(tmp_path / "np")
    assert len(batches) == 4
    for b in batches:
        assert tuple(b) == BATCH_KEYS
        assert (b["model_id"], b["layer"], b["sae_set"], b["sae_id_suffix"]) == (
            "tiny-words", 0, "polysae-poly", "l0med")
    feats = [f for b in batches for f in b["features"]]
    assert [f["feature_index"] for f in feats] == list(range(40))
    info = store.tokens()
    z, special = _dense(sae, store, tok)
    assert res.n_masked == int(special.sum()) > 0
    # dense reference for the logit effects: the linear atom U C1^T of each latent through W_U
    U = sae.decoder.U.detach().double().numpy()
    C1 = sae.decoder.C1.detach().double().numpy()
    atoms = U @ C1.T
    lg = atoms @ model.W_U.detach().double().numpy()  # [F, vocab]
    density = (z > 0).sum(0) / (~special).sum()  # over the counted (non-special) tokens
    n_ctx = 1 + int((info.positions[1:] != info.positions[:-1] + 1).sum())
    fired = 0
    dead = []
    for f, feat in enumerate(feats):
        assert tuple(feat) == FEATURE_KEYS
        assert feat["vector"] == []
        assert feat["frac_nonzero"] == pytest.approx(density[f], abs=1e-12)
        # SAEDashboard's histogram: 50 linear bins over the feature's own [min, max] of its
        # nonzero activations (torch.histc), centres min + (i + 1/2) width; empty when dead
        nz = z[:, f][z[:, f] > 0]
        if nz.size == 0:
            dead.append(f)
            assert feat["freq_hist_data_bar_values"] == feat["freq_hist_data_bar_heights"] == []
            assert feat["activations"] == []
        else:
            ref = torch.histc(torch.tensor(nz, dtype=torch.float32), bins=50).long().numpy()
            got = np.array(feat["freq_hist_data_bar_heights"])
            assert got.sum() == nz.size and np.abs(got - ref).sum() <= 2, (f, got, ref)
            lo, hi = nz.min(), nz.max()
            centres = lo + (np.arange(50) + 0.5) * (hi - lo) / 50
            np.testing.assert_allclose(feat["freq_hist_data_bar_values"], centres, atol=1.5e-3)
        assert feat["n_prompts_total"] == n_ctx and feat["n_tokens_in_prompt"] == 16
        up = np.argsort(-lg[f], kind="stable")[:5]
        dn = np.argsort(lg[f], kind="stable")[:5]
        np.testing.assert_allclose(feat["pos_values"], lg[f, up], atol=2e-3)
        np.testing.assert_allclose(feat["neg_values"], lg[f, dn], atol=2e-3)
        assert feat["pos_str"] == [tok.decode([int(t)]) for t in up]
        assert feat["neg_str"] == [tok.decode([int(t)]) for t in dn]
        assert sum(feat["logits_hist_data_bar_heights"]) == lg.shape[1]
        # as SAEDashboard: the three largest signed entries, |value| / L1 norm
        big = np.argsort(-atoms[f], kind="stable")[:3]
        assert feat["neuron_alignment_indices"] == big.tolist()
        np.testing.assert_allclose(feat["neuron_alignment_values"], atoms[f, big], atol=1e-3)
        np.testing.assert_allclose(feat["neuron_alignment_l1"],
                                   np.abs(atoms[f, big]) / np.abs(atoms[f]).sum(), atol=1e-3)
        # top activations: brute-force top-k of the dense codes, special rows excluded
        pos = np.flatnonzero(z[:, f] > 0)
        order = pos[np.argsort(-z[pos, f], kind="stable")][:T]
        assert len(feat["activations"]) == len(order)
        fired += len(order) > 0
        for a, row in zip(feat["activations"], order):
            assert tuple(a) == ACTIVATION_KEYS
            assert (a["bin_min"], a["bin_contains"]) == (-1, -1)
            assert a["bin_max"] == pytest.approx(z[order[0], f], abs=1e-3)
            assert len(a["tokens"]) == len(a["values"])
            rows = _rows_of(a, info, tok, z[:, f], int(row),
                            {"values": lambda rows, f=f: z[rows, f]})
            assert rows is not None, (f, a)
            assert not special[rows[a["qualifying_token_index"]]]
            # special tokens in the window show 0
            assert all(a["values"][w] == 0 for w, q in enumerate(rows) if special[q])
    assert fired >= 10  # the planted store really exercises the top activations
    assert DEAD_LATENT in dead and res.n_dead == len(dead)
    assert not (tmp_path / "np" / "run_settings.json").exists()  # SAEDashboard's name
    settings = json.loads((tmp_path / "np" / SETTINGS_FILE).read_text())
    assert settings["n_rows"] == store.n_rows and settings["interactions"] is None
    assert settings["n_rows_masked"] == special.sum()
    assert settings["source_id"] == "0-polysae-poly__l0med"
    assert settings["special_tokens_masked"] == {"0": "<bos>", "1": "<eos>", "2": "<pad>"}
    # the flat config record, keys in the order of before the stats settings were nested
    assert list(settings["config"].items()) == [
        ("features_per_batch", 10), ("n_contexts", T), ("left", L), ("right", R),
        ("n_logit_tokens", 5), ("logit_hist_bins", 32), ("hist_bins", 50), ("hist_lo", -3.0),
        ("hist_hi", 3.0), ("n_alignment", 3), ("n_pairs", 0), ("min_pair_count", 2),
        ("n_pair_contexts", 10), ("chunk_rows", 37), ("sae_set", None), ("decimals", 3),
        ("sae_id_suffix", "l0med"), ("include_special", False), ("upload", False)]
    assert not (tmp_path / "np" / "interactions.json").exists()
    assert NeuronpediaConfig().stats.hist_bins == 50  # SAEDashboard's default


def test_special_tokens_masked_by_default_and_included_on_request(harvested, tmp_path):
    """The planted <bos> latent: its top example is <bos> only with include_special."""
    _, tok, *_ = harvested
    sae, store, res = _export(harvested, tmp_path / "in", include_special=True)
    assert res.n_masked == 0
    z, special = _dense(sae, store, tok, include_special=True)
    feat = _batches(tmp_path / "in")[0]["features"][BOS_LATENT]
    top = feat["activations"][0]
    assert top["tokens"][top["qualifying_token_index"]] == "<bos>"
    assert top["bin_max"] == pytest.approx(z[:, BOS_LATENT].max(), abs=1e-3)
    assert feat["frac_nonzero"] == pytest.approx((z[:, BOS_LATENT] > 0).mean(), abs=1e-12)
    _, _, res = _export(harvested, tmp_path / "out")
    feat = _batches(tmp_path / "out")[0]["features"][BOS_LATENT]
    zm, _ = _dense(sae, store, tok)
    assert 0 < len(feat["activations"])  # it also fires on ordinary tokens
    for a in feat["activations"]:
        assert a["tokens"][a["qualifying_token_index"]] not in ("<bos>", "<eos>", "<pad>")
        assert all(v == 0 for t, v in zip(a["tokens"], a["values"]) if t in ("<bos>", "<eos>"))
    assert feat["activations"][0]["bin_max"] == pytest.approx(zm[:, BOS_LATENT].max(), abs=1e-3)
    assert zm[:, BOS_LATENT].max() < z[:, BOS_LATENT].max()


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _num_list(v) -> bool:
    return isinstance(v, list) and all(_is_num(x) for x in v)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# What Neuronpedia's converter reads from each feature of a batch (it indexes them directly, so a
# missing one is a KeyError), with the type each must have.
CONVERTER_FEATURE_READS = {
    "feature_index": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "neuron_alignment_indices": lambda v: isinstance(v, list) and all(
        isinstance(x, int) for x in v),
    "neuron_alignment_values": _num_list, "neuron_alignment_l1": _num_list,
    "correlated_neurons_indices": lambda v: isinstance(v, list),
    "correlated_neurons_pearson": _num_list, "correlated_neurons_l1": _num_list,
    "correlated_features_indices": lambda v: isinstance(v, list),
    "correlated_features_pearson": _num_list, "correlated_features_l1": _num_list,
    "neg_str": _str_list, "neg_values": _num_list, "pos_str": _str_list, "pos_values": _num_list,
    "frac_nonzero": _is_num,
    "freq_hist_data_bar_heights": _num_list, "freq_hist_data_bar_values": _num_list,
    "logits_hist_data_bar_heights": _num_list, "logits_hist_data_bar_values": _num_list,
    "decoder_weights_dist": _num_list, "activations": lambda v: isinstance(v, list),
    # optional for the converter, but without it a converted feature gets no hook name
    "vector": _num_list,
}
CONVERTER_ACTIVATION_READS = {
    "tokens": _str_list, "values": lambda v: _num_list(v) and len(v) > 0,  # max() of it
    "bin_contains": _is_num, "bin_max": _is_num, "bin_min": _is_num,
    "qualifying_token_index": lambda v: isinstance(v, int) and not isinstance(v, bool),
}


def test_converter_reads_every_key_and_its_max_is_the_dense_window_max(harvested, tmp_path):
    """In our own words, what convert-saedashboard-to-neuronpedia-export.py does with a batch:
    the batch's ``sae_id_suffix`` (str or null), ``layer``, ``model_id``; per feature the keys
    above; per activation the keys above, with ``maxValue = max(values)`` and
    ``maxValueTokenIndex = values.index(maxValue)`` computed from ``values``. That maximum must be
    the window's dense maximum (special tokens zeroed), computed here from the SAE's codes."""
    model, tok, *_ = harvested
    sae, store, _ = _export(harvested, tmp_path / "np", stats={"n_contexts": 6})
    info = store.tokens()
    z, special = _dense(sae, store, tok)
    n_windows = off_centre = 0
    for b in _batches(tmp_path / "np"):
        assert "sae_id_suffix" in b and (b["sae_id_suffix"] is None
                                         or isinstance(b["sae_id_suffix"], str))
        assert isinstance(b["layer"], int) and isinstance(b["model_id"], str)
        assert isinstance(b["features"], list)
        for feat in b["features"]:
            for k, ok in CONVERTER_FEATURE_READS.items():
                assert k in feat and ok(feat[k]), (feat["feature_index"], k, feat.get(k))
            # the converter: hasVector = len(vector) > 0; hookName set when "vector" is present
            assert "vector" in feat and len(feat["vector"]) == 0
            f = feat["feature_index"]
            pos = np.flatnonzero(z[:, f] > 0)
            order = pos[np.argsort(-z[pos, f], kind="stable")]
            for a, row in zip(feat["activations"], order):
                for k, ok in CONVERTER_ACTIVATION_READS.items():
                    assert k in a and ok(a[k]), (f, k, a.get(k))
                assert len(a["tokens"]) == len(a["values"])
                assert 0 <= a["qualifying_token_index"] < len(a["values"])
                assert "maxValue" not in a and "maxValueTokenIndex" not in a
                max_value = max(a["values"])  # as the converter computes them
                max_index = a["values"].index(max_value)
                rows = _rows_of(a, info, tok, z[:, f], int(row),
                                {"values": lambda rows, f=f: z[rows, f]})
                assert rows is not None, (f, a)
                ref = z[rows, f]  # the dense reference, special rows zeroed
                assert max_value == pytest.approx(ref.max(), abs=1e-3)
                assert ref[max_index] == pytest.approx(ref.max(), abs=1e-3)
                n_windows += 1
                off_centre += ref.max() > ref[a["qualifying_token_index"]] + 1e-3
    assert n_windows >= 60
    # windows whose maximum is not the selected token: the old maxValue (the centre's value)
    # was wrong there, the converter's max(values) is right
    assert off_centre >= 1, off_centre


def test_sae_dashboard_loads_every_batch_file(harvested, tmp_path):
    """SAEDashboard 0.8.0's own NeuronpediaDashboardBatch takes every batch file as keyword
    arguments (an unknown key is a TypeError) and writes it back unchanged with to_dict (a key
    of its that we lack would appear with its default)."""
    _export(harvested, tmp_path / "np", n_pairs=5, sae_id_suffix="x")
    n = len(list((tmp_path / "np").glob("batch-*.json")))
    assert (tmp_path / "np" / "interactions.json").is_file()  # next to the batches, ignored
    r = run_peer("sae-dashboard", """
        import json, sys
        from pathlib import Path
        from importlib.metadata import version
        from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
        n_files = n_feats = n_acts = 0
        for p in sorted(Path(sys.argv[1]).glob("batch-*.json")):
            doc = json.loads(p.read_text())
            batch = NeuronpediaDashboardBatch(**doc)
            back = json.loads(json.dumps(batch.to_dict()))
            assert back == doc, p.name
            n_files += 1
            n_feats += len(batch.features)
            n_acts += sum(len(f.activations) for f in batch.features)
            for f in batch.features:
                for a in f.activations:
                    assert a.values[a.qualifying_token_index] > 0
        print(version("sae-dashboard"), n_files, n_feats, n_acts)
    """, tmp_path / "np")
    ver, files, feats, acts = r.stdout.split()[-4:]
    assert ver == "0.8.0" and int(files) == n and int(feats) == 40 and int(acts) > 40


# The neuronpedia server's schema for POST /api/feature/upload-batch, in our own words.
def _check_upload_body(body):
    assert isinstance(body["modelId"], str) and isinstance(body["source"], str)
    assert body["modelId"] == body["modelId"].lower() and body["source"] == body["source"].lower()
    feats = body["features"]
    assert 1 <= len(feats) <= 128
    assert len({f["index"] for f in feats}) == len(feats)
    for f in feats:
        assert isinstance(f["index"], int) and 0 <= f["index"] <= 10_000_000
        assert f["density"] is None or 0 <= f["density"] <= 1
        for side in ("topLogits", "bottomLogits"):
            assert f[side] is None or len(f[side]) <= 20
            for lg in f[side] or []:
                assert isinstance(lg["token"], str) and _is_num(lg["value"])
        assert len(f["activations"]) >= 1
        for a in f["activations"]:
            assert 1 <= len(a["tokens"]) <= 1024 and len(a["tokens"]) == len(a["values"])
            assert _str_list(a["tokens"]) and _num_list(a["values"])
            q = a["quantileFraction"]
            assert q is None or 0 <= q <= 1
            for k in ("quantileMax", "quantileMin"):
                assert a[k] is None or a[k] <= 99999999


def test_upload_plan_matches_the_client_and_the_server_schema(harvested, tmp_path):
    sae, store, res = _export(harvested, tmp_path / "np", upload=True, features_per_batch=7,
                              stats={"n_logit_tokens": 12})
    plan = upload_plan(tmp_path / "np")
    assert res.n_upload == len(plan.payloads) >= 1
    assert DEAD_LATENT in plan.skipped and len(plan.skipped) == res.n_dead
    uploaded = [f["index"] for b in plan.payloads for f in b["features"]]
    assert sorted(uploaded + plan.skipped) == list(range(40))
    assert (plan.model_id, plan.source) == ("tiny-words", "0-polysae-poly")
    up = tmp_path / "np" / "upload"
    index = json.loads((up / "upload.json").read_text())
    assert index["skipped_dead"] == plan.skipped and len(index["files"]) == len(plan.payloads)
    assert [json.loads((up / f).read_text()) for f in index["files"]] == plan.payloads
    batches = {f["feature_index"]: f for b in _batches(tmp_path / "np") for f in b["features"]}
    for body in plan.payloads:
        _check_upload_body(body)
        for f in body["features"]:
            src = batches[f["index"]]
            assert [lg["token"] for lg in f["topLogits"]] == src["pos_str"] and len(
                src["pos_str"]) == 12
            assert [lg["value"] for lg in f["bottomLogits"]] == src["neg_values"]
            assert [a["values"] for a in f["activations"]] == [
                a["values"] for a in src["activations"]]
            assert all(a["quantileFraction"] is None and a["quantileMin"] == -1
                       for a in f["activations"])
    # the client's own path: Feature / Activation / Logit objects (Activation checks
    # quantileFraction) through FeatureRequest.upload_batch, its request captured, not sent
    r = run_peer("neuronpedia", """
        import json, sys
        from pathlib import Path
        from importlib.metadata import version
        from neuronpedia.np_activation import Activation
        from neuronpedia.np_feature import Feature, Logit
        from neuronpedia.requests.feature_request import FeatureRequest
        from neuronpedia.types.common.activation import NPActivation
        sent = []
        req = FeatureRequest(api_key="offline-test")
        req.send_request = lambda method, uri, json: sent.append((method, uri, json)) or {}
        up = Path(sys.argv[1])
        index = json.loads((up / "upload.json").read_text())
        n = 0
        for name in index["files"]:
            body = json.loads((up / name).read_text())
            m, s = body["modelId"], body["source"]
            feats = []
            for f in body["features"]:
                acts = [Activation(modelId=m, source=s, index=f["index"], tokens=a["tokens"],
                                   values=a["values"], quantileMax=a["quantileMax"],
                                   quantileMin=a["quantileMin"],
                                   quantileFraction=a["quantileFraction"])
                        for a in f["activations"]]
                for a in f["activations"]:
                    NPActivation(tokens=a["tokens"], values=a["values"])
                feats.append(Feature(
                    modelId=m, source=s, index=f["index"], density=f["density"],
                    top_logits=[Logit(**lg) for lg in f["topLogits"]],
                    bottom_logits=[Logit(**lg) for lg in f["bottomLogits"]],
                    activations=acts))
            req.upload_batch(m, s, feats)
            method, uri, sent_body = sent[-1]
            assert (method, uri) == ("POST", "upload-batch")
            assert json.loads(json.dumps(sent_body)) == body, name
            n += len(feats)
        print(version("neuronpedia"), n)
    """, up)
    ver, n = r.stdout.split()[-2:]
    assert ver == "1.2.1" and int(n) == len(uploaded)


def test_upload_plan_limits():
    """More than 20 logits a side, windows over 1024 tokens, more than 128 live features, dead
    ones, a suffix: cut to the endpoint's limits (the selected token kept), one source."""
    def feat(i, dead=False):
        toks = [f"t{k}" for k in range(1500)]
        vals = [0.0] * 1500
        vals[1400] = 2.5
        return {"feature_index": i, "frac_nonzero": 0.0 if dead else 0.25,
                "pos_str": [f"p{k}" for k in range(30)], "pos_values": list(range(30, 0, -1)),
                "neg_str": [f"n{k}" for k in range(30)], "neg_values": list(range(30)),
                "activations": [] if dead else [{
                    "bin_min": -1, "bin_max": 2.5, "bin_contains": -1, "tokens": toks,
                    "values": vals, "qualifying_token_index": 1400}]}
    batches = [{"model_id": "Tiny-Words", "layer": 3, "sae_set": "polysae-poly",
                "sae_id_suffix": "W1", "features": [feat(i, dead=i % 50 == 7) for i in r]}
               for r in (range(0, 100), range(100, 200))]
    plan = upload_plan(batches)
    assert (plan.model_id, plan.source) == ("tiny-words", "3-polysae-poly__w1")
    assert plan.skipped == [7, 57, 107, 157]
    assert [len(b["features"]) for b in plan.payloads] == [128, 68]
    for body in plan.payloads:
        _check_upload_body(body)
        for f in body["features"]:
            assert [lg["token"] for lg in f["topLogits"]] == [f"p{k}" for k in range(20)]
            assert [lg["value"] for lg in f["bottomLogits"]] == list(range(20))
            (a,) = f["activations"]
            assert len(a["tokens"]) == 1024 and max(a["values"]) == 2.5
            assert a["tokens"][a["values"].index(2.5)] == "t1400"
    with pytest.raises(ValueError, match="several model/source pairs"):
        upload_plan([batches[0], {**batches[1], "sae_id_suffix": None}])


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
    info = store.tokens()
    z, special = _dense(sae, store, tok)  # special tokens masked here too
    assert doc["n_tokens"] == (~special).sum()
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
            assert _pair_rows(a, info, tok, prod, int(row), {
                "values_a": lambda rows, i=i: z[rows, i], "values_b": lambda rows, j=j: z[rows, j],
                "values": lambda rows, i=i, j=j: z[rows, i] * z[rows, j]}) is not None
    assert json.loads((tmp_path / "np" / SETTINGS_FILE).read_text())["interactions"] == \
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
    with pytest.raises(ValueError, match=r"all 4 exported tokens are special tokens \[0, 1, 2\]"):
        export_neuronpedia_from_rows(sae, lambda a, b: x[a:b], 4, tmp_path / "e",
                                     token_ids=ids, tokenizer=tok, W_U=model.W_U)
    assert not (tmp_path / "e").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a polysae Neuronpedia export"):
        export_neuronpedia(sae, store, foreign, model=model)
    assert (foreign / "keep.txt").read_text() == "mine"
    # SAEDashboard's own run_settings.json is not ours: refused (with overwrite too); an export
    # of before the rename (our record under that name) is replaced with overwrite only, and the
    # name is gone afterwards
    (foreign / "run_settings.json").write_text('{"n_prompts_total": 24576}')
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a polysae Neuronpedia export"):
            export_neuronpedia(sae, store, foreign, model=model, overwrite=overwrite)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run_settings.json").write_text('{"generator": "polysae-neuronpedia"}')
    said = (rf"output folder {re.escape(str(legacy))} already holds a polysae Neuronpedia export "
            r"of an unnamed SAE, written \d{4}-\d\d-\d\d \d\d:\d\d; pass --overwrite")
    with pytest.raises(ValueError, match=said):
        export_neuronpedia(sae, store, legacy, model=model)
    export_neuronpedia(sae, store, legacy, model=model, overwrite=True,
                       config=NeuronpediaConfig(stats=StatsConfig(n_contexts=1)))
    assert sorted(p.name for p in legacy.iterdir()) == ["batch-0.json", SETTINGS_FILE]
    # a second export never replaces the first silently; with overwrite it replaces it whole
    before = {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()}
    with pytest.raises(ValueError, match=r"already holds a polysae Neuronpedia export of an "
                                         r"unnamed SAE \(d_sae 20, model tiny-words, hook "
                                         r"blocks\.0\.hook_resid_post\), written "):
        export_neuronpedia(sae, store, tmp_path / "v", model=model)
    assert {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()} == before
    export_neuronpedia(sae, store, tmp_path / "v", model=model, overwrite=True,
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

    def fake_load(name, device="cpu", dtype=None, **kw):  # kw: backend, ... (not used here)
        if name != "tiny-words":
            raise ValueError(f"unknown model {name!r}")
        return Loaded(model)

    monkeypatch.setattr(models, "load_model", fake_load)
    out = tmp_path / "np"
    assert cli_main(["export", str(ck), str(out), "--format", "neuronpedia", "--acts", str(acts),
                     "--split", "all", "--contexts", "3", "--pairs", "5",
                     "--features-per-batch", "8", "--no-progress", "--upload",
                     "--sae-id-suffix", "w40"]) == 0
    said = capsys.readouterr().out
    assert "40 features in 5 batch file(s)" in said
    assert "special tokens masked" in said and "upload request" in said
    b = _batches(out)
    assert len(b) == 5 and b[0]["model_id"] == "tiny-words" and b[0]["sae_id_suffix"] == "w40"
    assert len(json.loads((out / "interactions.json").read_text())["pairs"]) == 5
    index = json.loads((out / "upload" / "upload.json").read_text())
    assert index["source"] == "0-polysae-poly__w40" and DEAD_LATENT in index["skipped_dead"]
    assert json.loads((out / SETTINGS_FILE).read_text())["config"]["include_special"] is False
    # a second export into the same folder: refused, saying what is there, until --overwrite
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = ["export", str(ck), str(out), "--format", "neuronpedia", "--acts", str(acts),
             "--split", "all", "--no-progress", "--include-special"]
    assert cli_main(again) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (f"output folder {out} already holds a polysae Neuronpedia export of SAE {ck} "
            "(d_sae 40, model tiny-words, hook blocks.0.hook_resid_post), written ") in err
    assert "pass --overwrite" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    # --include-special: the <bos> latent's top window is <bos> again; no upload folder now
    assert cli_main([*again, "--overwrite"]) == 0
    assert "special tokens masked" not in capsys.readouterr().out
    top = _batches(out)[0]["features"][BOS_LATENT]["activations"][0]
    assert top["tokens"][top["qualifying_token_index"]] == "<bos>"
    assert not (out / "upload").exists()
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
