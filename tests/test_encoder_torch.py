"""The plain-torch sparse encoders (``kernels/torch_ops.py``) vs dense autograd of their references.

``topk_encode`` / ``batchtopk_encode`` must give the reference's codes and pre-activations, and
gradients of x, W_enc, b_enc and b_dec equal to float64 autograd through ``topk_encode_ref`` /
``batchtopk_encode_ref``: on the sparse path, with a sparse gradient of ``pre`` (AuxK: merged into
the pairs) and with a dense one (the dense formulas). Odd shapes as in tests/test_kernels.py:
d_in 23, d_sae 45, k = 1 and k = d_sae, rows where BatchTopK keeps nothing or many latents, N = 1.
"""

from __future__ import annotations

import polysae.kernels as pk
import pytest
import torch
from polysae.kernels import reference as ref
from polysae.kernels import torch_ops as tops

from polysae import SAE, SAEConfig

OPS = {"topk": (tops.topk_encode, ref.topk_encode_ref),
       "batchtopk": (tops.batchtopk_encode, ref.batchtopk_encode_ref)}
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def dense(values, indices, F):
    return ref.densify(values.double(), indices, F)


def assert_scaled_close(a, e, tol, what):
    a, e = a.double(), e.double()
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def make(N, D, F, seed=0, neg_rows=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    W = torch.randn(D, F, generator=g) * 0.3
    b = torch.randn(F, generator=g) * 0.1
    bd = torch.randn(D, generator=g) * 0.2
    for r in neg_rows:  # rows whose pre-activations are all negative (BatchTopK keeps none)
        x[r] = bd
    if neg_rows:
        b = b - 5.0 - b.abs()
    return x, W, b, bd


def run(fn, leaves, k, dtype, grad_mode, x_grad, with_bdec, layout="contiguous", seed=1):
    x, W, b, bd = (t.to(dtype, copy=True) for t in leaves)
    if layout == "latent-major":  # storage [F, D], logical [D, F]
        W = W.t().contiguous().t()
    x.requires_grad_(x_grad)
    W.requires_grad_()
    b.requires_grad_()
    bd.requires_grad_(with_bdec)
    v, i, pre = fn(x, W, b, k, bd if with_bdec else None)
    N, F = pre.shape
    g = torch.Generator().manual_seed(seed)
    Gz = torch.randn(N, F, generator=g).to(dtype)
    # a loss through the dense codes, so that slot order within a row does not matter
    loss = (ref.densify(v, i, F) * Gz).sum()
    if grad_mode == "sparse-pre":  # AuxK-like: top-3 of masked pre per row
        dead = torch.rand(F, generator=g) < 0.4
        pv, _ = pre.masked_fill(~dead, float("-inf")).topk(min(3, int(dead.sum())), dim=-1)
        loss = loss + (pv * torch.randn(pv.shape, generator=g).to(dtype)).sum()
    elif grad_mode == "dense-pre":
        loss = loss + (pre * torch.randn(N, F, generator=g).to(dtype)).sum()
    loss.backward()
    return (dense(v.detach(), i, F), pre.detach(), W.grad, b.grad,
            bd.grad if with_bdec else None, x.grad if x_grad else None, W)


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
@pytest.mark.parametrize("grad_mode", ["values", "sparse-pre", "dense-pre"])
@pytest.mark.parametrize("x_grad,with_bdec", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("shape", [(37, 23, 45, 5), (1, 23, 45, 1), (9, 7, 13, 13)],
                         ids=["odd", "one-row-k1", "k=F"])
def test_sparse_encoder_matches_dense_autograd(mode, grad_mode, x_grad, with_bdec, shape):
    N, D, F, K = shape
    leaves = make(N, D, F, seed=N + K, neg_rows=(2, 5) if N > 5 and mode == "batchtopk" else ())
    fast, spec = OPS[mode]
    got = run(fast, leaves, K, torch.float32, grad_mode, x_grad, with_bdec)
    exp = run(spec, leaves, K, torch.float64, grad_mode, x_grad, with_bdec)
    names = ("codes", "pre", "dW_enc", "db_enc", "db_dec", "dx")
    for a, e, what in zip(got[:6], exp[:6], names):
        if e is None:
            assert a is None, what
            continue
        assert_scaled_close(a, e, TOL[torch.float32], what)
    assert got[2].stride() == got[6].stride()  # the gradient obeys W_enc's layout


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "latent-major"])
def test_dtypes_and_layouts(mode, dtype, layout):
    leaves = make(21, 11, 30, seed=3)
    fast, spec = OPS[mode]
    got = run(fast, leaves, 4, dtype, "sparse-pre", False, True, layout)
    # the reference on the same rounded inputs, in float64
    rounded = tuple(t.to(dtype).double() for t in leaves)
    exp = run(spec, rounded, 4, torch.float64, "sparse-pre", False, True)
    if dtype != torch.float64:
        # the reference in the same dtype makes the same selection (identical pre), near ties
        # included; its dense backward rounds to the dtype too
        exp = run(spec, leaves, 4, dtype, "sparse-pre", False, True)
        assert torch.equal(got[1], exp[1]) and torch.equal(got[0], exp[0])
        for a, e, what in zip(got[2:5], exp[2:5], ("dW_enc", "db_enc", "db_dec")):
            assert a.dtype == dtype, what
            assert_scaled_close(a, e, 4 * TOL[dtype], what)
        assert got[2].stride() == got[6].stride()
        return
    for a, e, what in zip(got[:5], exp[:5], ("codes", "pre", "dW_enc", "db_enc", "db_dec")):
        assert_scaled_close(a, e, TOL[dtype], what)
    assert got[2].stride() == got[6].stride()


def test_batchtopk_codes_keep_k_times_n_and_pad_with_zeros():
    leaves = make(12, 9, 40, seed=5, neg_rows=(0, 7))
    x, W, b, bd = leaves
    v, i, pre = tops.batchtopk_encode(x, W, b, 3, bd)
    v_r, i_r, _ = ref.batchtopk_encode_ref(x, W, b, 3, bd)
    assert v.shape == v_r.shape  # same Kmax
    torch.testing.assert_close(dense(v, i, 40), dense(v_r, i_r, 40), rtol=0, atol=0)
    assert int((v > 0).sum()) <= 3 * 12
    assert (v[0] == 0).all() and (v[7] == 0).all()
    # slots in latent order, kept values first, then padding
    for r in range(12):
        live = v[r] > 0
        n = int(live.sum())
        assert live[:n].all() and not live[n:].any()
        assert (i[r, :n].diff() > 0).all()


def test_errors_name_the_shapes():
    x, W, b, bd = make(4, 5, 6)
    with pytest.raises(ValueError, match="topk_encode"):
        tops.topk_encode(x, W, b[:3], 2)
    with pytest.raises(ValueError, match="b_dec"):
        tops.batchtopk_encode(x, W, b, 2, bd[:2])
    with pytest.raises(ValueError, match="k=7"):
        tops.topk_encode(x, W, b, 7)


def test_dispatch_uses_the_sparse_torch_op():
    """With the torch backend the public ops are the sparse ones (the conftest forces it)."""
    assert pk.BACKEND == "torch"
    x, W, b, _ = make(6, 5, 8)
    W.requires_grad_()
    v, i, pre = pk.topk_encode(x, W, b, 2)
    assert type(v.grad_fn).__name__ == "SparseEncodeFnBackward"
    v, i, pre = pk.batchtopk_encode(x, W, b, 2)
    assert type(v.grad_fn).__name__ == "SparseEncodeFnBackward"


@pytest.mark.parametrize("sparsifier", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("decoder", ["linear", "poly"])
def test_sae_loss_gradients_equal_the_reference_encoders(monkeypatch, sparsifier, decoder):
    """A full ``SAE.loss`` with AuxK active gives the same loss and gradients through the sparse
    torch encoders as through the dense references (swapped in at the dispatch seam)."""
    extra = {"matryoshka_widths": (16, 48)} if sparsifier == "matryoshka" else {}
    cfg = SAEConfig(d_in=12, d_sae=48, k=4, decoder=decoder, ranks=(12, 4, 4),
                    sparsifier=sparsifier, dtype="float64", **extra)
    torch.manual_seed(0)
    sae = SAE(cfg)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(20, 12, dtype=torch.float64)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True

    def grads():
        sae.load_state_dict(state)
        sae.zero_grad(set_to_none=True)
        lo = sae.loss(x, dead_mask=dead)
        lo.loss.backward()
        return lo.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()
                                  if p.grad is not None}

    loss_fast, g_fast = grads()
    monkeypatch.setattr(pk, "topk_encode", ref.topk_encode_ref)
    monkeypatch.setattr(pk, "batchtopk_encode", ref.batchtopk_encode_ref)
    loss_ref, g_ref = grads()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-12, atol=1e-12)
    assert g_fast.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-9, atol=1e-11, msg=n)
