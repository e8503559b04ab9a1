"""Triton decode kernels vs their plain-torch references, forward and every gradient.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest before the kernels
import); on a CUDA machine the same tests run the compiled kernels. Reference: float64 torch
autograd through ``reference.poly_decode_ref`` / ``linear_decode_ref`` on the same (dtype-rounded)
inputs.

Shapes are tiny and deliberately odd (docs/kernels.md / issue 4): d_in not a power of two, d_sae not
a multiple of any block, k = 1, rows whose values are all zero, one latent active in more rows than
a reduction block (BLOCK_P = 32) holds, N crossing the BLOCK_N = 16 row block, R1 > BLOCK_R = 128
(two column blocks), unequal ranks, negative values (AuxK) and padding zeros.

Crash isolation: an out-of-bounds load segfaults the interpreter. Every kernel test body runs in a
forked child (``isolated``), so a crash fails that one test with the signal number instead of
killing pytest; ``make test`` also runs under xdist, which replaces a crashed worker.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import traceback
from pathlib import Path

import polysae.kernels as pk
import pytest
import torch
from polysae.kernels import reference as ref

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(pk._TRITON is None,
                       reason="Triton path unavailable (no triton, or neither CUDA nor "
                              "TRITON_INTERPRET=1)"),
]

if pk._TRITON is not None:
    from polysae.kernels import sparse_gather as sg
    from polysae.kernels import triton_ops as tops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def isolated(fn):
    """Run the test body in a forked child on CPU; report exceptions and crashes as failures.

    (CUDA contexts do not survive fork, so on a GPU the body runs in-process.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if DEVICE == "cuda" or not hasattr(os, "fork"):
            return fn(*args, **kwargs)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            os.close(r)
            # The parent's OpenMP pool does not survive fork (libgomp deadlocks on the child's
            # first parallel region once the parent has used it): run the child single-threaded.
            torch.set_num_threads(1)
            code, msg = 0, b""
            try:
                fn(*args, **kwargs)
            except BaseException:  # noqa: BLE001 - everything must reach the parent as text
                code, msg = 1, traceback.format_exc().encode()
            with os.fdopen(w, "wb") as fh:
                fh.write(msg)
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            msg = fh.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            pytest.fail(f"kernel test crashed its process with signal {os.WTERMSIG(status)}",
                        pytrace=False)
        if os.WEXITSTATUS(status):
            pytest.fail(msg, pytrace=False)
    return wrapper


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
CASES = {
    # name: (N, K, F, D, (R1, R2, R3))
    "odd": (13, 5, 37, 23, (20, 7, 5)),
    "k1": (9, 1, 19, 11, (8, 3, 2)),
    "hot_latent": (41, 3, 29, 17, (12, 12, 4)),   # latent 2 in all 41 rows > BLOCK_P, N > BLOCK_N
    "wide": (6, 4, 21, 150, (140, 9, 6)),         # R1 > BLOCK_R: two column blocks, masked tail
}


def make_inputs(case, order, shared, dtype, seed=0):
    """Poly decode inputs in ``dtype`` (leaves, requiring grad) + int64 indices.

    Row 1 is all zeros (a row with no active latent); one slot of row 0 is a padding zero that
    points at latent 0 (so latent 0 also gets a zero-value pair); row 2 has a negative value (AuxK
    passes raw pre-activations). Scales keep fp16 cubic terms far from overflow."""
    N, K, F, D, (r1, r2, r3) = CASES[case]
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(N, K, generator=g) + 0.1
    idx = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(N)])
    if case == "hot_latent":
        idx[:, 0] = 2
        idx[:, 1:] = torch.where(idx[:, 1:] == 2, 3, idx[:, 1:])
    v[1] = 0.0
    if K > 1:
        v[0, -1] = 0.0
        idx[0, -1] = 0
    v[2, 0] = -0.8

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    t = dict(values=v, U=rnd(F, r1, scale=r1 ** -0.5), C1=rnd(D, r1, scale=0.5),
             C2=rnd(D, r2, scale=0.5) if order >= 2 else None,
             C3=rnd(D, r3, scale=0.5) if order >= 3 else None,
             lambda2=torch.tensor(-0.6) if order >= 2 else None,
             lambda3=torch.tensor(0.45) if order >= 3 else None,
             bias=rnd(D),
             U2=rnd(F, r2, scale=r2 ** -0.5) if (not shared and order >= 2) else None,
             U3=rnd(F, r3, scale=r3 ** -0.5) if (not shared and order >= 3) else None)
    leaves = {k: (None if x is None else x.to(DEVICE, dtype).requires_grad_())
              for k, x in t.items()}
    return leaves, idx.to(DEVICE)


ARGS = ("values", "U", "C1", "C2", "C3", "lambda2", "lambda3", "bias", "U2", "U3")


def reference_grads(fn, leaves, idx, grad_out):
    """float64 reference: the same (dtype-rounded) inputs upcast, autograd through ``fn``."""
    ref_leaves = {k: (None if x is None else x.detach().double().requires_grad_())
                  for k, x in leaves.items()}
    out = fn(ref_leaves, idx)
    out.backward(grad_out.double())
    return out.detach(), {k: x.grad for k, x in ref_leaves.items() if x is not None}


def kernel_grads(fn, leaves, idx, grad_out):
    out = fn(leaves, idx)
    out.backward(grad_out)
    return out.detach(), {k: x.grad for k, x in leaves.items() if x is not None}


def poly_call(decode):
    return lambda t, idx: decode(t["values"], idx, t["U"], t["C1"], t["C2"], t["C3"],
                                 t["lambda2"], t["lambda3"], t["bias"], t["U2"], t["U3"])


# Tolerances, relative to the largest magnitude of the reference tensor being compared
# (element-wise relative error is meaningless for entries that cancel to ~0):
# - fp32: products and sums accumulate in fp32 over at most K*R + R1+R2+R3 terms; a few hundred
#   terms at unit roundoff 6e-8 with cancellation give ~1e-6 of the scale; 2e-5 leaves headroom
#   while still catching any wrong term (which is O(1) of the scale).
# - fp16: inputs are exactly representable in both paths, but H, x_hat and every gradient are
#   stored in fp16 (unit roundoff 4.9e-4) and the C GEMMs run in fp16 on CPU; chained through
#   the cubic term that is a few roundoffs, so 1e-2 of the scale.
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def assert_scaled_close(actual, expected, rel, what, floor=0.0):
    """max |actual - expected| <= max(rel * max|expected|, floor)."""
    actual = actual.double()
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs().max().item()
    assert err <= max(rel * scale, floor), (
        f"{what}: max error {err:.3g} > max({rel:g} x scale {scale:.3g}, {floor:.3g})")


def run_and_compare(fn_kernel, fn_ref, leaves, idx, n_out, dtype):
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(idx.shape[0], n_out, generator=g).to(DEVICE, dtype)
    out_r, grads_r = reference_grads(fn_ref, leaves, idx, grad_out)
    floors = {}
    if dtype != torch.float32:
        # A 0-d gradient such as dlambda2 = sum(dH2 * h2) can cancel to far below the size of its
        # terms, so "relative to its own magnitude" says nothing in half precision. There the bar
        # is: no worse than 4x the torch reference run in the same dtype on the same inputs.
        same = {k: (None if x is None else x.detach().clone().requires_grad_())
                for k, x in leaves.items()}
        out_t, grads_t = kernel_grads(fn_ref, same, idx, grad_out)
        floors = {k: 4 * (grads_t[k].double() - grads_r[k]).abs().max().item() for k in grads_r}
        floors["x_hat"] = 4 * (out_t.double() - out_r).abs().max().item()
    out_k, grads_k = kernel_grads(fn_kernel, leaves, idx, grad_out)
    rel = TOL[dtype]
    assert out_k.dtype == dtype
    assert_scaled_close(out_k, out_r, rel, "x_hat", floors.get("x_hat", 0.0))
    assert set(grads_k) == set(grads_r)
    for name in grads_r:
        assert grads_k[name] is not None, f"no gradient for {name}"
        assert grads_k[name].shape == grads_r[name].shape, name
        assert grads_k[name].dtype == leaves[name].dtype, name
        assert_scaled_close(grads_k[name], grads_r[name], rel, f"d{name}", floors.get(name, 0.0))
    return grads_k


# ------------------------------------------------------------------------------------------------
# Poly decode: forward + every gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shared", [True, False], ids=["sharedU", "separateU"])
@pytest.mark.parametrize("case", list(CASES))
@isolated
def test_poly_decode_matches_reference(case, shared, dtype):
    leaves, idx = make_inputs(case, 3, shared, dtype)
    D = CASES[case][3]
    run_and_compare(poly_call(tops.poly_decode), poly_call(ref.poly_decode_ref), leaves, idx, D,
                    dtype)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("shared", [True, False], ids=["sharedU", "separateU"])
@isolated
def test_poly_decode_lower_orders(order, shared):
    leaves, idx = make_inputs("odd", order, shared, torch.float32)
    run_and_compare(poly_call(tops.poly_decode), poly_call(ref.poly_decode_ref), leaves, idx,
                    CASES["odd"][3], torch.float32)


@isolated
def test_poly_decode_shared_u_r3_above_r2():
    """Shared U allows R3 > R2 (each term reads its own prefix of a); separate U does not."""
    leaves, idx = make_inputs("odd", 3, True, torch.float32)
    g = torch.Generator().manual_seed(3)
    leaves["C2"] = (torch.randn(CASES["odd"][3], 4, generator=g)).requires_grad_()
    leaves["C3"] = (torch.randn(CASES["odd"][3], 11, generator=g)).requires_grad_()
    run_and_compare(poly_call(tops.poly_decode), poly_call(ref.poly_decode_ref), leaves, idx,
                    CASES["odd"][3], torch.float32)


@pytest.mark.parametrize("shared", [True, False], ids=["sharedU", "separateU"])
@isolated
def test_atomic_weight_gradient_matches_sorted(shared):
    """The token-major atomic scatter (deterministic=False) gives the same dU as the sorted path."""
    leaves, idx = make_inputs("hot_latent", 3, shared, torch.float32)
    fn = poly_call(tops.poly_decode)
    g = torch.randn(idx.shape[0], CASES["hot_latent"][3],
                    generator=torch.Generator().manual_seed(2))
    _, sorted_grads = kernel_grads(fn, leaves, idx, g)
    sorted_grads = {k: v.clone() for k, v in sorted_grads.items()}
    for x in leaves.values():
        if x is not None:
            x.grad = None
    saved = tops.DETERMINISTIC
    try:
        pk.set_deterministic(False)
        _, atomic_grads = kernel_grads(fn, leaves, idx, g)
    finally:
        tops.DETERMINISTIC = saved
    for name in ("U", "U2", "U3"):
        if name in sorted_grads:
            assert_scaled_close(atomic_grads[name], sorted_grads[name].double(), 1e-6, name)


# ------------------------------------------------------------------------------------------------
# Linear TopK decode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["odd", "k1", "hot_latent", "wide"])
@isolated
def test_linear_decode_matches_reference(case, dtype):
    N, K, F, D, _ = CASES[case]
    leaves, idx = make_inputs(case, 1, True, dtype)
    g = torch.Generator().manual_seed(4)
    lin = {"values": leaves["values"],
           "W_dec": (torch.randn(F, D, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_(),
           "bias": leaves["bias"]}
    run_and_compare(lambda t, i: tops.linear_decode(t["values"], i, t["W_dec"], t["bias"]),
                    lambda t, i: ref.linear_decode_ref(t["values"], i, t["W_dec"], t["bias"]),
                    lin, idx, D, dtype)


# ------------------------------------------------------------------------------------------------
# Building blocks against closed forms
# ------------------------------------------------------------------------------------------------
@isolated
def test_reverse_index_segments():
    """Each latent's segment lists exactly the (row, value) pairs pointing at it, rows ascending."""
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 11, (17, 4), generator=g)
    vals = torch.randn(17, 4, generator=g)
    rev = sg.ReverseIndex(vals, idx, 11)
    for f in range(11):
        a, b = int(rev.offsets[f]), int(rev.offsets[f + 1])
        rows, slots = (idx == f).nonzero(as_tuple=True)
        assert rev.rows[a:b].tolist() == rows.tolist()
        assert torch.equal(rev.vals[a:b], vals[rows, slots])


@isolated
def test_out_of_range_indices_raise_before_launch():
    leaves, idx = make_inputs("odd", 3, True, torch.float32)
    F = CASES["odd"][2]
    for bad_value in (F, -1):
        bad = idx.clone()
        bad[4, 1] = bad_value
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 37\)"):
            poly_call(tops.poly_decode)(leaves, bad)


@isolated
def test_shape_errors_name_the_operand():
    leaves, idx = make_inputs("odd", 3, True, torch.float32)
    wrong = dict(leaves, C1=leaves["C1"][:, :-1])
    with pytest.raises(ValueError, match="C1"):
        poly_call(tops.poly_decode)(wrong, idx)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        poly_call(tops.poly_decode)(leaves, idx[:, :-1])


@isolated
def test_float64_is_served_by_the_torch_path():
    """The kernels accumulate in fp32; a float64 caller must get the exact torch path instead."""
    leaves, idx = make_inputs("odd", 3, False, torch.float64)
    out = poly_call(tops.poly_decode)(leaves, idx)
    expected = poly_call(ref.poly_decode_ref)(leaves, idx)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------
# polysae.SAE uses the op transparently
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aux", [True, False], ids=["auxk", "no-auxk"])
@pytest.mark.parametrize("decoder,shared", [("poly", True), ("poly", False), ("linear", True)],
                         ids=["poly-sharedU", "poly-separateU", "linear"])
@isolated
def test_sae_loss_gradients_same_on_both_backends(decoder, shared, aux):
    """Full SAE loss through the Triton path equals the torch path, for every parameter's
    gradient: with AuxK (negative pre-activations decoded; the encoder backward goes dense) and
    without (the k-sparse encoder backward, b_dec reaching it through x - b_dec)."""
    from polysae import SAE, SAEConfig
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=23, d_sae=45, k=4, decoder=decoder, ranks=(20, 6, 5), shared_u=shared,
                    aux_k=6, aux_coefficient=1.0)
    sae = SAE(cfg).to(DEVICE)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(19, 23, device=DEVICE)
    dead = torch.zeros(45, dtype=torch.bool, device=DEVICE)
    dead[::3] = True
    grads = {}
    for backend in ("torch", "triton"):
        pk.set_backend(backend)
        sae.zero_grad()
        out = sae.loss(x, dead_mask=dead if aux else None)
        assert (out.aux.item() > 0) == aux
        out.loss.backward()
        grads[backend] = (out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()
                                              if p.grad is not None})
    (l_t, g_t), (l_k, g_k) = grads["torch"], grads["triton"]
    assert_scaled_close(l_k, l_t.double(), 2e-6, "loss")
    assert set(g_t) == set(g_k) and g_t
    for name in g_t:
        assert_scaled_close(g_k[name], g_t[name].double(), 2e-5, name)


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------
def _backend_in_subprocess(env_extra, prelude=""):
    env = dict(os.environ, **env_extra)
    code = prelude + "import polysae, polysae.kernels as k; print(k.BACKEND)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_dispatch_env_and_missing_triton():
    """TRITON_INTERPRET=1 selects triton (this process); POLYSAE_DISABLE_TRITON=1 forces torch;
    with triton unimportable, polysae still imports and falls back to torch."""
    assert pk._TRITON is not None
    off = {"TRITON_INTERPRET": "1", "POLYSAE_DISABLE_TRITON": "1"}
    assert _backend_in_subprocess(off) == "torch"
    blocked = "import sys; sys.modules['triton'] = None\n"
    assert _backend_in_subprocess({"TRITON_INTERPRET": "1", "POLYSAE_DISABLE_TRITON": ""},
                                  prelude=blocked) == "torch"


@isolated
def test_poly_decode_under_autocast_computes_in_parameter_dtype():
    """Under bf16 autocast the op still computes (and returns) in the fp32 parameters' dtype, so
    its forward and backward agree with the fp32 reference instead of mixing dtypes."""
    leaves, idx = make_inputs("odd", 3, True, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = poly_call(tops.poly_decode)(leaves, idx)
    assert out.dtype == torch.float32
    g = torch.randn_like(out)
    out.backward(g)
    out_r, grads_r = reference_grads(poly_call(ref.poly_decode_ref), leaves, idx, g)
    assert_scaled_close(out.detach(), out_r, TOL[torch.float32], "x_hat")
    for name, gr in grads_r.items():
        assert_scaled_close(leaves[name].grad, gr, TOL[torch.float32], f"d{name}")


# ------------------------------------------------------------------------------------------------
# TopK encoder with a k-sparse backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_pre", [False, True], ids=["sparse-bwd", "with-pre-grad"])
@pytest.mark.parametrize("x_grad,with_bdec", [(False, False), (True, False), (False, True)],
                         ids=["x-const", "x-grad", "b_dec"])
@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
@isolated
def test_topk_encode_matches_reference(use_pre, x_grad, with_bdec, mode):
    """values/indices/pre equal the reference; dW_enc, db_enc (and dx, db_dec) match float64
    autograd of ``topk_encode_ref`` / ``batchtopk_encode_ref``, both on the k-sparse path and when
    pre also gets a (dense) gradient. BatchTopK codes are compared densified (slot order)."""
    g = torch.Generator().manual_seed(7)
    N, D, F, K = 37, 23, 45, 5
    x = torch.randn(N, D, generator=g).to(DEVICE)
    W = (torch.randn(D, F, generator=g) * 0.3).to(DEVICE)
    b = (torch.randn(F, generator=g) * 0.1).to(DEVICE)
    bd = (torch.randn(D, generator=g) * 0.2).to(DEVICE)
    G = torch.randn(N, F, generator=g).to(DEVICE)
    Gp = torch.randn(N, F, generator=g).to(DEVICE)
    fast = tops.topk_encode if mode == "topk" else tops.batchtopk_encode
    spec = ref.topk_encode_ref if mode == "topk" else ref.batchtopk_encode_ref

    def run(fn, dtype):
        xx = x.to(dtype, copy=True).requires_grad_(x_grad)
        WW = W.to(dtype, copy=True).requires_grad_()
        bb = b.to(dtype, copy=True).requires_grad_()
        bdd = bd.to(dtype, copy=True).requires_grad_()
        v, i, pre = fn(xx, WW, bb, K, bdd if with_bdec else None)
        z = ref.densify(v, i, F)
        loss = (z * G.to(dtype)).sum() + ((pre * Gp.to(dtype)).sum() if use_pre else 0)
        loss.backward()
        return (z.detach(), pre.detach(), WW.grad, bb.grad, (xx.grad if x_grad else None),
                (bdd.grad if with_bdec else None))

    got = run(fast, torch.float32)
    exp = run(spec, torch.float64)
    assert torch.equal(got[0] != 0, exp[0] != 0), "different selection"
    for a, e, what in zip(got, exp, ("codes", "pre", "dW_enc", "db_enc", "dx", "db_dec")):
        if e is None:
            assert a is None
            continue
        assert_scaled_close(a, e, TOL[torch.float32], what)


@isolated
def test_bench_decoder_dry_run_gates_every_provider(capsys):
    """The benchmark's own correctness gate passes for every provider, the Triton ones included
    (so the GPU benchmark path is exercised in CI without a GPU)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_decoder
    assert bench_decoder.dry_run(torch.device(DEVICE)) == 0
    line = capsys.readouterr().out
    assert "fused_triton" in line and "linear_triton" in line


# ------------------------------------------------------------------------------------------------
# Compiled mode without a GPU: every kernel lowers to an sm_90 cubin
# ------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from polysae.kernels import poly_chain as pc, sparse_gather as sg

def ptr(dt, *names):
    return {n: "*" + dt for n in names}

def build(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": sg.NUM_WARPS})
    assert len(k.asm["cubin"]) > 0

B = dict(BLOCK_N=sg.BLOCK_N, BLOCK_C=128)
for dt in ("fp32", "bf16"):
    g = {**ptr(dt, "val_ptr", "w1_ptr", "w2_ptr", "w3_ptr", "bias_ptr", "lam2_ptr", "lam3_ptr",
               "h_ptr", "a2_ptr", "a3_ptr"), "idx_ptr": "*i64"}
    for order, shared, bias in ((3, True, False), (3, False, False), (1, True, True)):
        build(sg._gather_fwd_kernel, g, dict(ORDER=order, SHARED=shared, HAS_BIAS=bias, **B))
    build(sg._gather_dot_kernel, {**ptr("fp32", "g_ptr", "out_ptr"), **ptr(dt, "w_ptr"),
                                  "idx_ptr": "*i64"}, dict(ACCUMULATE=True, **B))
    build(sg._segment_reduce_kernel, {**ptr("fp32", "g_ptr"), **ptr(dt, "vals_ptr", "out_ptr"),
                                      "rows_ptr": "*i64", "offs_ptr": "*i64"},
          dict(BLOCK_P=sg.BLOCK_P, BLOCK_C=128))
    for shared in (True, False):
        build(pc._poly_chain_bwd_kernel,
              {**ptr(dt, "dh_ptr", "h_ptr", "a2_ptr", "a3_ptr", "lam2_ptr", "lam3_ptr"),
               **ptr("fp32", "da1_ptr", "da2_ptr", "da3_ptr", "dl_ptr")},
              dict(ORDER=3, SHARED=shared, **B))
build(sg._scatter_atomic_kernel, {**ptr("fp32", "g_ptr", "val_ptr", "out_ptr"), "idx_ptr": "*i64"},
      B)
print("compiled")
'''


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never lowers the kernels, so type errors of compiled mode (loop-bound types,
    constexpr branches, casts on store) would only surface on a GPU. Lower every kernel variant
    (fp32 and bf16, shared/separate U, each order family) to an sm_90 cubin with the ptxas bundled
    in the triton wheel, in a subprocess without TRITON_INTERPRET."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
