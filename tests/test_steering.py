"""Steering ranks against a hand-computed unembedding of the steered residual stream."""

from __future__ import annotations

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
