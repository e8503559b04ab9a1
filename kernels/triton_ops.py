"""Triton implementations of the public ops: ``poly_decode``, ``linear_decode``, ``topk_encode``,
``batchtopk_encode``.

Same signatures and semantics as ``reference.poly_decode_ref`` / ``linear_decode_ref`` /
``topk_encode_ref`` / ``batchtopk_encode_ref`` (the encoders' backward is described in
``encoder.py``; calls the kernels do not serve go to ``torch_ops``);
imported by ``polysae.kernels`` only when Triton is usable (CUDA present or ``TRITON_INTERPRET=1``).

Poly forward (one kernel + one GEMM):
  1. ``_gather_fwd_kernel`` gathers each row's K rows of U (and U2, U3 in separate mode), forms
     h2/h3 in registers and writes H = [a1, l2*h2, l3*h3] (plus A2, A3 in separate mode);
  2. x_hat = bias + H @ [C1 C2 C3]^T as ONE cuBLAS GEMM over the concatenated ranks.
Poly backward:
  1. db = sum of dX; d[C1 C2 C3] = dX^T H; dH = dX [C1 C2 C3] (cuBLAS);
  2. ``_poly_chain_bwd_kernel`` (poly_chain.py): chain rule through the polynomial terms -> fp32
     dA1 (dA2, dA3) and per-program dlambda2/dlambda3 partials, in one elementwise pass;
  3. dvalues: ``_gather_dot_kernel`` (SDDMM against the same gathered rows);
  4. dU (dU2, dU3): one stable sort of the N*K indices (``ReverseIndex``), then the feature-major
     ``_segment_reduce_kernel`` (deterministic, the default) or token-major fp32 atomics.
Linear TopK decode is the same family: the gather kernel with the bias fused in; backward = SDDMM +
the same weight-gradient scatter, so poly and linear are compared like for like.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import sparse_gather as sg
from .encoder import TopKEncodeFn
from . import torch_ops
from .poly_chain import poly_chain_backward
from .reference import linear_decode_ref, poly_decode_ref

DETERMINISTIC = True
"""Weight gradients via the sorted reverse index (bitwise reproducible). ``False`` selects the
token-major atomic scatter (no sort; summation order varies run to run)."""


def _deterministic() -> bool:
    return DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(values: Tensor, weight: Tensor) -> bool:
    """Whether the kernels serve this call: CUDA tensors (any tensor under the interpreter) of a
    dtype they accumulate exactly enough. float64 goes to the torch path: the kernels accumulate
    in fp32, which would silently lose the precision a float64 caller asked for."""
    return ((weight.device.type == "cuda" or sg.INTERPRET) and weight.dtype in _KERNEL_DTYPES
            and values.dtype in _KERNEL_DTYPES)


def _check_poly(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2, U3) -> None:
    """Clear shape errors before any launch (a wrong shape would otherwise read out of bounds)."""
    def bad(msg):
        raise ValueError(f"poly_decode: {msg}")
    if values.ndim != 2 or values.shape != indices.shape:
        bad(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, K]")
    if indices.dtype not in (torch.int64, torch.int32):
        bad(f"indices must be int64 or int32, got {indices.dtype}")
    F, R1 = U.shape
    D = bias.shape[0]
    if C1.shape != (D, R1):
        bad(f"C1 {tuple(C1.shape)} must be [d_in={D}, R1={R1}]")
    for name, C, Ux, lam in (("2", C2, U2, lambda2), ("3", C3, U3, lambda3)):
        if C is None:
            continue
        if C.ndim != 2 or C.shape[0] != D or C.shape[1] > R1:
            bad(f"C{name} {tuple(C.shape)} must be [d_in={D}, R{name} <= R1={R1}]")
        if lam is None or lam.numel() != 1:
            bad(f"lambda{name} must be a one-element tensor when C{name} is given")
        if Ux is not None and Ux.shape != (F, C.shape[1]):
            bad(f"U{name} {tuple(Ux.shape)} must be [d_sae={F}, R{name}={C.shape[1]}]")
    if C2 is None and C3 is not None:
        bad("C3 given without C2 (the order is 1 + (C2 given) + (C3 given))")
    if U2 is None and U3 is not None:
        bad("U3 given without U2 (separate-U mode needs U2 for the quadratic term)")
    if U2 is not None and C2 is None:
        bad("U2 given for an order-1 decoder (no C2)")
    if U2 is not None and C3 is not None and U3 is None:
        bad("separate-U mode with order 3 needs U3")
    if U2 is not None and C3 is not None and C3.shape[1] > C2.shape[1]:
        bad(f"separate-U mode needs R3={C3.shape[1]} <= R2={C2.shape[1]}")


class PolyDecodeFn(torch.autograd.Function):
    """Sparse polynomial decode with Triton gather/scatter; see the module docstring."""

    @staticmethod
    def forward(ctx, values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2, U3):
        order = 1 + (C2 is not None) + (C3 is not None)
        r1 = U.shape[1]
        r2 = C2.shape[1] if C2 is not None else 0
        r3 = C3.shape[1] if C3 is not None else 0
        # The reference gathers in U's dtype (it casts values to it): do the same.
        H, A2, A3 = sg.gather_poly(values, indices, U, U2, U3, r2, r3, order, lambda2, lambda3)
        Cs = [C for C in (C1, C2, C3) if C is not None]
        C = torch.cat(Cs, dim=1) if len(Cs) > 1 else C1
        # The op computes in the parameters' dtype whatever the caller's autocast state: under
        # autocast the GEMM would otherwise return bf16 while the backward's operands stay fp32.
        with torch.autocast(U.device.type, enabled=False):
            out = torch.addmm(bias, H, C.t())
        ctx.save_for_backward(values, indices, U, U2, U3, C, H, A2, A3, lambda2, lambda3)
        ctx.dims = (order, r1, r2, r3)
        return out

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, gx):
        values, indices, U, U2, U3, C, H, A2, A3, lambda2, lambda3 = ctx.saved_tensors
        order, r1, r2, r3 = ctx.dims
        need = ctx.needs_input_grad
        gx = gx.contiguous().to(C.dtype)
        d_bias = gx.sum(0) if need[8] else None
        dC1 = dC2 = dC3 = None
        if need[3] or need[4] or need[5]:
            dC = gx.t().mm(H)  # [D, R1+R2+R3] = dX^T [a1, l2 h2, l3 h3]
            dC1, dC2, dC3 = (list(torch.split(dC, [r1, r2, r3][:order], dim=1)) + [None, None])[:3]
        need_a = need[0] or need[2] or need[9] or need[10] or need[6] or need[7]
        if not need_a:
            return (None, None, None, dC1, dC2, dC3, None, None, d_bias, None, None)
        # Chain rule through the polynomial terms (docs/method.md), fused in one Triton pass that
        # reads dH and the saved projections (h2, h3 are recomputed from A: H holds them already
        # multiplied by lambda) and writes fp32 dA plus deterministic dlambda partials.
        dH = gx.mm(C)
        dA1, dA2, dA3, dl2, dl3 = poly_chain_backward(dH, H, A2, A3, lambda2, lambda3, r1, r2,
                                                      r3, order)
        grads_a = [g for g in (dA1, dA2, dA3) if g is not None]
        mats = [m for m in (U, U2, U3) if m is not None][:len(grads_a)]
        d_values = sg.gather_dot(grads_a, mats, indices).to(values.dtype) if need[0] else None
        dUs = [None, None, None]
        if need[2] or need[9] or need[10]:
            det = _deterministic()
            rev = sg.ReverseIndex(values, indices, U.shape[0]) if det else None
            for i, (g, m) in enumerate(zip(grads_a, mats)):
                if need[(2, 9, 10)[i]]:
                    dUs[i] = sg.scatter_weight_grad(g, rev, values, indices, m.shape[0], m.dtype,
                                                    deterministic=det)
        dl2 = dl2.to(lambda2.dtype).reshape(lambda2.shape) if dl2 is not None and need[6] else None
        dl3 = dl3.to(lambda3.dtype).reshape(lambda3.shape) if dl3 is not None and need[7] else None
        return (d_values, None, dUs[0], dC1, dC2, dC3, dl2, dl3, d_bias, dUs[1], dUs[2])


class LinearDecodeFn(torch.autograd.Function):
    """Sparse linear TopK decode: gather of W_dec rows with the bias fused; same backward family."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, bias):
        out = sg.gather_linear(values, indices, W_dec, bias)
        ctx.save_for_backward(values, indices, W_dec)
        return out

    @staticmethod
    def backward(ctx, gx):
        values, indices, W = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = gx.contiguous().to(W.dtype)
        d_values = sg.gather_dot([gx], [W], indices).to(values.dtype) if need[0] else None
        dW = None
        if need[2]:
            det = _deterministic()
            rev = sg.ReverseIndex(values, indices, W.shape[0]) if det else None
            dW = sg.scatter_weight_grad(gx, rev, values, indices, W.shape[0], W.dtype,
                                        deterministic=det)
        d_bias = gx.sum(0) if need[3] else None
        return d_values, None, dW, d_bias


def poly_decode(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2=None, U3=None):
    """Triton sparse polynomial decode; equivalent to ``reference.poly_decode_ref``."""
    if not supports(values, U):  # e.g. a CPU or float64 SAE on a CUDA machine
        return poly_decode_ref(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2, U3)
    _check_poly(values, indices, U, C1, C2, C3, lambda2, lambda3, bias, U2, U3)
    return PolyDecodeFn.apply(values, indices.long(), U, C1, C2, C3, lambda2, lambda3, bias, U2, U3)


def linear_decode(values, indices, W_dec, bias):
    """Triton sparse linear decode; equivalent to ``reference.linear_decode_ref``."""
    if not supports(values, W_dec):
        return linear_decode_ref(values, indices, W_dec, bias)
    if values.ndim != 2 or values.shape != indices.shape:
        raise ValueError(f"linear_decode: values {tuple(values.shape)} and indices "
                         f"{tuple(indices.shape)} must both be [N, K]")
    if bias.shape != (W_dec.shape[1],):
        raise ValueError(f"linear_decode: bias {tuple(bias.shape)} must be [d_in={W_dec.shape[1]}]")
    return LinearDecodeFn.apply(values, indices.long(), W_dec, bias)


def topk_encode(x, W_enc, b_enc, k: int, b_dec=None):
    """TopK encoder with a k-sparse backward; equivalent to ``reference.topk_encode_ref``."""
    if not supports(x, W_enc):
        return torch_ops.topk_encode(x, W_enc, b_enc, k, b_dec)
    torch_ops.check_encode("topk_encode", x, W_enc, b_enc, k, b_dec, "topk")
    return TopKEncodeFn.apply(x, W_enc, b_enc, b_dec, int(k), "topk")


def batchtopk_encode(x, W_enc, b_enc, k: int, b_dec=None):
    """BatchTopK encoder with a sparse backward; equivalent to ``reference.batchtopk_encode_ref``
    (same codes; slots within a row in latent order)."""
    if not supports(x, W_enc):
        return torch_ops.batchtopk_encode(x, W_enc, b_enc, k, b_dec)
    torch_ops.check_encode("batchtopk_encode", x, W_enc, b_enc, k, b_dec, "batchtopk")
    return TopKEncodeFn.apply(x, W_enc, b_enc, b_dec, int(k), "batchtopk")
