"""Steering ranks against a hand-computed unembedding of the steered residual stream."""

from __future__ import annotations

import json

import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.evaluation.steering import hook_norm, steer_ranks, target_rank, word_latent


@pytest.fixture(scope="module")
def tiny_model(make_tiny_hooked):
    return make_tiny_hooked(n_layers=2, d_model=16, d_vocab=40, seed=1)


def test_target_rank_matches_argsort(gen):
    logits = torch.randn(100, generator=gen)
    order = logits.argsort(descending=True)
    for t in (0, 17, 99):
        assert target_rank(logits, t) == int((order == t).nonzero()) + 1


def test_steer_ranks_vs_manual_unembedding(tiny_model, gen):
    hook = "blocks.1.hook_resid_post"  # last block: logits = unembed(ln_final(resid))
    prompts = [torch.randint(0, 40, (n,), generator=gen) for n in (5, 8)]
    d = torch.randn(16, generator=gen)
    alphas = [0.0, 1.5, 6.0]
    got = steer_ranks(tiny_model, hook, prompts, 7, d, alphas)
    for p, row in zip(prompts, got):
        _, cache = tiny_model.run_with_cache(p[None], names_filter=hook)
        resid = cache[hook]
        for a, rank in zip(alphas, row):
            r = resid.clone()
            r[:, 1:] += a * d
            logits = tiny_model.unembed(tiny_model.ln_final(r))[0, -1]
            assert rank == int((logits.argsort(descending=True) == 7).nonzero()) + 1
    none = steer_ranks(tiny_model, hook, prompts, 7, None, alphas)
    assert all(len(set(r)) == 1 for r in none) and [r[0] for r in none] == [r[0] for r in got]
    # A large push along the target's unembedding direction must bring it to rank 1.
    push = tiny_model.W_U[:, 7] - tiny_model.W_U.mean(1)
    assert steer_ranks(tiny_model, hook, prompts, 7, push / push.norm(), [200.0]) == [[1], [1]]


def test_word_latent_and_norm(tiny_model, gen):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=24, k=3)).eval()
    hook = "blocks.0.hook_resid_post"
    toks = torch.tensor([0, 5, 9])
    _, cache = tiny_model.run_with_cache(toks[None], names_filter=hook)
    assert word_latent(tiny_model, hook, sae, toks) == int(sae.encode(cache[hook][0, -1]).argmax())
    assert hook_norm(tiny_model, hook, [toks]) == pytest.approx(
        float(cache[hook][0, 1:].norm(dim=-1).median()))


def test_load_concepts(tmp_path):
    from polysae.evaluation.steering import Concept, load_concepts

    rows = [{"name": "canada x oil", "word_i": " Canada", "word_j": " oil",
             "target": " Keystone", "prompt": "The pipeline is called the"},
            {"name": "b", "word_i": " x", "word_j": " y", "target": " z", "prompt": "p"}]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_concepts(f) == (Concept("canada x oil", " Canada", " oil", " Keystone",
                                        "The pipeline is called the"),
                                Concept("b", " x", " y", " z", "p"))
    f.write_text(json.dumps(rows[0]) + "\n" + json.dumps(dict(rows[1], target="")) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl: line 2 .*\['target'\]"):
        load_concepts(f)
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl: line 1 is not valid JSON"):
        load_concepts(f)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_concepts(tmp_path / "nope.jsonl")


@pytest.mark.slow
def test_steering_eval_on_smollm2_vs_independent_forwards():
    """steering_eval's ranks against plain forwards of the bundled SmolLM2: no steering = the
    clean rank, alpha 0 = no steering, each SAE's latents = argmax of its code at the word, and
    steered ranks = steer_ranks along the hand-computed direction of every mode; summaries
    recomputed (alpha from the selection prompt, numbers from the other two)."""
    import math

    from polysae.data import models
    from polysae.evaluation.steering import Concept, steering_eval

    lm = models.load_model("smollm2-135m")
    m = lm.model
    hook = "blocks.3.hook_resid_post"
    torch.manual_seed(0)
    saes = {"vanilla": SAE(SAEConfig(d_in=576, d_sae=128, k=8, decoder="linear")).eval(),
            "poly": SAE(SAEConfig(d_in=576, d_sae=128, k=8, decoder="poly")).eval()}
    concept = Concept("canada x oil", " Canada", " oil", " Keystone",
                      "The controversial cross-border pipeline project is called the")
    neutral = ("I think that the", "She told me about")
    scales = (0.0, 1.0, 4.0)
    out = steering_eval(m, hook, saes, concepts=[concept], neutral_prompts=neutral,
                        alpha_scales=scales, select_prompts=1)
    c = out["concepts"][0]
    target = int(m.to_tokens(" Keystone", prepend_bos=False)[0, 0])
    prompts = [m.to_tokens(p)[0] for p in (concept.prompt, *neutral)]
    with torch.inference_mode():
        clean = [target_rank(m(p[None])[0, -1].float(), target) for p in prompts]
    assert c["target_id"] == target and c["rank_none"] == clean
    assert c["roles"] == ["report", "select", "report"]
    for name, sae in saes.items():
        lat = []
        for w in (concept.word_i, concept.word_j):
            _, cache = m.run_with_cache(m.to_tokens(w), names_filter=hook)
            lat.append(int(sae.encode(cache[hook][0, -1].float()).argmax()))
        assert c["saes"][name]["latents"] == lat
        ref_dirs = _closed_form_dirs(sae, *lat)
        assert set(c["saes"][name]["ranks_by_mode"]) == set(ref_dirs)
        for mode, got in c["saes"][name]["ranks_by_mode"].items():
            ref = steer_ranks(m, hook, prompts, target, ref_dirs[mode],
                              [a * out["hook_norm"] for a in scales])
            assert [r[0] for r in got] == clean        # alpha 0 changes nothing
            assert got == ref, (name, mode)
            s = out["summary"]["saes"][name][mode]
            lg = [[math.log2(r) for r in row] for row in got]
            k = min(range(len(scales)), key=lambda k: (lg[1][k], k))
            assert s["alpha_scale"] == scales[k]
            assert s["report_mean_log2_rank"] == pytest.approx((lg[0][k] + lg[2][k]) / 2)
            assert s["report_frac_improved"] == ((got[0][k] < clean[0]) + (got[2][k] < clean[2])
                                                 ) / 2
            for kk, row in enumerate(s["per_alpha"]):
                assert row["all_mean_log2_rank"] == pytest.approx(sum(r[kk] for r in lg) / 3)
        assert c["saes"][name]["ranks"] == c["saes"][name]["ranks_by_mode"]["linear"]
    assert out["hook_norm"] == pytest.approx(hook_norm(m, hook, prompts), rel=1e-5)

# -- pairwise-interaction directions and alpha selection on held-out prompts -------------------
def _poly(order=3, shared_u=True, d_in=16, d_sae=24, ranks=(8, 4, 3), dtype="float64", seed=0):
    torch.manual_seed(seed)
    if not shared_u:
        ranks = (6, 3, 2)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=3, decoder="poly", ranks=ranks, order=order,
                        shared_u=shared_u, dtype=dtype)).eval()
    with torch.no_grad():
        sae.decoder.lambda2.fill_(0.8)        # away from the init value, nonzero
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("order,shared_u", [(2, True), (3, True), (2, False), (3, False)])
def test_pair_terms_vs_dense_decode(order, shared_u):
    """SAE.pair_terms = the second-order part of the dense decode: x_hat(z) is a polynomial of
    degree <= 3 in z, so g(h) = f(h(e_i + e_j)) - f(h e_i) - f(h e_j) + f(0) = h^2 Q + h^3 T and
    Q = (8 g(1) - g(2)) / 4 exactly (for i == j the same g is f(2h e_i) - 2 f(h e_i) + f(0))."""
    sae = _poly(order, shared_u)
    F = sae.cfg.d_sae
    pairs = [(2, 5), (5, 2), (3, 3), (0, 23)]

    def f(z):
        return sae.decode(z[None], path="dense")[0]

    def e(i):
        return torch.nn.functional.one_hot(torch.tensor(i), F).double()

    got = sae.pair_terms(torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))
    dec = sae.decoder
    with torch.no_grad():
        for (i, j), row in zip(pairs, got):
            def g(h):
                return f(h * (e(i) + e(j))) - f(h * e(i)) - f(h * e(j)) + f(0 * e(i))
            Q = (8 * g(1.0) - g(2.0)) / 4
            torch.testing.assert_close(row, Q, rtol=1e-9, atol=1e-12)
            if order == 2 and i != j:       # then the decode difference itself is the pair term
                torch.testing.assert_close(row, g(1.0), rtol=1e-9, atol=1e-12)
            if shared_u:                    # closed form 2 lambda2 C2 (u_i[:R2] * u_j[:R2])
                r2 = dec.C2.shape[1]
                ref = 2 * dec.lambda2 * dec.C2 @ (dec.U[i, :r2] * dec.U[j, :r2])
                torch.testing.assert_close(row, ref, rtol=1e-9, atol=1e-12)
    assert float(got.detach().norm(dim=-1).min()) > 0


def test_pair_terms_need_a_pairwise_decoder():
    torch.manual_seed(0)
    lin = SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="linear"))
    with pytest.raises(ValueError, match="linear decoder has no pairwise"):
        lin.pair_terms(torch.tensor([0]), torch.tensor([1]))
    o1 = SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="poly", ranks=(8, 4, 3), order=1))
    with pytest.raises(ValueError, match="order < 2"):
        o1.pair_terms(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"pair_terms: i \(2,\) and j \(1,\)"):
        _poly().pair_terms(torch.tensor([0, 1]), torch.tensor([1]))


def _closed_form_dirs(sae, i, j):
    """Steering directions from the decoder tensors by hand (shared U)."""
    dec = sae.decoder
    with torch.no_grad():
        if sae.cfg.decoder == "linear":
            W = dec.W_dec.double()
        else:
            W = (dec.U @ dec.C1.T).double()
        d = W / W.norm(dim=-1, keepdim=True)
        out = {"linear": d[i] + d[j]}
        if sae.cfg.decoder == "poly":
            r2 = dec.C2.shape[1]
            uu = (dec.U[i, :r2] * dec.U[j, :r2]).double()
            P = 2 * dec.lambda2.double() * dec.C2.double() @ uu
            out["pair"] = P / P.norm()
            v = W[i] + W[j] + P
            out["linear+pair"] = v / v.norm()
    return {k: v.float() for k, v in out.items()}


def test_steering_directions_closed_form():
    from polysae.evaluation.steering import MODES, sae_modes, steering_directions

    poly = _poly(dtype="float32")
    torch.manual_seed(1)
    van = SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="linear")).eval()
    pairs = [(1, 7), (4, 4)]
    assert sae_modes(poly) == MODES and sae_modes(van) == ("linear",)
    assert sae_modes(_poly(order=2)) == MODES
    o1 = SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="poly", ranks=(8, 4, 3), order=1))
    assert sae_modes(o1) == ("linear",)
    for sae in (poly, van):
        got = steering_directions(sae, pairs)
        assert set(got) == set(sae_modes(sae))
        for r, (i, j) in enumerate(pairs):
            ref = _closed_form_dirs(sae, i, j)
            for mode in got:
                torch.testing.assert_close(got[mode][r], ref[mode], rtol=1e-5, atol=1e-6)


def _char_tokens(model, text, bos):
    """A character tokenizer for the tiny 40-token model (BOS = 1)."""
    return torch.tensor(([1] if bos else []) + [3 + ord(c) % 36 for c in text])


def _concepts():
    from polysae.evaluation.steering import Concept

    return (Concept("ab x cd", " ab", " cd", " q", "a pipe is the"),
            Concept("ef x gh", " ef", " gh", "z", "we bought it at"),
            Concept("ij x kl", " ij", " kl", " m", "the crop was"))


_NEUTRAL = ("i think", "we said", "the best", "she told", "so then", "it was")


def test_steering_eval_modes_ranks_and_held_out_summary(tiny_model, monkeypatch):
    """Real ranks on a tiny model: every mode's ranks equal steer_ranks along the hand-computed
    direction; alpha is the argmin of the selection prompts' mean log2 rank; reported numbers
    are recomputed on the other prompts only; vanilla SAEs have only the linear mode."""
    import math

    from polysae.evaluation import steering
    from polysae.evaluation.report import render_markdown

    monkeypatch.setattr(steering, "_tokens", _char_tokens)
    poly = _poly(dtype="float32")
    torch.manual_seed(1)
    van = SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="linear")).eval()
    saes = {"vanilla": van, "poly": poly}
    hook = "blocks.0.hook_resid_post"
    scales = (0.0, 1.0, 3.0, 8.0)
    n_sel = 2
    out = steering.steering_eval(tiny_model, hook, saes, concepts=_concepts(),
                                 neutral_prompts=_NEUTRAL, alpha_scales=scales,
                                 select_prompts=n_sel)
    assert out["modes"] == {"vanilla": ["linear"], "poly": list(steering.MODES)}
    assert out["select_prompts"] == list(_NEUTRAL[:n_sel])
    sel = list(range(1, 1 + n_sel))
    rep = [0] + list(range(1 + n_sel, 1 + len(_NEUTRAL)))
    mlog = lambda rs: sum(math.log2(r) for r in rs) / len(rs)  # noqa: E731
    sm = out["summary"]
    assert set(sm) == {"none", "saes", "poly_vs_vanilla"}
    assert set(sm["saes"]["vanilla"]) == {"linear"}
    assert set(sm["saes"]["poly"]) == set(steering.MODES)
    base = [c["rank_none"] for c in out["concepts"]]
    assert sm["none"]["report_mean_log2_rank"] == pytest.approx(
        mlog([b[p] for b in base for p in rep]))
    for ci, (c, entry) in enumerate(zip(_concepts(), out["concepts"])):
        assert entry["roles"] == ["report"] + ["select"] * n_sel + ["report"] * 4
        prompts = [_char_tokens(None, t, True) for t in (c.prompt, *_NEUTRAL)]
        target = int(_char_tokens(None, c.target, False)[0])
        with torch.inference_mode():
            clean = [target_rank(tiny_model(p[None])[0, -1], target) for p in prompts]
        assert entry["rank_none"] == clean
        for name, sae in saes.items():
            e = entry["saes"][name]
            with torch.inference_mode():
                lat = [int(sae.encode(tiny_model.run_with_cache(
                    _char_tokens(None, w, True)[None], names_filter=hook)[1][hook][0, -1])
                    .argmax()) for w in (c.word_i, c.word_j)]
            assert e["latents"] == lat
            assert set(e["ranks_by_mode"]) == set(steering.sae_modes(sae))
            assert e["ranks"] == e["ranks_by_mode"]["linear"]
            ref_dirs = _closed_form_dirs(sae, *lat)
            for mode, got in e["ranks_by_mode"].items():
                ref = steer_ranks(tiny_model, hook, prompts, target, ref_dirs[mode],
                                  [s * out["hook_norm"] for s in scales])
                assert got == ref, (name, mode)
                assert [r[0] for r in got] == clean          # alpha 0 = no steering
    for name in saes:
        for mode, s in sm["saes"][name].items():
            rows = [e["saes"][name]["ranks_by_mode"][mode] for e in out["concepts"]]
            sel_m = [mlog([r[p][k] for r in rows for p in sel]) for k in range(len(scales))]
            k = min(range(len(scales)), key=lambda k: (sel_m[k], k))
            assert s["alpha_scale"] == scales[k] and s["alpha"] == out["alphas"][k]
            assert s["select_mean_log2_rank"] == pytest.approx(sel_m[k])
            rep_r = [r[p][k] for r in rows for p in rep]
            base_r = [b[p] for b in base for p in rep]
            assert s["report_mean_log2_rank"] == pytest.approx(mlog(rep_r))
            assert s["report_frac_improved"] == sum(
                a < b for a, b in zip(rep_r, base_r)) / len(rep_r)
            pc = [mlog([r[p][k] for p in rep]) for r in rows]
            pc0 = [mlog([b[p] for p in rep]) for b in base]
            assert s["report_per_concept_mean_log2_rank"] == pytest.approx(pc)
            assert s["concept_wins"] == sum(a < b for a, b in zip(pc, pc0))
            assert s["concept_losses"] == sum(a > b for a, b in zip(pc, pc0))
            all_m = [mlog([r[p][kk] for r in rows for p in range(len(rep) + n_sel)])
                     for kk in range(len(scales))]
            k_in = min(range(len(scales)), key=lambda kk: (all_m[kk], kk))
            assert s["best_alpha_in_sample"]["alpha_scale"] == scales[k_in]
            assert s["best_alpha_in_sample"]["mean_log2_rank"] == pytest.approx(all_m[k_in])
    pv = sm["poly_vs_vanilla"]
    assert [(r["poly"], r["mode"], r["vanilla"]) for r in pv] == [
        ("poly", m, "vanilla") for m in steering.MODES]
    for r in pv:
        a = sm["saes"]["poly"][r["mode"]]["report_per_concept_mean_log2_rank"]
        b = sm["saes"]["vanilla"]["linear"]["report_per_concept_mean_log2_rank"]
        assert (r["concept_wins"], r["concept_losses"], r["concept_ties"], r["n_concepts"]) == (
            sum(x < y for x, y in zip(a, b)), sum(x > y for x, y in zip(a, b)),
            sum(x == y for x, y in zip(a, b)), 3)
        assert r["report_mean_log2_rank_diff"] == pytest.approx(
            sm["saes"]["poly"][r["mode"]]["report_mean_log2_rank"]
            - sm["saes"]["vanilla"]["linear"]["report_mean_log2_rank"])
    json.dumps(out)                                           # JSON-ready
    md = render_markdown({"saes": {}, "hook": hook, "date": "d", "polysae_version": "v",
                          "torch_version": "t", "device": "cpu",
                          "held_out": {"source": "s", "n_tokens": 0}, "steering": out})
    for mode in steering.MODES:
        s = sm["saes"]["poly"][mode]
        assert (f"| `poly` | {mode} | {s['alpha_scale']:g} | "
                f"{s['report_mean_log2_rank']:.2f} |") in md


def test_alpha_is_chosen_on_selection_prompts_only(tiny_model, monkeypatch):
    """Fabricated ranks make the selection prompts prefer the weakest push and the reported
    prompts the strongest: the chosen alpha must follow the selection prompts, the reported
    numbers must be the reported prompts' ranks at that alpha, and the in-sample best alpha
    (kept apart as optimistic) must differ."""
    import math

    from polysae.evaluation import steering

    monkeypatch.setattr(steering, "_tokens", _char_tokens)
    n_sel = 2
    sel_tok = [_char_tokens(None, t, True) for t in _NEUTRAL[:n_sel]]

    def fake(model, hook, prompts, target, additions, max_rows=64):
        out = []
        for a in additions:
            n = 0.0 if a is None else float(a.norm())
            row = []
            for p in prompts:
                if any(len(p) == len(s) and bool((p == s).all()) for s in sel_tok):
                    row.append(1 + int(4 * n))              # selection: weak push is best
                else:
                    row.append(1 + int(4000 / max(n, 1.0)))  # reported: strong push is best
            out.append(row)
        return out

    monkeypatch.setattr(steering, "ranks_for_additions", fake)
    poly = _poly(dtype="float32")
    torch.manual_seed(1)
    saes = {"vanilla": SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="linear")).eval(),
            "poly": poly}
    scales = (0.5, 4.0, 32.0)
    out = steering.steering_eval(tiny_model, "blocks.0.hook_resid_post", saes,
                                 concepts=_concepts(), neutral_prompts=_NEUTRAL,
                                 alpha_scales=scales, select_prompts=n_sel)
    rep = [0] + list(range(1 + n_sel, 1 + len(_NEUTRAL)))
    for name, modes in out["modes"].items():
        for mode in modes:
            s = out["summary"]["saes"][name][mode]
            assert s["alpha_scale"] == 0.5, (name, mode)
            assert s["best_alpha_in_sample"]["alpha_scale"] == 32.0, (name, mode)
            ranks = [[e["saes"][name]["ranks_by_mode"][mode][p][0] for p in rep]
                     for e in out["concepts"]]
            # Reported prompts at alpha 0.5: the strong-push-is-best rule, never the selection one.
            for c, e in enumerate(out["concepts"]):
                d = steering.steering_directions(saes[name], [tuple(e["saes"][name]["latents"])])
                n = out["alphas"][0] * float(d[mode][0].norm())
                assert ranks[c] == [1 + int(4000 / max(n, 1.0))] * len(rep)
            flat = [r for rc in ranks for r in rc]
            assert s["report_mean_log2_rank"] == pytest.approx(
                sum(math.log2(r) for r in flat) / len(flat))
            assert s["report_frac_improved"] == sum(r < 4001 for r in flat) / len(flat)


def test_steering_eval_rejects_bad_split(tiny_model, monkeypatch):
    from polysae.evaluation import steering

    monkeypatch.setattr(steering, "_tokens", _char_tokens)
    saes = {"v": SAE(SAEConfig(d_in=16, d_sae=24, k=3, decoder="linear")).eval()}
    for bad in (0, len(_NEUTRAL) + 1):
        with pytest.raises(ValueError, match=rf"select_prompts={bad} must be between 1 and the "
                                             rf"number of neutral prompts \({len(_NEUTRAL)}\)"):
            steering.steering_eval(tiny_model, "blocks.0.hook_resid_post", saes,
                                   concepts=_concepts(), neutral_prompts=_NEUTRAL,
                                   select_prompts=bad)
