"""TopK encoder whose backward touches only the k selected latents per row.

Equivalent to ``reference.topk_encode_ref`` (same forward: the dense encoder GEMM and
``torch.topk``; that GEMM is the one dense matmul a sparse SAE step keeps). Its backward differs in
cost: the reference scatters dvalues into a dense [N, F] gradient and runs two dense GEMMs
(x^T dpre and dpre W_enc^T); here

- dW_enc [D, F]: the feature-major ``_segment_reduce_kernel`` over x's rows, driven by the sorted
  reverse index of the active (row, latent) pairs, written straight into the [D, F] layout by
  strides (deterministic, no atomics);
- db_enc [F]: the same reduction of a column of ones (a per-latent segment sum, deterministic);
- dx [N, D] (only when x requires grad): the gather kernel over the rows of W_enc^T.

When the caller also uses ``pre`` (AuxK reads raw pre-activations of dead latents), its gradient is
dense anyway, so the backward falls back to the dense formulas for that call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sparse_gather as sg


class TopKEncodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k):
        pre = torch.addmm(b_enc, x, W_enc)
        v, idx = pre.topk(k, dim=-1, sorted=False)
        values = F.relu(v)
        ctx.save_for_backward(x, W_enc, idx, v > 0)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        return values, idx, pre

    @staticmethod
    def backward(ctx, d_values, _d_idx, d_pre):
        x, W, idx, active = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        N, D = x.shape
        Fl = W.shape[1]
        dv = (d_values * active) if d_values is not None else None
        if d_pre is not None or dv is None:  # dense gradient in play (AuxK) or none at all
            g = torch.zeros(N, Fl, device=x.device, dtype=W.dtype) if d_pre is None else \
                d_pre.to(W.dtype).clone()
            if dv is not None:
                g.scatter_add_(1, idx, dv.to(g.dtype))
            return (g.mm(W.t()) if need_x else None, x.t().mm(g) if need_w else None,
                    g.sum(0) if need_b else None, None)
        dv = dv.contiguous()
        rev = sg.ReverseIndex(dv, idx, Fl)
        dW = db = dx = None
        if need_w:
            dW = torch.empty(D, Fl, device=W.device, dtype=W.dtype)
            sg.scatter_weight_grad(x.to(W.dtype), rev, None, None, Fl, W.dtype, out=dW.t())
        if need_b:
            ones = torch.ones(N, 1, device=x.device, dtype=torch.float32)
            db = sg.scatter_weight_grad(ones, rev, None, None, Fl, W.dtype).reshape(Fl)
        if need_x:
            # TODO(gpu): gather W_enc columns by stride instead of materialising W_enc^T (F*D copy).
            zero = torch.zeros(D, device=x.device, dtype=W.dtype)
            dx = sg.gather_linear(dv, idx, W.t().contiguous(), zero).to(x.dtype)
        return dx, dW, db, None
