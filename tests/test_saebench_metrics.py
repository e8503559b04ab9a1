"""Absorption and TPP in the variants ``linear`` and ``full``: the per-latent contribution split
against brute-force Shapley values, each SAEBench step against a literal re-statement of
SAEBench's code, ``linear == full`` for a linear decoder, and the bad inputs (an SAE that cannot
be ablated, a one-class dataset, a tokenizer without words for a letter)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from wordtok import WordTok

from polysae import SAE, SAEConfig
from polysae.evaluation import absorption as ab
from polysae.evaluation import tpp
from polysae.evaluation.contributions import (
    NotSplittable,
    contributions,
    probe_responses,
    unit_directions,
)


def _poly(order=3, shared=True, d=8, F=20, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=F, k=4, decoder="poly", ranks=(d, 5, 4), order=order,
                        shared_u=shared)).double()
    with torch.no_grad():
        if sae.decoder.lambda2 is not None:
            sae.decoder.lambda2.fill_(0.7)
        if sae.decoder.lambda3 is not None:
            sae.decoder.lambda3.fill_(-1.3)
        sae.b_dec.normal_()
    return sae


def _linear(d=8, F=20, k=4, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=F, k=k, decoder="linear"))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae


# -- contributions -------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_contributions_are_exact_shapley_values(order, shared):
    """c_i(x) equals the Shapley value of v(S) = decode(z_S) - b_dec computed by enumerating
    every coalition, and the contributions add up to x_hat - b_dec."""
    sae = _poly(order, shared)
    g = torch.Generator().manual_seed(1)
    N, K = 3, 5
    idx = torch.stack([torch.randperm(20, generator=g)[:K] for _ in range(N)])
    val = torch.rand(N, K, generator=g, dtype=torch.float64) + 0.2
    c = contributions(sae, val, idx)

    def v(n, S):
        z = torch.zeros(1, 20, dtype=torch.float64)
        for k in S:
            z[0, idx[n, k]] = val[n, k]
        return sae.decode(z, path="dense")[0] - sae.b_dec

    for n in range(N):
        for i in range(K):
            others = [k for k in range(K) if k != i]
            phi = torch.zeros(8, dtype=torch.float64)
            for r in range(K):
                w = math.factorial(r) * math.factorial(K - r - 1) / math.factorial(K)
                for S in itertools.combinations(others, r):
                    phi += w * (v(n, [*S, i]) - v(n, list(S)))
            torch.testing.assert_close(c[n, i], phi, rtol=0, atol=1e-12)
        torch.testing.assert_close(c[n].sum(0), v(n, range(K)), rtol=0, atol=1e-12)


def test_probe_responses_are_projected_contributions():
    sae = _poly(3, True)
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(4)])
    val = torch.rand(4, 6, generator=g, dtype=torch.float64)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(probe_responses(sae, val, idx, W),
                               contributions(sae, val, idx) @ W, rtol=0, atol=1e-12)


def test_linear_decoder_directions_are_its_rows_bit_for_bit():
    sae = _linear()
    idx = torch.tensor([[3, 7, 0], [19, 2, 2]])
    d = unit_directions(sae, torch.rand(2, 3), idx)
    assert torch.equal(d, sae.decoder.W_dec.detach().double()[idx])


def test_poly_with_zero_lambdas_has_its_linear_atoms_as_directions():
    sae = _poly(3, True)
    with torch.no_grad():
        sae.decoder.lambda2.zero_()
        sae.decoder.lambda3.zero_()
    idx = torch.tensor([[1, 4, 9]])
    d = unit_directions(sae, torch.rand(1, 3, dtype=torch.float64), idx)
    torch.testing.assert_close(d, sae.linear_atoms().detach()[idx], rtol=0, atol=1e-12)


def test_unknown_decoder_is_not_splittable():
    sae = _linear()
    sae.decoder.kind = "mystery"
    with pytest.raises(NotSplittable, match="no per-latent contribution split"):
        unit_directions(sae, torch.rand(1, 2), torch.tensor([[0, 1]]))


# -- absorption: per-word rule against a literal re-statement of SAEBench's loop ----------------

def _saebench_word(sae_acts, W_dec, x, probe, main):
    """SAEBench FeatureAbsorptionCalculator.calculate_absorption for one word, transcribed."""
    probe = probe / probe.norm()
    cos = torch.nn.functional.cosine_similarity(probe[None], W_dec, dim=-1)
    proj = sae_acts * cos
    P = float(x @ probe)
    main_proj = float(proj[main].sum())
    mask = torch.ones(len(proj), dtype=torch.bool)
    mask[main] = False
    mask &= cos >= 0.1
    mask &= proj > 0
    cand = proj[mask]
    top = float(cand.topk(min(3, cand.numel())).values.sum())
    if main_proj >= P or top / P < 0.4:
        frac = 0.0
    elif main_proj <= 0:
        frac = 1.0
    else:
        a = min(top, P - main_proj)
        frac = float(np.clip(a / (a + main_proj), 0, 1))
    t = int(proj.topk(10).indices[0])
    full = (all(float(sae_acts[i]) < 1e-8 for i in main) and float(cos[t]) >= 0.025
            and P >= 0 and float(proj[t]) / P >= 0.4)
    return frac, full


def test_absorption_per_word_matches_saebench_loop():
    g = torch.Generator().manual_seed(3)
    F, D, n = 40, 16, 400
    probe = torch.randn(D, generator=g, dtype=torch.float64)
    W = torch.randn(F, D, generator=g, dtype=torch.float64)
    u = probe / probe.norm()
    W[:6] = 0.5 * W[:6] + 3 * u  # main latents 0, 1 and absorbers 2..5 point along the probe
    z = torch.zeros(n, F, dtype=torch.float64)
    for r in range(n):
        act = torch.randperm(F, generator=g)[:6]
        if r % 3 == 0:
            act = act[act > 1]  # main latents silent: room for full absorption
        z[r, act] = torch.rand(len(act), generator=g, dtype=torch.float64) * 2
    x = z @ W + 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)
    vals, idx = z.topk(6, dim=-1)
    main = [0, 1]
    got = ab.absorption_per_word(x, vals, idx, W[idx], probe, main)
    want = [_saebench_word(z[r], W, x[r], probe, main) for r in range(n)]
    frac = torch.tensor([w[0] for w in want], dtype=torch.float64)
    full = torch.tensor([w[1] for w in want])
    torch.testing.assert_close(got.fraction, frac, rtol=0, atol=1e-12)
    assert torch.equal(got.full, full)
    # every branch of the rule is exercised
    assert (frac == 0).any() and (frac == 1).any() and ((frac > 0) & (frac < 1)).any()
    assert full.any() and (~full).any()


def test_split_features_walks_f1_jumps():
    f1 = {1: 0.5, 2: 0.6, 3: 0.62, 4: 0.9}
    feats = {k: np.arange(k) for k in f1}
    assert ab.split_features(f1, feats) == [0, 1]     # 3 rose by 0.02 < 0.03: stop there
    assert ab.split_features({1: 0.5, 2: 0.5}, feats) == [0]


def test_icl_prompt_follows_saebench_template():
    import random

    p = ab.make_prompt(" cat", [" dog", "Apple", " cat"], 2, random.Random(0))
    lines = p.split("\n")
    assert lines[0] == "" and lines[-1] == " cat has the first letter:"
    assert set(lines[1:3]) == {"Apple has the first letter: A", " dog has the first letter: D"}


# -- absorption end to end on synthetic words ------------------------------------------------------

def _letter_data(sae_d=48, n_per=12, seed=0):
    """Activations with a planted direction per first letter plus word-specific noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(26, sae_d, generator=g)
    def make(n):
        y = np.repeat(np.arange(26), n)
        x = 3 * dirs[y] + torch.randn(len(y), sae_d, generator=g)
        return x, y
    (xtr, ytr), (xte, yte) = make(n_per), make(n_per // 2)
    return xtr, ytr, xte, yte


def _letter_sae(decoder="linear", seed=1):
    """64 latents over the letter data: 26 along the letter directions, 38 mixing a letter
    direction with noise (candidate absorbers)."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(26, 48, generator=g)
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=48, d_sae=64, k=6, decoder=decoder,
                    ranks=(48, 8, 8) if decoder == "poly" else None)
    sae = SAE(cfg)
    W = torch.cat([dirs, 0.8 * dirs[torch.arange(38) % 26] + torch.randn(38, 48)])
    W = W / W.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_enc.copy_(W.T)
        if decoder == "linear":
            sae.decoder.W_dec.copy_(W)
        else:
            sae.decoder.lambda2.fill_(2.0)
            sae.decoder.lambda3.fill_(2.0)
    return sae


def test_absorption_linear_equals_full_for_a_linear_decoder():
    xtr, ytr, xte, yte = _letter_data()
    gt = ab.ground_truth_probe(xtr, ytr, xte, yte, seed=0)
    out = ab.absorption_eval(_letter_sae("linear"), gt, xtr, ytr, xte, yte)
    lin, full = out["linear"], out["full"]
    assert lin["n_letters"] > 10 and lin["mean_absorption_fraction"] > 0
    assert lin == full  # the same numbers, letter by letter, not approximately
    assert out["difference"]["letters_changed"] == 0
    assert out["difference"]["mean_absorption_fraction"] == 0


def test_absorption_full_differs_for_a_polysae():
    xtr, ytr, xte, yte = _letter_data()
    gt = ab.ground_truth_probe(xtr, ytr, xte, yte, seed=0)
    sae = _letter_sae("poly")
    sp = sae.encode_sparse(xte)
    lin = ab.directions(sae, "linear", sp.values, sp.indices)
    full = ab.directions(sae, "full", sp.values, sp.indices)
    assert not torch.allclose(lin, full)
    out = ab.absorption_eval(sae, gt, xtr, ytr, xte, yte)
    assert set(out) >= {"linear", "full", "difference", "k_sparse"}
    assert out["linear"]["letters"].keys() == out["full"]["letters"].keys()


def test_letter_without_single_token_words_is_skipped_with_reason():
    words = [" apple", " ant", " bee", " bear", "cat", " cow"] + [f" d{i}" for i in range(3)]
    tok = WordTok(words, answers="ABCD")   # the answer tokens " A".." D" only
    w = ab.task_words(tok, 100, 100, seed=0)
    assert "z" in w.missing_letters and "q" in w.missing_letters
    assert "single token" in w.missing_letters["z"]
    assert "a" not in w.missing_letters and "d" not in w.missing_letters
    xtr, ytr, xte, yte = _letter_data()
    gt = ab.ground_truth_probe(xtr, ytr, xte, yte, seed=0)
    out = ab.absorption_eval(_linear(d=48, F=64, k=6), gt, xtr, ytr, xte, yte,
                             missing=w.missing_letters)
    z = out["linear"]["letters"]["z"]
    assert z["counted"] is False and "absorption_fraction" not in z
    assert out["k_sparse"]["probe_f1"]["z"] == gt.f1["z"]


def test_tokenizer_without_vocabulary_is_a_clear_error():
    from chartok import CharTok

    with pytest.raises(ValueError, match="needs a tokenizer with a vocabulary"):
        ab.task_words(CharTok(), 10, 10)


# -- TPP -------------------------------------------------------------------------------------------

def _tpp_setup(n_cls=3, docs_per=10, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(n_cls, D, generator=g)
    acts, labels = [], []
    for c in range(n_cls):
        for _ in range(docs_per):
            T = int(torch.randint(3, 8, (1,), generator=g))
            acts.append(centers[c] + torch.randn(T, D, generator=g))
            labels.append(f"c{c}")
    order = torch.randperm(len(acts), generator=g).tolist()
    acts, labels = [acts[i] for i in order], [labels[i] for i in order]
    train = [i for i in range(len(acts)) if i % 3]
    test = [i for i in range(len(acts)) if i % 3 == 0]
    return acts, labels, train, test


def test_balanced_task_follows_prepare_probe_data():
    labels = ["a"] * 6 + ["b"] * 5 + ["c"] * 5
    t = tpp.balanced_task(labels, range(16), "a", torch.Generator().manual_seed(0))
    assert sorted(t.pos.tolist()) == list(range(6)) and len(t.neg) == 6
    negs = [labels[i] for i in t.neg]
    assert negs.count("b") == 3 and negs.count("c") == 3  # ceil(6/2) from each other class


def test_tpp_scores_match_dense_reference():
    acts, labels, train, test = _tpp_setup()
    s = tpp.make_setup(acts, labels, train, test, seed=0)
    sae = _poly(3, True, d=12, F=30, seed=2)   # float64: the reference sums in another order
    got = tpp.scores(sae, s)
    for j, c in enumerate(s.classes):
        w = s.probes[c][0].double()
        t = s.train[c]
        def doc_mean(f, docs):  # mean over docs of the per-document token mean
            return torch.stack([f(acts[d]).mean(0) for d in docs]).mean(0)
        codes = lambda a: sae.encode(a.double())  # noqa: E731
        dz = doc_mean(codes, t.pos) - doc_mean(codes, t.neg)
        A = sae.linear_atoms().detach().double()
        torch.testing.assert_close(got["linear"][:, j], dz.clamp(min=0) * (A @ w),
                                   rtol=1e-9, atol=1e-12)

        def resp(a):  # w . c_i(x) for every latent, dense, from the Shapley contributions
            sp = sae.encode_sparse(a.double())
            r = contributions(sae, sp.values, sp.indices) @ w
            return torch.zeros(len(a), 30, dtype=torch.float64).scatter_add(
                1, sp.indices, r * (sp.values != 0))
        dr = doc_mean(resp, t.pos) - doc_mean(resp, t.neg)
        torch.testing.assert_close(got["full"][:, j], dr * (dz > 0), rtol=1e-9, atol=1e-12)


def test_select_top_n_follows_saebench():
    e = torch.tensor([0.0, 3.0, -1.0, 0.0, 2.0])
    assert tpp.select_top_n(e, 2).tolist() == [1, 4]
    # k = min(N, non-zero scores) latents, the k largest scores: as in SAEBench a zero score can
    # beat a negative one, so 5 asked for gives the 3 largest of the whole vector
    got = tpp.select_top_n(e, 5)
    assert len(got) == 3 and set(got[:2].tolist()) == {1, 4} and float(e[got[2]]) == 0
    assert tpp.select_top_n(torch.zeros(4), 2).numel() == 0


@pytest.mark.parametrize("kind", ["linear", "poly3", "poly3-separate", "poly2", "other"])
def test_ablator_readings_are_probes_of_the_saebench_rule(kind):
    """W^T (decode(z with S zeroed) + x - x_hat) from the projected decoder equals the dense
    decode of the ablated codes, for every decoder form (and the literal path otherwise)."""
    from polysae.evaluation.ablation import Ablator

    if kind == "linear":
        sae = _linear(d=8, F=20).double()
    else:
        sae = _poly(3 if kind.startswith("poly3") else 2, shared=not kind.endswith("separate"))
    if kind == "other":
        sae.decoder.kind = "mystery"   # no known split: the literal decode_sparse path
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64)
    ab_ = Ablator(sae, x, W)
    for S in ([], [0], [1, 4, 7, 11, 19], list(range(20))):
        z = sae.encode(x)
        z[:, S] = 0
        want = (sae.decode(z, path="dense") + x - sae.decode(sae.encode(x), path="dense")) @ W
        torch.testing.assert_close(ab_.readings(torch.tensor(S, dtype=torch.long)), want,
                                   rtol=0, atol=1e-10)


def test_ablation_is_decode_of_zeroed_codes_plus_error():
    acts, labels, train, test = _tpp_setup()
    s = tpp.make_setup(acts, labels, train, test, seed=0)
    sae = _poly(2, True, d=12, F=30, seed=3).float()
    ablate = torch.tensor([0, 5, 7, 11])
    docs = np.unique(np.concatenate([s.test[c].docs for c in s.classes]))
    rows = torch.nonzero(torch.isin(s.doc, torch.as_tensor(docs)))[:, 0]
    from polysae.evaluation.ablation import Ablator

    Wp = torch.stack([s.probes[c][0] for c in s.classes], 1)
    got = tpp.ablated_accuracies(s, Ablator(sae, s.x[rows], Wp), ablate, rows)
    for c in s.classes:
        w, b = s.probes[c]
        accs = []
        for d, y in zip(s.test[c].docs, s.test[c].y):
            a = acts[d]
            z = sae.encode(a)
            z[:, ablate] = 0
            x2 = (sae.decode(z, path="dense") + a - sae(a)).mean(0)
            accs.append(float((float((x2 @ w).detach()) + b > 0) == bool(y)))
        assert got[c] == pytest.approx(np.mean(accs), abs=1e-12)


def test_tpp_linear_equals_full_for_a_linear_decoder():
    acts, labels, train, test = _tpp_setup()
    s = tpp.make_setup(acts, labels, train, test, seed=0)
    out = tpp.tpp_eval(_linear(d=12, F=30, k=4), s, n_values=(2, 5, 10, 20, 50))
    assert out["linear"]["selected"] == out["full"]["selected"]
    assert out["linear"]["classes"] == out["full"]["classes"]   # exactly, class by class
    assert out["skipped_n"] == {"50": "N=50 > d_sae=30"}


def test_tpp_one_class_dataset_is_a_clear_error():
    acts, labels, train, test = _tpp_setup(n_cls=1)
    with pytest.raises(ValueError, match="at least two classes"):
        tpp.make_setup(acts, labels, train, test)


def test_sae_that_cannot_be_ablated_is_skipped_with_reason():
    from polysae.evaluation.saebench_metrics import tpp_all

    acts, labels, train, test = _tpp_setup()
    from polysae.evaluation.probing import PooledText, Split

    class Broken(SAE):
        def decode_sparse(self, values, indices):
            raise RuntimeError("this decoder has no sparse path")

    broken = Broken(SAEConfig(d_in=12, d_sae=30, k=4, decoder="linear"))
    ok = _linear(d=12, F=30)
    one = ["x"] * len(acts)
    result = {"saes": {"broken": {}, "ok": {}}}

    class Cfg:
        seed, tpp_n_values = 0, (2, 5)

    kept = {"two": (PooledText(acts, 0), labels, Split(train, test)),
            "one": (PooledText(acts, 0), one, Split(train, test))}
    tpp_all({"broken": broken, "ok": ok}, Cfg, kept, result)
    assert "cannot be ablated" in result["saes"]["broken"]["tpp"]["skipped"]
    assert "no sparse path" in result["saes"]["broken"]["tpp"]["skipped"]
    assert "at least two classes" in result["tpp_setup"]["skipped"]["one"]
    assert set(result["saes"]["ok"]["tpp"]["linear"]["datasets"]) == {"two"}
    assert result["saes"]["ok"]["tpp"]["difference"]["max_abs_total"] == 0


def test_evaluate_runs_absorption_on_a_tokenizer_with_words(make_tiny_hooked, tmp_path):
    """``polysae.evaluate`` end to end on a tiny random model and a word tokenizer: words,
    prompts, word activations, both variants for both SAEs, the report section and pictures; TPP
    without probing datasets is skipped with the reason."""
    from polysae.evaluation import EvalConfig, evaluate

    words = [f" {c}{s}" for c in "abcdefghij" for s in ("at", "og", "un", "ip", "ex", "ol")]
    tok = WordTok(words, answers="ABCDEFGHIJ")
    tiny = make_tiny_hooked(n_layers=1, d_model=16, d_vocab=len(tok.tokens), n_ctx=128)
    torch.manual_seed(0)
    saes = {"vanilla": SAE(SAEConfig(d_in=16, d_sae=32, k=4, decoder="linear")),
            "poly": SAE(SAEConfig(d_in=16, d_sae=32, k=4, decoder="poly", ranks=(16, 4, 4)))}
    txt = tmp_path / "held.txt"
    txt.write_text("\n".join(" ".join(words[i:i + 5]) for i in range(40)))
    cfg = EvalConfig(datasets=(), recon_tokens=100, live_dataset=str(txt), live_ctx=16,
                     ce_contexts=0, steering=False, interactions=False, progress=False,
                     absorption_train_words=40, absorption_test_words=20, absorption_icl=3)
    m = evaluate(saes, model=tiny, hook="blocks.0.hook_resid_post", tokenizer=tok, config=cfg,
                 out=tmp_path / "ev")
    setup = m["absorption_setup"]
    # 74 single-token alphabetic words (60 + " has the first letter" + " A".." J"): 15 are test
    assert setup["train_words"] == 40 and setup["test_words"] == 15 and setup["icl_examples"] == 3
    assert set(setup["missing_letters"]) == set("kmnopqrsuvwxyz")
    for name, s in m["saes"].items():
        a = s["absorption"]
        assert {"linear", "full", "k_sparse", "difference", "seconds"} <= set(a)
        assert a["linear"]["valid"] is False and "SAEBench reports" in a["linear"]["note"]
        assert a["linear"]["letters"]["z"]["counted"] is False
        assert s["tpp"] == {"skipped": "no probing dataset was evaluated (TPP uses the probing "
                                       "texts; set datasets)"}
    assert m["saes"]["vanilla"]["absorption"]["linear"] == \
        m["saes"]["vanilla"]["absorption"]["full"]
    assert (tmp_path / "ev" / "absorption.png").is_file()
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "### Feature absorption (first letter)" in md and "- **absorption**:" in md
