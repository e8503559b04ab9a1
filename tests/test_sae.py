"""The SAE core against independent references. CPU only, float64 where exactness matters.

- decode vs a fully materialised polynomial (A [F, D], B [F, F, D], Gamma [F, F, F, D]) built by
  einsum from the definitions in docs/method.md, for shared and separate U;
- lambda2 = lambda3 = 0 vs a linear SAE whose dictionary is U C1^T;
- the contract forward(x) == decode(encode(x)) for every sparsifier x decoder;
- sparse and dense decode paths agree in values and gradients; gradcheck in float64;
- sparsifier semantics (TopK, BatchTopK count and threshold EMA, JumpReLU straight-through
  gradients, Matryoshka prefix losses, AuxK) vs formulas written out here;
- parameter accounting vs the paper's numbers (docs/method.md).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from polysae import SAE, SAEConfig, count_params
from polysae.config import DECODERS, SPARSIFIERS

torch.set_default_dtype(torch.float32)


def make(dec="poly", sp="topk", shared=True, order=3, d_in=12, d_sae=40, k=4, ranks=(10, 6, 3),
         dtype="float64", **kw):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=k, sparsifier=sp, decoder=dec, ranks=ranks,
                    order=order, shared_u=shared, dtype=dtype, **kw)
    sae = SAE(cfg)
    with torch.no_grad():  # non-trivial biases and lambdas so that every term is exercised
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        if dec == "poly" and order >= 2:
            sae.decoder.lambda2.fill_(-0.7)
        if dec == "poly" and order >= 3:
            sae.decoder.lambda3.fill_(0.3)
    return sae


def materialised_decode(sae: SAE, z: torch.Tensor) -> torch.Tensor:
    """x_hat = b + z A + l2 sum_ij z_i z_j B_ij + l3 sum_ijk z_i z_j z_k G_ijk, tensors built
    element by element from U's rows (independent of the factorised implementation)."""
    d = sae.decoder
    U, C1 = d.U, d.C1
    A = U @ C1.T  # [F, D]
    out = sae.b_dec + z @ A
    if d.C2 is not None:
        r2 = d.C2.shape[1]
        V = U if d.U2 is None else d.U2
        B = torch.einsum("ir,jr,dr->ijd", U[:, :r2], V[:, :r2], d.C2)  # [F, F, D]
        out = out + d.lambda2 * torch.einsum("ni,nj,ijd->nd", z, z, B)
    if d.C3 is not None:
        r3 = d.C3.shape[1]
        V = U if d.U2 is None else d.U2
        W = U if d.U3 is None else d.U3
        G = torch.einsum("ir,jr,kr,dr->ijkd", U[:, :r3], V[:, :r3], W[:, :r3], d.C3)
        out = out + d.lambda3 * torch.einsum("ni,nj,nk,ijkd->nd", z, z, z, G)
    return out


@pytest.mark.parametrize("shared,order", [(True, 3), (False, 3), (True, 2), (True, 1), (False, 2)])
def test_decode_matches_materialised_polynomial(shared, order):
    sae = make(shared=shared, order=order, d_sae=24, ranks=(8, 5, 3))
    z = torch.zeros(7, 24, dtype=torch.float64)
    idx = torch.randint(0, 24, (7, 4))
    z.scatter_(1, idx, torch.rand(7, 4, dtype=torch.float64) + 0.1)
    ref = materialised_decode(sae, z)
    with torch.no_grad():
        for path in ("sparse", "dense", "auto"):
            torch.testing.assert_close(sae.decode(z, path=path), ref, rtol=1e-10, atol=1e-10)


def test_zero_lambdas_equal_low_rank_linear_sae():
    poly = make(dec="poly")
    with torch.no_grad():
        poly.decoder.lambda2.zero_()
        poly.decoder.lambda3.zero_()
    lin = SAE(poly.cfg.replace(decoder="linear"))
    with torch.no_grad():
        lin.W_enc.copy_(poly.W_enc)
        lin.b_enc.copy_(poly.b_enc)
        lin.b_dec.copy_(poly.b_dec)
        lin.decoder.W_dec.copy_(poly.decoder.U @ poly.decoder.C1.T)
    x = torch.randn(9, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(poly(x), lin(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dec,sp", list(itertools.product(DECODERS, SPARSIFIERS)))
@pytest.mark.parametrize("train_mode", [False, True])
def test_forward_equals_decode_of_encode(dec, sp, train_mode):
    sae = make(dec=dec, sp=sp, dtype="float32", d_sae=64)
    sae.train(train_mode)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        if train_mode and sp in ("batchtopk", "matryoshka"):
            torch.manual_seed(1)  # the batch top-k is deterministic; same batch both times
        xh = sae(x)
        z = sae.encode(x)
        assert z.shape == (2, 5, 64) and xh.shape == x.shape
        torch.testing.assert_close(xh, sae.decode(z), rtol=1e-5, atol=1e-5)
        if sp == "topk":
            assert int((z != 0).sum(-1).max()) <= sae.cfg.k


def test_sparse_and_dense_paths_agree_in_gradients():
    sae = make(shared=False, d_sae=30, ranks=(8, 6, 4))
    z = torch.zeros(6, 30, dtype=torch.float64)
    z.scatter_(1, torch.randint(0, 30, (6, 5)), torch.rand(6, 5, dtype=torch.float64))
    grads = {}
    for path in ("sparse", "dense"):
        sae.zero_grad()
        zz = z.clone().requires_grad_(True)
        out = sae.decode(zz, path=path)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[path] = {n: p.grad.clone() for n, p in sae.named_parameters()
                       if p.grad is not None}
        grads[path]["z"] = zz.grad.clone()
    assert set(grads["sparse"]) == set(grads["dense"]) >= {"decoder.U", "decoder.U2", "decoder.U3",
                                                           "decoder.C1", "decoder.C2", "decoder.C3",
                                                           "decoder.lambda2", "decoder.lambda3",
                                                           "b_dec", "z"}
    # The sparse path differentiates only through the active entries of z (by design: inactive
    # latents are not in the graph), so compare the code gradient there.
    active = z != 0
    grads["dense"]["z"] = torch.where(active, grads["dense"]["z"], 0.0)
    assert not grads["sparse"]["z"][~active].any()
    for name in grads["dense"]:
        torch.testing.assert_close(grads["sparse"][name], grads["dense"][name], rtol=1e-10,
                                   atol=1e-10, msg=name)


@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_both_decode_paths(shared):
    from polysae.kernels.reference import densify, poly_decode_dense_ref, poly_decode_ref

    g = torch.Generator().manual_seed(3)
    F_, D, K, N = 9, 5, 3, 4
    r1, r2, r3 = 5, 4, 2

    def p(*s):
        return torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)

    values, U, C1, C2, C3, b = p(N, K), p(F_, r1), p(D, r1), p(D, r2), p(D, r3), p(D)
    l2, l3 = p(), p()
    U2, U3 = (p(F_, r2), p(F_, r3)) if not shared else (None, None)
    idx = torch.randint(0, F_, (N, K), generator=g)
    idx[0, 1] = idx[0, 0]  # a repeated latent within one row
    extra = tuple(t for t in (U2, U3) if t is not None)

    def sparse(values, U, C1, C2, C3, l2, l3, b, *us):
        return poly_decode_ref(values, idx, U, C1, C2, C3, l2, l3, b, *us)

    def dense(values, U, C1, C2, C3, l2, l3, b, *us):
        return poly_decode_dense_ref(densify(values, idx, F_), U, C1, C2, C3, l2, l3, b, *us)

    args = (values, U, C1, C2, C3, l2, l3, b, *extra)
    assert torch.autograd.gradcheck(sparse, args)
    assert torch.autograd.gradcheck(dense, args)


def test_topk_encoder_formula():
    sae = make(sp="topk", k=3)
    x = torch.randn(6, 12, dtype=torch.float64)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    ref = torch.zeros_like(pre)
    top = pre.topk(3, dim=-1)
    ref.scatter_(1, top.indices, top.values.clamp_min(0))
    torch.testing.assert_close(sae.encode(x), ref)
    sae.cfg.apply_b_dec_to_input = False
    torch.testing.assert_close(sae.pre_acts(x), x @ sae.W_enc + sae.b_enc)


def test_batchtopk_keeps_k_per_row_on_average_and_tracks_threshold():
    sae = make(sp="batchtopk", k=3, d_sae=40)
    sae.train()
    x = torch.randn(16, 12, dtype=torch.float64)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        z = sae.encode(x)
    kept = torch.relu(pre).flatten().topk(3 * 16).values
    assert int((z != 0).sum()) == int((kept > 0).sum())
    torch.testing.assert_close(z.flatten().sort().values[-48:], kept.sort().values)
    m = sae.cfg.batchtopk_threshold_momentum
    # one training-mode encode: theta = (1 - m) * 0 + m * (smallest kept activation)
    assert torch.allclose(sae.threshold, torch.full_like(sae.threshold, m * float(kept.min())))
    sae.eval()  # threshold inference: pre > theta, per token
    with torch.no_grad():
        zi = sae.encode(x)
    theta = sae.threshold[0]
    torch.testing.assert_close(zi, torch.where(pre > theta, torch.relu(pre), 0.0))


def test_jumprelu_straight_through_gradients():
    sae = make(sp="jumprelu", d_sae=20, jumprelu_bandwidth=0.5)
    with torch.no_grad():
        sae.threshold.uniform_(0.05, 0.3)
    x = torch.randn(32, 12, dtype=torch.float64)
    out = sae.loss(x)
    out.sparsity.backward()
    pre = out.codes.pre_acts.detach()
    th = sae.threshold.detach()
    bw = 0.5
    rect = (((pre - th) / bw).abs() < 0.5).double()
    # d/dtheta of l0_coef * mean_n sum_i H(pre - theta) = -(1/bw) K((pre-theta)/bw), mean over rows
    want = -(1.0 / bw) * rect.sum(0) / pre.shape[0] * sae.cfg.l0_coefficient
    torch.testing.assert_close(sae.threshold.grad, want)
    # the codes themselves: pre * (pre > theta)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), pre * (pre > th))


def test_matryoshka_inner_losses_use_own_decoder():
    sae = make(sp="matryoshka", d_sae=32, k=4, matryoshka_widths=(4, 16, 32))
    sae.train()
    x = torch.randn(10, 12, dtype=torch.float64)
    torch.manual_seed(0)
    out = sae.loss(x)
    z = torch.zeros(10, 32, dtype=torch.float64).scatter_add(1, out.codes.indices,
                                                            out.codes.values.detach())
    want = 0.0
    for w in (4, 16):
        zw = z.clone()
        zw[:, w:] = 0
        want += float((materialised_decode(sae, zw) - x).pow(2).sum(-1).mean())
    assert abs(float(out.inner) - want) < 1e-8
    want_mse = float((materialised_decode(sae, z) - x).pow(2).sum(-1).mean())
    assert abs(float(out.mse) - want_mse) < 1e-8


def test_auxk_formula():
    sae = make(sp="topk", k=3, d_sae=40, aux_k=5)
    x = torch.randn(8, 12, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.arange(0, 40, 3)] = True  # 14 dead latents
    out = sae.loss(x, dead_mask=dead)
    pre = out.codes.pre_acts.detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(5, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)  # raw, no ReLU
    recon = materialised_decode(sae, z)  # includes b_dec, as SAELens
    resid = x - out.x_hat.detach()
    want = 1.0 * min(14 / 5, 1.0) * (recon - resid).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.aux.detach(), want.detach())
    assert float(sae.loss(x, dead_mask=torch.zeros(40, dtype=torch.bool)).aux) == 0.0


def test_relu_l1_penalty_formula():
    sae = make(sp="relu", l1_coefficient=0.3)
    x = torch.randn(5, 12, dtype=torch.float64)
    out = sae.loss(x)
    z = torch.relu(sae.pre_acts(x))
    norms = (sae.decoder.U @ sae.decoder.C1.T).norm(dim=-1)
    torch.testing.assert_close(out.sparsity, 0.3 * (z * norms).sum(-1).mean())


def test_parameter_accounting_matches_paper():
    c = count_params(SAEConfig(d_in=768, d_sae=16384, ranks=(768, 64, 64)))
    assert c.decoder == 13_271_810
    assert c.vanilla_decoder == 12_583_680
    assert abs(c.overhead_vs_sae - 0.0273) < 5e-4
    assert abs(c.overhead_vs_decoder - 0.0547) < 5e-4
    c32 = count_params(SAEConfig(d_in=768, d_sae=16384, ranks=(768, 32, 32)))
    assert round(c32.decoder / 1e6, 2) == 13.22
    # the module's real parameters match the formula (no leftover W_dec is created)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, ranks=(16, 4, 4)))
    n = sum(p.numel() for n_, p in sae.named_parameters() if n_ not in ("W_enc", "b_enc"))
    assert n == count_params(sae.cfg).decoder


def test_analysis_accessors_match_definitions():
    sae = make(shared=True, d_sae=20, ranks=(8, 5, 3))
    d = sae.decoder
    U = d.U
    torch.testing.assert_close(sae.linear_atom(3), d.C1 @ U[3])
    torch.testing.assert_close(sae.pair_atom(2, 7), d.C2 @ (U[2, :5] * U[7, :5]))
    torch.testing.assert_close(sae.triple_atom(1, 2, 3), d.C3 @ (U[1, :3] * U[2, :3] * U[3, :3]))
    dirs = sae.decoder_directions()
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(20, dtype=torch.float64))
    # a pair of latents decodes to
    # b + z_i A_i + z_j A_j + l2 (z_i^2 B_ii + 2 z_i z_j B_ij + z_j^2 B_jj)
    # + l3 (sum over the 8 ordered triples)
    z = torch.zeros(1, 20, dtype=torch.float64)
    z[0, 2], z[0, 7] = 0.6, 1.3
    ids, zs = (2, 7), (0.6, 1.3)
    want = sae.b_dec + 0.6 * sae.linear_atom(2) + 1.3 * sae.linear_atom(7)
    for a, b in itertools.product(range(2), repeat=2):
        want = want + d.lambda2 * zs[a] * zs[b] * sae.pair_atom(ids[a], ids[b])
    for a, b, c in itertools.product(range(2), repeat=3):
        want = want + d.lambda3 * zs[a] * zs[b] * zs[c] * sae.triple_atom(ids[a], ids[b], ids[c])
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(z)[0], want.detach())
    lin = make(dec="linear")
    with pytest.raises(ValueError, match="no pairwise atoms"):
        lin.pair_atom(0, 1)


def test_input_errors_name_the_shape():
    sae = make(dtype="float32", check_finite=True)
    with pytest.raises(ValueError, match=r"d_in=12.*\(3, 11\)"):
        sae(torch.randn(3, 11))
    bad = torch.randn(3, 12)
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf.*\[1, 4\]"):
        sae.encode(bad)
    with pytest.raises(ValueError, match="d_sae=40"):
        sae.decode(torch.zeros(2, 39))
