"""TopK / BatchTopK encoder whose backward touches only the selected latents (Triton path).

Equivalent to ``reference.topk_encode_ref`` / ``batchtopk_encode_ref`` (same forward: the dense
encoder GEMM and the selection of ``torch_ops.SELECT``; that GEMM is the one dense matmul a sparse
SAE step keeps). Its backward differs in cost: the reference scatters dvalues into a dense [N, F]
gradient and runs two dense GEMMs (x^T dpre and dpre W_enc^T); here

- dW_enc [D, F]: the feature-major ``_segment_reduce_kernel`` over x's rows, driven by the sorted
  reverse index of the active (row, latent) pairs, written straight into W_enc's layout by strides
  (deterministic, no atomics);
- db_enc [F]: the same reduction of a column of ones (a per-latent segment sum, deterministic);
- db_dec [D] when ``b_dec`` is passed (pre = (x - b_dec) W_enc + b_enc): -W_enc db_enc (one GEMV);
- dx [N, D] (only when x requires grad): the gather kernel over the rows of W_enc^T.

Zero-valued slots (BatchTopK's padding, ReLU'd top-k values) are skipped by the kernels. When the
caller also uses ``pre`` (AuxK reads raw pre-activations of dead latents), its gradient is dense
anyway, so the backward falls back to the dense formulas for that call.
"""

from __future__ import annotations

import torch

from . import sparse_gather as sg
from .torch_ops import SparseEncodeFn


class TopKEncodeFn(SparseEncodeFn):
    """The plain-torch op's forward (same saved tensors); the backward runs the Triton kernels."""

    @staticmethod
    def backward(ctx, d_values, _d_idx, d_pre):
        x, W, idx, active = ctx.saved_tensors
        need_x, need_w, need_b, need_bdec = ctx.needs_input_grad[:4]
        need_bdec = need_bdec and ctx.has_bdec
        N, D = x.shape
        Fl = W.shape[1]
        dv = (d_values * active) if d_values is not None else None
        if d_pre is not None or dv is None:  # dense gradient in play (AuxK) or none at all
            g = torch.zeros(N, Fl, device=x.device, dtype=W.dtype) if d_pre is None else \
                d_pre.to(W.dtype).clone()
            if dv is not None:
                g.scatter_add_(1, idx, dv.to(g.dtype))
            gsum = g.sum(0) if (need_b or need_bdec) else None
            return (g.mm(W.t()) if need_x else None, x.t().mm(g) if need_w else None,
                    gsum if need_b else None, -(W @ gsum) if need_bdec else None, None, None)
        dv = dv.contiguous()
        rev = sg.ReverseIndex(dv, idx, Fl)
        dW = db = dx = None
        if need_w:
            dW = torch.empty_like(W)
            sg.scatter_weight_grad(x.to(W.dtype), rev, None, None, Fl, W.dtype, out=dW.t())
        if need_b or need_bdec:
            ones = torch.ones(N, 1, device=x.device, dtype=torch.float32)
            db = sg.scatter_weight_grad(ones, rev, None, None, Fl, W.dtype).reshape(Fl)
        if need_x:
            # TODO(gpu): gather W_enc columns by stride instead of materialising W_enc^T (F*D copy).
            zero = torch.zeros(D, device=x.device, dtype=W.dtype)
            dx = sg.gather_linear(dv, idx, W.t().contiguous(), zero).to(x.dtype)
        d_bdec = -(W @ db.to(W.dtype)) if need_bdec else None
        return dx, dW, db if need_b else None, d_bdec, None, None
