"""Reconstruction metrics vs dense torch formulas; CE recovered 1 for x_hat = x, 0 for zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.evaluation.reconstruction import (
    ce_recovered,
    ce_recovered_many,
    density_histogram,
    reconstruction_stats,
)


@pytest.fixture(scope="module")
def tiny_model(make_tiny_hooked):
    return make_tiny_hooked(n_layers=2, d_model=16, d_vocab=50, seed=0)


def test_ce_recovered_identity_and_zero(tiny_model, gen):
    tok = torch.randint(1, 50, (4, 12), generator=gen)
    hook = "blocks.0.hook_resid_post"
    ident = ce_recovered(tiny_model, hook, tok, lambda a: a, batch_size=3)
    assert ident.ce_loss_recovered == pytest.approx(1.0, abs=1e-6)
    assert ident.kl_sae == pytest.approx(0.0, abs=1e-6) and ident.kl_recovered == pytest.approx(1.0)
    # Independent reference: TransformerLens's own mean next-token loss.
    assert ident.ce_clean == pytest.approx(float(tiny_model(tok, return_type="loss")), rel=1e-5)
    zero = ce_recovered(tiny_model, hook, tok, torch.zeros_like)
    assert zero.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.kl_recovered == pytest.approx(0.0, abs=1e-6)
    # Independent reference for zero-ablation: TransformerLens's loss with a zeroing hook.
    assert zero.ce_zero == pytest.approx(float(tiny_model.run_with_hooks(
        tok, return_type="loss", fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))])),
        rel=1e-5)
    seen: list[int] = []
    many = ce_recovered_many(tiny_model, hook, tok, {"id": lambda a: a, "zero": torch.zeros_like},
                             batch_size=3, progress=seen.append)
    assert seen == [3, 1]   # one progress call per batch of contexts
    assert many["id"].ce_loss_recovered == pytest.approx(1.0, abs=1e-6)
    assert many["zero"].ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    half = ce_recovered(tiny_model, hook, tok, lambda a: 0.5 * a)
    assert half.ce_sae == pytest.approx(float(tiny_model.run_with_hooks(
        tok, return_type="loss", fwd_hooks=[(hook, lambda a, hook: 0.5 * a)])), rel=1e-5)


def test_ce_special_positions_keep_clean(tiny_model, gen):
    tok = torch.randint(1, 50, (2, 10), generator=gen)
    tok[:, 0] = 0  # BOS = special: keeps its clean activation, is never a target
    r = ce_recovered(tiny_model, "blocks.0.hook_resid_post", tok, torch.zeros_like,
                     special_ids=[0])
    ref = tiny_model.run_with_hooks(tok, return_type="logits", fwd_hooks=[(
        "blocks.0.hook_resid_post", lambda a, hook: torch.cat([a[:, :1], 0 * a[:, 1:]], 1))])
    lp = ref[:, :-1].log_softmax(-1).gather(-1, tok[:, 1:, None]).squeeze(-1)
    assert r.ce_zero == pytest.approx(float(-lp.mean()), rel=1e-5) and r.n_tokens == 18


@pytest.mark.parametrize("decoder", ["linear", "poly"])
def test_reconstruction_stats_dense_reference(gen, decoder):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, k=4, decoder=decoder, ranks=(12, 4, 4))).eval()
    x = torch.randn(300, 12, generator=gen) * 2 + 1
    st = reconstruction_stats(sae, [x[:128], x[128:256], x[256:]], saebench_batch_tokens=100)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z, path="dense")
    err = (x - x_hat).double().pow(2).sum(-1)
    assert st.mse_per_token == pytest.approx(float(err.mean()), rel=1e-5)
    fvu = float(err.sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    assert st.fvu == pytest.approx(fvu, rel=1e-5)
    assert st.explained_variance == pytest.approx(1 - fvu)
    assert st.l0 == pytest.approx(float((z != 0).sum(-1).double().mean()))
    dens = (z != 0).double().mean(0)
    torch.testing.assert_close(st.density, dens)
    assert st.dead_fraction == pytest.approx(float((dens == 0).double().mean()))
    # Dense fraction at a threshold that splits this SAE's latents (numpy reference).
    thr = float(np.quantile(dens.numpy(), 0.7))
    st_thr = reconstruction_stats(sae, [x], dense_threshold=thr)
    assert 0 < st_thr.dense_fraction < 1
    assert st_thr.dense_fraction == pytest.approx(float(np.mean(dens.numpy() > thr)))
    # SAEBench form: per-batch division; batches here: 100,28 | 100,28 | 44 rows.
    sizes = [100, 28, 100, 28, 44]
    chunks = torch.split(err, sizes)
    ref = sum(float(c.sum()) / len(c) for c in chunks) / 300
    assert st.mse_saebench == pytest.approx(ref, rel=1e-6)
    h = density_histogram(st.density)
    assert sum(h["counts"]) + h["dead"] == 40
    live = dens.numpy()[dens.numpy() > 0]
    ref_counts, ref_edges = np.histogram(np.log10(live), bins=40, range=(-7.0, 0.0))
    assert h["counts"] == ref_counts.tolist() and h["dead"] == int((dens == 0).sum())
    np.testing.assert_allclose(h["log10_edges"], ref_edges)
    assert reconstruction_stats(sae, [x], max_tokens=50).n_tokens == 50
