"""Plain-torch TopK / BatchTopK encoders whose backward touches only the selected latents.

Same forward and maths as ``reference.topk_encode_ref`` / ``batchtopk_encode_ref`` (the dense
encoder GEMM, then the selection). The reference's backward scatters the value gradient into a
dense [N, F] matrix and runs two dense GEMMs (``x^T dpre``, ``dpre W_enc^T``), each as costly as the
forward GEMM. Here, from the P = N*K selected (row n, latent f, gradient g) pairs:

- dW_enc [D, F]: the pairs sorted by latent (one stable sort), then ONE ``embedding_bag`` over the
  rows of x with a bag per latent: dW_enc^T[f] = sum over f's pairs of g * x[n], i.e. P*D
  multiply-adds, written as [F, D] and handed back transposed (a view when W_enc is stored
  latent-major, else one transposing copy into W_enc's layout);
- db_enc [F]: the same bags over the pair gradients (a per-latent segment sum);
- db_dec [D] when ``b_dec`` is passed (pre = (x - b_dec) W_enc + b_enc): -W_enc db_enc, one GEMV,
  so no [N, D] input gradient is formed for it;
- dx [N, D] (only when x requires grad): an ``embedding_bag`` over the rows of W_enc^T.

Compared with eai-sparsify's ``FusedEncoder`` (``index_add_`` of a materialised [N*K, D] tensor of
per-pair contributions into a zeroed [F, D] gradient): the same P*D work without the [N*K, D]
intermediate (200 MB at N 1024, K 64, D 768), deterministic on every device (no atomics), and the
encoder bias b_dec folded in.

When ``pre`` itself receives a gradient (AuxK reconstructs from dead latents' raw pre-activations),
that gradient arrives dense. If at most 1/16 of it is nonzero (AuxK's top-k_aux per row) its
nonzeros join the pairs and the backward stays sparse; a denser gradient uses the dense formulas.
Reduced-precision parameters accumulate in fp32 and are cast back at the end.

Imports nothing but torch: the dispatch in ``polysae.kernels`` uses these ops whenever the Triton
path does not serve a call, and the Triton encoder reuses the selections (``select``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE_PRE_GRAD_FRACTION = 1 / 16
"""A gradient of ``pre`` with more than this fraction of nonzeros uses the dense formulas."""


# -- selections: pre [N, F] -> (values, indices) [N, K], padding values 0 --------------------------
def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of each row, ReLU on them (as ``reference.topk_encode_ref``)."""
    v, idx = pre.topk(k, dim=-1, sorted=False)
    return F.relu(v), idx


def select_batchtopk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k*N largest ReLU activations of the batch, packed per row in latent order; Kmax = the
    most kept positives in one row (at least 1), zero-valued padding (index 0) after them.
    Equals ``reference.batchtopk_encode_ref``'s codes (the slot order within a row differs)."""
    N, Fl = pre.shape
    flat = pre.detach().flatten()
    n_keep = min(flat.numel(), k * N)
    top_v, top_i = F.relu(flat).topk(n_keep, sorted=False)
    top_i = top_i[top_v > 0].sort().values  # row-major: rows ascending, latents ascending
    rows = torch.div(top_i, Fl, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=N)
    kmax = max(1, int(counts.max())) if counts.numel() else 1
    starts = counts.cumsum(0) - counts
    pos = torch.arange(top_i.numel(), device=pre.device) - starts[rows]
    values = pre.new_zeros(N, kmax)
    indices = torch.zeros(N, kmax, dtype=torch.long, device=pre.device)
    values[rows, pos] = pre.flatten()[top_i]  # positive, so relu(pre) = pre
    indices[rows, pos] = top_i - rows * Fl
    return values, indices


SELECT = {"topk": select_topk, "batchtopk": select_batchtopk}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (same shape as ``like``) in ``like``'s dtype and memory layout (a gradient that obeys
    the parameter's layout is taken by autograd without another copy)."""
    if t.dtype == like.dtype and t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _segments(keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Stable order grouping ``keys`` (in [0, n)) and each group's start offset [n]."""
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=n)
    return order, counts.cumsum(0) - counts


def sparse_encoder_grads(x_in: Tensor, W: Tensor, rows: Tensor, lat: Tensor, g: Tensor,
                         need_x: bool, need_w: bool, need_b: bool, need_bdec: bool):
    """Gradients of pre = x_in W + b from the pairs (rows, lat, g) [P] of d pre:
    (dx_in [N, D] or None, dW in W's layout or None, db [F] (acc dtype) or None, db_dec or None)."""
    N, Fl = x_in.shape[0], W.shape[1]
    acc = _acc(W.dtype)
    g = g.to(acc)
    dx = dW = db = d_bdec = None
    if need_w or need_b or need_bdec:
        order, offs = _segments(lat, Fl)
        g_sorted = g[order]
        if need_w:
            dWt = F.embedding_bag(rows[order], x_in.to(acc), offs, per_sample_weights=g_sorted,
                                  mode="sum")  # [F, D]
            dW = _in_layout(dWt.t(), W)
        if need_b or need_bdec:
            ones = torch.ones(g.numel(), 1, dtype=acc, device=g.device)
            db = F.embedding_bag(torch.arange(g.numel(), device=g.device), ones, offs,
                                 per_sample_weights=g_sorted, mode="sum").reshape(Fl)
            if need_bdec:
                d_bdec = -(W.to(acc) @ db)
    if need_x:
        order, offs = _segments(rows, N)
        Wt = W.t().to(acc).contiguous()
        dx = F.embedding_bag(lat[order], Wt, offs, per_sample_weights=g[order], mode="sum")
    return dx, dW, db, d_bdec


class SparseEncodeFn(torch.autograd.Function):
    """pre = (x - b_dec) W_enc + b_enc, a selection (``SELECT[mode]``), and the sparse backward of
    the module docstring. Returns (values [N, K], indices [N, K], pre [N, F])."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, mode):
        x_in = x if b_dec is None else x - b_dec
        pre = torch.addmm(b_enc, x_in, W_enc)
        values, idx = SELECT[mode](pre, k)
        ctx.save_for_backward(x_in, W_enc, idx, values > 0)
        ctx.has_bdec = b_dec is not None
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        return values, idx, pre

    @staticmethod
    def backward(ctx, d_values, _d_idx, d_pre):
        x_in, W, idx, active = ctx.saved_tensors
        need_x, need_w, need_b, need_bdec = ctx.needs_input_grad[:4]
        N, K = idx.shape
        acc = _acc(W.dtype)
        if d_values is None and d_pre is None:
            return None, None, None, None, None, None
        rows = lat = g = None
        if d_values is not None:
            g = (d_values * active).to(acc).flatten()
            rows = torch.arange(N, device=idx.device).repeat_interleave(K)
            lat = idx.flatten()
        if d_pre is not None:
            nnz = int(d_pre.count_nonzero())
            if nnz > DENSE_PRE_GRAD_FRACTION * d_pre.numel():
                return _dense_backward(ctx, x_in, W, idx, d_values, active, d_pre)
            nz = d_pre.nonzero()
            r2, l2, g2 = nz[:, 0], nz[:, 1], d_pre[nz[:, 0], nz[:, 1]].to(acc)
            if g is None:
                rows, lat, g = r2, l2, g2
            else:
                rows, lat, g = torch.cat([rows, r2]), torch.cat([lat, l2]), torch.cat([g, g2])
        dx, dW, db, d_bdec = sparse_encoder_grads(x_in, W, rows, lat, g, need_x, need_w,
                                                  need_b, need_bdec)
        return _cast_out(ctx, dx, dW, db, d_bdec)


def _dense_backward(ctx, x_in, W, idx, d_values, active, d_pre):
    """The reference's dense formulas (a dense gradient of pre was given)."""
    need_x, need_w, need_b, need_bdec = ctx.needs_input_grad[:4]
    acc = _acc(W.dtype)
    gd = d_pre.to(acc).clone()
    if d_values is not None:
        gd.scatter_add_(1, idx, (d_values * active).to(acc))
    Wa = W.to(acc)
    dx = gd.mm(Wa.t()) if need_x else None
    dW = _in_layout(x_in.to(acc).t().mm(gd), W) if need_w else None
    db = gd.sum(0) if (need_b or need_bdec) else None
    d_bdec = -(Wa @ db) if need_bdec else None
    return _cast_out(ctx, dx, dW, db, d_bdec)


def _cast_out(ctx, dx, dW, db, d_bdec):
    need_x, _, need_b, need_bdec = ctx.needs_input_grad[:4]
    x_in, W = ctx.saved_tensors[:2]
    return (dx.to(x_in.dtype) if need_x and dx is not None else None, dW,
            db.to(W.dtype) if need_b else None,
            d_bdec.to(W.dtype) if need_bdec and ctx.has_bdec else None, None, None)


def check_encode(what: str, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                 b_dec: Tensor | None, mode: str) -> None:
    """Shape errors before any work (shared with the Triton encoder)."""
    D = W_enc.shape[0] if W_enc.ndim == 2 else -1
    if (x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != D or b_enc.shape != (W_enc.shape[1],)
            or (b_dec is not None and b_dec.shape != (D,))):
        raise ValueError(f"{what}: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc "
                         f"{tuple(b_enc.shape)}, b_dec "
                         f"{None if b_dec is None else tuple(b_dec.shape)} must be [N, D], [D, F], "
                         "[F], [D] or None")
    hi = W_enc.shape[1] if mode == "topk" else None
    if k < 1 or (hi is not None and k > hi):
        raise ValueError(f"{what}: k={k} must lie in [1, d_sae={W_enc.shape[1]}]")


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, b_dec: Tensor | None = None):
    """TopK encoder with a sparse backward; equivalent to ``reference.topk_encode_ref``."""
    check_encode("topk_encode", x, W_enc, b_enc, k, b_dec, "topk")
    return SparseEncodeFn.apply(x, W_enc, b_enc, b_dec, int(k), "topk")


def batchtopk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                     b_dec: Tensor | None = None):
    """BatchTopK encoder with a sparse backward; equivalent to ``reference.batchtopk_encode_ref``
    (same codes; slots within a row in latent order)."""
    check_encode("batchtopk_encode", x, W_enc, b_enc, k, b_dec, "batchtopk")
    return SparseEncodeFn.apply(x, W_enc, b_enc, b_dec, int(k), "batchtopk")
