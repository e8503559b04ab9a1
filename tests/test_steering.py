"""Steering ranks against a hand-computed unembedding of the steered residual stream."""

from __future__ import annotations

import json

import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.steering import hook_norm, steer_ranks, target_rank, word_latent


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
    from polysae.steering import Concept, load_concepts

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
    steered ranks = steer_ranks with those decoder directions; summaries recomputed."""
    import math

    from polysae import models
    from polysae.steering import Concept, steering_eval

    lm = models.load_model("smollm2-135m")
    m = lm.model
    hook = "blocks.3.hook_resid_post"
    torch.manual_seed(0)
    saes = {"vanilla": SAE(SAEConfig(d_in=576, d_sae=128, k=8, decoder="linear")).eval(),
            "poly": SAE(SAEConfig(d_in=576, d_sae=128, k=8, decoder="poly")).eval()}
    concept = Concept("canada x oil", " Canada", " oil", " Keystone",
                      "The controversial cross-border pipeline project is called the")
    neutral = ("I think that the",)
    scales = (0.0, 1.0, 4.0)
    out = steering_eval(m, hook, saes, concepts=[concept], neutral_prompts=neutral,
                        alpha_scales=scales)
    c = out["concepts"][0]
    target = int(m.to_tokens(" Keystone", prepend_bos=False)[0, 0])
    prompts = [m.to_tokens(p)[0] for p in (concept.prompt, *neutral)]
    with torch.inference_mode():
        clean = [target_rank(m(p[None])[0, -1].float(), target) for p in prompts]
    assert c["target_id"] == target and c["rank_none"] == clean
    for name, sae in saes.items():
        lat = []
        for w in (concept.word_i, concept.word_j):
            _, cache = m.run_with_cache(m.to_tokens(w), names_filter=hook)
            lat.append(int(sae.encode(cache[hook][0, -1].float()).argmax()))
        assert c["saes"][name]["latents"] == lat
        d = sae.decoder_directions().detach().float()
        ref = steer_ranks(m, hook, prompts, target, d[lat[0]] + d[lat[1]],
                          [a * out["hook_norm"] for a in scales])
        got = c["saes"][name]["ranks"]
        assert [r[0] for r in got] == clean        # alpha 0 changes nothing
        assert got == ref
        per = out["summary"][name]["per_alpha"]
        for k in range(len(scales)):
            ranks_k = [r[k] for r in got]
            assert per[k]["mean_log2_rank"] == pytest.approx(
                sum(math.log2(r) for r in ranks_k) / len(ranks_k))
            assert per[k]["frac_improved"] == sum(
                r < b for r, b in zip(ranks_k, clean)) / len(clean)
    assert out["hook_norm"] == pytest.approx(hook_norm(m, hook, prompts), rel=1e-5)
