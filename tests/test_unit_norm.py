"""Unit-norm decoder rows (``SAEConfig.unit_norm_decoder``, issue #28) and the few-steps warning of
``polysae train``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.cli.train import MIN_STEPS, few_steps_warning, planned_steps
from polysae.training import TensorSource, TrainConfig, Trainer
from polysae.training.unit_norm import (
    after_step,
    before_step,
    normalize_rows_,
    remove_parallel_grad_,
)

D, F = 16, 48


def cfg(**kw) -> SAEConfig:
    return SAEConfig(d_in=D, d_sae=F, k=4, decoder="linear", unit_norm_decoder=True, **kw)


def data(n: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 2 + 0.5


def test_off_by_default_and_refused_for_poly():
    assert SAEConfig(d_in=D, d_sae=F, k=4).unit_norm_decoder is False
    with pytest.raises(ValueError, match=r"SAEConfig.unit_norm_decoder: .*linear decoders only"):
        SAEConfig(d_in=D, d_sae=F, k=4, decoder="poly", unit_norm_decoder=True)
    # the paper's recipe is untouched: rows start at norm 0.1 and the hooks do nothing
    torch.manual_seed(0)
    plain = SAE(SAEConfig(d_in=D, d_sae=F, k=4, decoder="linear"))
    torch.testing.assert_close(plain.decoder.W_dec.norm(dim=-1), torch.full((F,), 0.1))
    plain.loss(data(64)).loss.backward()
    g = plain.decoder.W_dec.grad.clone()
    before_step(plain)
    assert torch.equal(plain.decoder.W_dec.grad, g)


def test_init_has_unit_rows_and_the_paper_encoder():
    torch.manual_seed(0)
    a = SAE(cfg())
    torch.manual_seed(0)
    b = SAE(SAEConfig(d_in=D, d_sae=F, k=4, decoder="linear"))
    torch.testing.assert_close(a.decoder.W_dec.norm(dim=-1), torch.ones(F))
    assert torch.equal(a.W_enc, b.W_enc)  # same encoder init; the rows differ only in norm
    torch.testing.assert_close(a.decoder.W_dec, 10 * b.decoder.W_dec)


def test_parallel_gradient_removed_is_the_closed_form():
    g = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter(torch.randn(F, D, generator=g) * 3)
    W.grad = torch.randn(F, D, generator=g)
    w_hat = W.detach() / W.detach().norm(dim=-1, keepdim=True)
    G = W.grad.clone()
    remove_parallel_grad_(W)
    # row by row, in float64: g - (g . w) w for the unit row w
    for i in range(F):
        w, gi = w_hat[i].double(), G[i].double()
        torch.testing.assert_close(W.grad[i].double(), gi - (gi @ w) * w, atol=1e-6, rtol=1e-6)
    assert (W.grad * w_hat).sum(-1).abs().max() < 1e-5  # tangent to every row
    normalize_rows_(W.data)
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(F))


def test_after_a_step_rows_have_norm_one():
    """The trainer's step: rows at norm 1 after every optimiser step, the applied gradient had no
    component along the rows, and training still reduces the loss."""
    torch.manual_seed(0)
    sae = SAE(cfg())
    X = data()
    seen = []

    def check(trainer, out):
        W = sae.decoder.W_dec
        seen.append(float((W.detach().norm(dim=-1) - 1).abs().max()))

    res = Trainer(sae, TrainConfig(steps=30, lr=3e-3, progress=False)).fit(
        TensorSource(X, 64), callback=check)
    assert res.steps == 30 and len(seen) == 30 and max(seen) < 1e-5
    # one step by hand: project, Adam, renormalise
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae.loss(X[:64]).loss.backward()
    W = sae.decoder.W_dec
    g0, w0 = W.grad.clone(), W.detach() / W.detach().norm(dim=-1, keepdim=True)
    before_step(sae)
    torch.testing.assert_close(W.grad, g0 - (g0 * w0).sum(-1, keepdim=True) * w0)
    opt.step()
    assert (W.norm(dim=-1) - 1).abs().max() > 1e-7  # Adam's step alone moves the norms
    after_step(sae)
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(F))
    # and the exported SAE keeps unit rows
    assert (res.saes["sae"].decoder.W_dec.norm(dim=-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("sparsifier", ["topk", "batchtopk", "jumprelu", "relu"])
def test_activation_scale_folds_into_the_codes_keeping_unit_rows(sparsifier):
    """``normalize=True`` with unit rows: the saved SAE takes raw x, reproduces s * x_hat_n(x/s)
    and still has unit-norm rows (the scale goes to the codes, not to W_dec)."""
    torch.manual_seed(0)
    sae = SAE(cfg(sparsifier=sparsifier))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.2)
        if sae.cfg.uses_threshold:
            sae.threshold.fill_(0.02)
    sae.eval()
    s = 3.7
    x = data(64, seed=1) * s
    with torch.no_grad():
        want_z, want = sae.encode(x / s) * s, sae(x / s) * s
        sae.fold_scale_(s)
        torch.testing.assert_close(sae.encode(x), want_z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decoder.W_dec.norm(dim=-1), torch.ones(F))


def test_unit_norm_round_trips_through_the_saelens_export(tmp_path):
    import polysae
    from polysae.formats import export

    sae = SAE(cfg()).eval()
    export(sae, tmp_path / "sl", "saelens", metadata={"model": "m", "hook": "blocks.0.x"})
    assert polysae.load(tmp_path / "sl").cfg.unit_norm_decoder


# -- polysae train: fewer than ~500 steps ------------------------------------------------------
def test_few_steps_warning_names_the_flags():
    assert planned_steps(None, 200_000, 4096, 10_000) == 49  # the run
    w = few_steps_warning(None, 200_000, 4096, 10_000, 40_000_000)
    assert w.startswith("this run takes only 49 optimiser steps (--tokens 200000 / --batch-size "
                        "4096)")
    for flag in ("--tokens", "--steps", "--batch-size", "several passes"):
        assert flag in w
    assert "one pass over the 3000 harvested rows" in few_steps_warning(None, None, 32, 93, 3000)
    assert "(--steps 12)" in few_steps_warning(12, 10**9, 32, 93, 3000)
    assert few_steps_warning(MIN_STEPS, None, 4096, 1, 1) is None
    assert few_steps_warning(None, 4096 * MIN_STEPS, 4096, 1, 1) is None
    assert few_steps_warning(None, None, 4096, MIN_STEPS, 1) is None


HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    """A tiny harvested store (1-layer random HookedTransformer, 20 contexts of 16 tokens)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from polysae.data.harvesting import HarvestConfig, harvest

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=32, d_head=8, n_heads=2, d_vocab=100, act_fn="gelu")).eval()
    d = tmp_path_factory.mktemp("acts")
    tok = torch.randint(0, 100, (20, 16), generator=torch.Generator().manual_seed(1))
    np.save(d / "t.npy", tok.numpy())
    harvest(HarvestConfig(model="tiny", hooks=[HOOK], dataset=str(d / "t.npy"), tokens=320,
                          ctx=16, out=str(d / "acts"), batch_size=8, shard_size=400,
                          dtype="float32", progress=False), model=model)
    return d / "acts"


def cli(*argv) -> int:
    from polysae.__main__ import main

    return main([str(a) for a in argv])


def test_cli_train_warns_on_few_steps_and_trains_unit_norm(acts, tmp_path, capsys):
    import json

    import polysae

    common = ["--acts", acts, "--decoder", "linear", "--d-sae", 32, "--k", 4, "--batch-size",
              32, "--no-progress", "--device", "cpu"]
    assert cli("train", *common, "--steps", 6, "--unit-norm-decoder", "--out",
               tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "polysae train: warning: this run takes only 6 optimiser steps (--steps 6)" in err
    sae = polysae.load(tmp_path / "a" / "vanilla")
    assert sae.cfg.unit_norm_decoder
    torch.testing.assert_close(sae.decoder.W_dec.norm(dim=-1), torch.ones(32))
    # the checkpoint records what the SAELens export needs: context size and BOS
    meta = json.loads((tmp_path / "a" / "vanilla" / "config.json").read_text())["metadata"]
    assert meta["context_size"] == 16 and meta["prepend_bos"] is True
    # one pass (no --steps / --tokens): 320 rows / 32
    assert cli("train", *common, "--out", tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert "only 10 optimiser steps (one pass over the 320 harvested rows" in err
    assert "--tokens" in err
    # a poly SAE with the option is refused with the config's message
    assert cli("train", "--acts", acts, "--decoder", "poly", "--unit-norm-decoder", "--out",
               tmp_path / "c", "--no-progress") == 2
    assert "poly: --unit-norm-decoder: applies to linear decoders only" in capsys.readouterr().err


def test_resume_accepts_a_state_saved_before_the_field_existed(tmp_path):
    """A trainer state written by a polysae without ``unit_norm_decoder`` resumes: the saved SAE
    config compares equal once rebuilt with the new field at its default."""
    from polysae.training.state import STATE_FILE

    X = data(512)
    torch.manual_seed(0)
    plain = SAEConfig(d_in=D, d_sae=F, k=4, decoder="linear")
    Trainer(SAE(plain), TrainConfig(steps=4, progress=False, checkpoint_every=2),
            tmp_path).fit(TensorSource(X, 64))
    for name in (STATE_FILE, "trainer_state.prev.pt"):
        st = torch.load(tmp_path / name, weights_only=True)
        del st["sae_config"]["unit_norm_decoder"]
        torch.save(st, tmp_path / name)
    res = Trainer(SAE(plain), TrainConfig(steps=6, progress=False),
                  tmp_path).fit(TensorSource(X, 64), resume=True)
    assert res.steps == 6
    with pytest.raises(ValueError, match="different SAE config"):
        Trainer(SAE(cfg()), TrainConfig(steps=8, progress=False),
                tmp_path).fit(TensorSource(X, 64), resume=True)
