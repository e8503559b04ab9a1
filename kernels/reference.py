"""Plain-torch references for every decode op: the specification the Triton kernels must match.

Shape letters: N rows (tokens), K active latents per row, F latents (d_sae), D = d_in,
R1, R2, R3 the polynomial ranks.

Sparse ops take each row's K (value, index) pairs. A row may carry padding entries whose value is 0
(any index): they contribute nothing to the output nor to the gradient of the gathered matrix.

- ``sparse_project_ref(values, indices, W)`` = ``densify(values, indices) @ W`` computed as an
  embedding bag (gather K rows of W, weighted sum): reads N*K*R elements instead of N*F*R.
- ``poly_combine_ref`` forms the polynomial terms from projections and applies ONE GEMM on the
  concatenation [h1, l2*h2, l3*h3] @ [C1 C2 C3]^T, plus the bias.
- ``poly_decode_ref`` (sparse) and ``poly_decode_dense_ref`` (codes @ U, as the paper's code) give the
  same x_hat up to float reassociation; likewise ``linear_decode_ref`` / ``linear_decode_dense_ref``.
- ``topk_encode_ref`` / ``batchtopk_encode_ref``: the encoders by plain autograd (dense backward);
  ``torch_ops`` and ``triton_ops`` implement the same maths with a backward that touches only the
  selected latents.

Shared-U mode (the paper's): a = z U; h1 = a, h2 = a[:, :R2]^2, h3 = a[:, :R3]^3.
Separate-U mode: a1 = z U, a2 = z U2, a3 = z U3; h1 = a1, h2 = a1[:, :R2] * a2,
h3 = a1[:, :R3] * a2[:, :R3] * a3 (docs/method.md#the-polynomial-decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def densify(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """[N, K] values at [N, K] indices -> dense [N, F] codes (duplicate indices are summed)."""
    out = values.new_zeros(values.shape[0], n_latents)
    return out.scatter_add(1, indices.long(), values)


def sparse_project_ref(values: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """[N, K], [N, K], W [F, R] -> [N, R] = densify(values, indices) @ W, as a weighted gather."""
    return F.embedding_bag(indices.long(), W, per_sample_weights=values.to(W.dtype), mode="sum")


def poly_terms_ref(a1: Tensor, a2: Tensor | None, a3: Tensor | None, r2: int, r3: int,
                   order: int) -> list[Tensor]:
    """Projections -> [h1, h2, h3][:order]. a2/a3 are None in shared-U mode."""
    hs = [a1]
    if order >= 2:
        hs.append(a1[:, :r2] * (a1[:, :r2] if a2 is None else a2))
    if order >= 3:
        b = a1[:, :r3]
        hs.append(b * b * b if a2 is None else b * a2[:, :r3] * a3)
    return hs


def poly_combine_ref(hs: list[Tensor], C1: Tensor, C2: Tensor | None, C3: Tensor | None,
                     lambda2: Tensor | None, lambda3: Tensor | None, bias: Tensor) -> Tensor:
    """bias + h1 C1^T + l2 h2 C2^T + l3 h3 C3^T as one GEMM over the concatenated ranks."""
    scaled = [hs[0]]
    mats = [C1]
    if len(hs) >= 2:
        scaled.append(hs[1] * lambda2)
        mats.append(C2)
    if len(hs) >= 3:
        scaled.append(hs[2] * lambda3)
        mats.append(C3)
    h = torch.cat(scaled, dim=1) if len(scaled) > 1 else scaled[0]
    C = torch.cat(mats, dim=1) if len(mats) > 1 else mats[0]
    return torch.addmm(bias, h, C.t())


def _order(C2: Tensor | None, C3: Tensor | None) -> int:
    return 1 if C2 is None else (2 if C3 is None else 3)


def _project_all(project, U: Tensor, U2: Tensor | None, U3: Tensor | None):
    """Apply one projection to U (and U2, U3 in separate mode) with a single gather/GEMM."""
    if U2 is None:
        return project(U), None, None
    Ws = [U, U2] + ([U3] if U3 is not None else [])
    a = project(torch.cat(Ws, dim=1))
    parts = torch.split(a, [w.shape[1] for w in Ws], dim=1)
    return parts[0], parts[1], (parts[2] if len(parts) > 2 else None)


def poly_decode_ref(values: Tensor, indices: Tensor, U: Tensor, C1: Tensor, C2: Tensor | None,
                    C3: Tensor | None, lambda2: Tensor | None, lambda3: Tensor | None,
                    bias: Tensor, U2: Tensor | None = None, U3: Tensor | None = None) -> Tensor:
    """Sparse polynomial decode. values/indices [N, K]; U [F, R1]; C1 [D, R1]; C2 [D, R2];
    C3 [D, R3]; lambda2/lambda3 0-d; bias [D]; U2 [F, R2], U3 [F, R3] in separate-U mode.
    The order is 1 + (C2 is given) + (C3 is given). Returns x_hat [N, D]."""
    a1, a2, a3 = _project_all(lambda W: sparse_project_ref(values, indices, W), U, U2, U3)
    hs = poly_terms_ref(a1, a2, a3, _rank(C2), _rank(C3), _order(C2, C3))
    return poly_combine_ref(hs, C1, C2, C3, lambda2, lambda3, bias)


def poly_decode_dense_ref(codes: Tensor, U: Tensor, C1: Tensor, C2: Tensor | None,
                          C3: Tensor | None, lambda2: Tensor | None, lambda3: Tensor | None,
                          bias: Tensor, U2: Tensor | None = None,
                          U3: Tensor | None = None) -> Tensor:
    """Dense polynomial decode from codes [N, F] (``codes @ U``, as the paper's reference code)."""
    a1, a2, a3 = _project_all(lambda W: codes.to(W.dtype) @ W, U, U2, U3)
    hs = poly_terms_ref(a1, a2, a3, _rank(C2), _rank(C3), _order(C2, C3))
    return poly_combine_ref(hs, C1, C2, C3, lambda2, lambda3, bias)


def linear_decode_ref(values: Tensor, indices: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
    """Sparse linear (TopK) decode: bias + densify(values, indices) @ W_dec, W_dec [F, D]."""
    return sparse_project_ref(values, indices, W_dec) + bias


def linear_decode_dense_ref(codes: Tensor, W_dec: Tensor, bias: Tensor) -> Tensor:
    """Dense linear decode: bias + codes @ W_dec."""
    return torch.addmm(bias, codes.to(W_dec.dtype), W_dec)


def _rank(C: Tensor | None) -> int:
    return 0 if C is None else C.shape[1]


def topk_encode_ref(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, b_dec: Tensor | None = None):
    """TopK encoder: pre = (x - b_dec) W_enc + b_enc [N, F] (``x W_enc + b_enc`` when b_dec is
    None); returns (relu(top-k values) [N, K], indices [N, K], pre). Plain autograd: the backward
    scatters into a dense [N, F] gradient and runs two dense GEMMs (the reference's cost)."""
    x_in = x if b_dec is None else x - b_dec
    pre = torch.addmm(b_enc, x_in, W_enc)
    v, i = pre.topk(k, dim=-1, sorted=False)
    return F.relu(v), i, pre


def pack_nonzero_ref(z: Tensor) -> tuple[Tensor, Tensor]:
    """Dense non-negative codes [N, F] -> (values, indices) [N, Kmax], Kmax = max nonzeros per row
    (at least 1); rows with fewer nonzeros are padded with zero values."""
    kmax = max(1, int((z != 0).sum(-1).max())) if z.numel() else 1
    return z.topk(kmax, dim=-1, sorted=False)


def batchtopk_encode_ref(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                         b_dec: Tensor | None = None):
    """BatchTopK encoder: the same ``pre``; ReLU, then the k*N largest activations of the whole
    batch (N rows) are kept; returns (values [N, Kmax], indices [N, Kmax], pre) with Kmax the
    largest number of kept positive activations in one row and zero-valued padding. Plain autograd
    through a dense [N, F] code matrix (the reference's cost)."""
    x_in = x if b_dec is None else x - b_dec
    pre = torch.addmm(b_enc, x_in, W_enc)
    acts = F.relu(pre)
    n_keep = min(acts.numel(), k * acts.shape[0])
    flat_v, flat_i = acts.flatten().topk(n_keep, sorted=False)
    z = torch.zeros_like(acts).flatten().scatter(0, flat_i, flat_v).view_as(acts)
    values, indices = pack_nonzero_ref(z)
    return values, indices, pre
