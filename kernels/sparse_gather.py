"""Triton kernels for k-sparse decoding: gather forward, SDDMM value gradient, weight scatter.

Equivalent to ``reference.sparse_project_ref`` (and, with the fused polynomial epilogue, to the
projection + ``poly_terms_ref`` half of ``reference.poly_decode_ref``). Anatomy (docs/kernels.md):
private ``_*_kernel`` → launcher (shape/index checks, block sizes, grid) → the
``autograd.Function`` in ``triton_ops.py`` → public op.

Shape letters: N rows, K slots per row (value, index), F latents, R width of a gathered matrix
(R1/R2/R3 for U/U2/U3, D for W_dec).

Conventions shared by every kernel:
- Indices are cast to int64 *before* multiplying by a row stride (F*R reaches 4.5e8 for the three-U
  Gemma configs, close to the int32 limit once two strides combine).
- Every load is masked: the interpreter segfaults on an out-of-bounds load and a GPU faults. Index
  ranges are validated by the launchers (``check_indices``) before any launch for the same reason.
- Slots whose value is exactly 0 (padding, rows with no active latent) are masked out of the loads:
  they cost no bandwidth and contribute nothing, as the reference's spec says.
- Accumulation is always fp32, whatever the storage dtype; results are cast on store.
- No ``tl.dot`` anywhere: the inner products here are rank-1 updates or row dots, which the
  interpreter computes exactly in fp16 and fp32 (bf16 ``tl.dot`` is wrong there,
  docs/kernels.md#testing-without-a-gpu).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

# Block sizes. 16 rows x 128 columns per program with 8 warps: ptxas (sm_90, triton 3.7.1) reports
# 64-154 registers and no spills for every kernel here, three-U included; 32 rows x 4 warps used
# 255 registers and spilled in the three-U gather, the SDDMM and the chain kernel. (Within the
# ranges other sparse-SAE toolkits use: docs/kernels.md#block-sizes.) Not autotuned: multi-config
# autotune needs a GPU benchmarker, and the grid is set by N and R anyway.
# TODO(gpu): sweep BLOCK_N in {16, 32, 64} x BLOCK_R in {64, 128, 256} on an H100 and pin the best.
BLOCK_N = 16
NUM_WARPS = 8
BLOCK_R = 128
BLOCK_P = 32  # sorted (row, value) pairs reduced per iteration in the feature-major scatter


def block_cols(width: int) -> int:
    """Column block: a power of two (tl.arange needs one), at most BLOCK_R, at least 16."""
    return max(16, min(BLOCK_R, triton.next_power_of_2(max(width, 1))))


def check_indices(indices: torch.Tensor, n_latents: int, what: str = "indices") -> None:
    """Refuse indices outside [0, F) before any kernel reads through them.

    On CPU (the interpreter) this is an exact check raising ValueError. On CUDA a host check would
    force a sync every step, so a device-side assert is queued instead (it fails the next sync
    with a clear message rather than reading arbitrary memory)."""
    if indices.numel() == 0:
        return
    if indices.device.type == "cuda":
        torch._assert_async(((indices >= 0) & (indices < n_latents)).all(),
                            f"polysae.kernels: {what} out of range [0, {n_latents})")
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_latents:
        raise ValueError(f"polysae.kernels: {what} must lie in [0, {n_latents}); got min {lo}, "
                         f"max {hi}")


@triton.jit
def row_col_tile(N, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile on a (row block, column block) grid: int64 row ids (so that row * stride
    cannot overflow int32), column ids, and the row mask."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows.to(tl.int64), cols, rows < N


# ------------------------------------------------------------------------------------------------
# Forward: gather k rows per token, weighted sum, optional fused polynomial epilogue
# ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_fwd_kernel(
    val_ptr, idx_ptr,                 # [N, K] contiguous
    w1_ptr, w2_ptr, w3_ptr,           # [F, R1] (U or W_dec), [F, R2] U2, [F, R3] U3 (separate mode)
    bias_ptr,                         # [R1] (linear decode only)
    lam2_ptr, lam3_ptr,               # 0-d lambda2 / lambda3 (read on device: no host sync)
    h_ptr,                            # [N, HW] out: [a1 | l2*h2 | l3*h3], HW = R1 (+R2) (+R3)
    a2_ptr, a3_ptr,                   # [N, R2], [N, R3] out (separate mode; needed by backward)
    N, K, R1, R2, R3, HW,
    ORDER: tl.constexpr, SHARED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program mapping: one program per (block of BLOCK_N rows, block of BLOCK_C columns of U).
    # The column block is the same for U, U2 and U3, so in separate mode one program owns matching
    # columns of a1, a2, a3 and can form h2 = a1*a2 and h3 = a1*a2*a3 in registers. Columns past R2
    # (R3) have no quadratic (cubic) term: those lanes are masked off.
    # Memory traffic: per row, K index/value pairs plus K gathered row segments of BLOCK_C columns
    # from each U (the dominant N*K*R_U reads, mostly L2 hits for hot latents), then one write of H.
    rows64, cols, rmask = row_col_tile(N, BLOCK_N, BLOCK_C)
    m1 = cols < R1
    m2 = cols < R2
    m3 = cols < R3
    acc1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k in range(0, K):
        v = tl.load(val_ptr + rows64 * K + k, mask=rmask, other=0.0).to(tl.float32)
        f = tl.load(idx_ptr + rows64 * K + k, mask=rmask, other=0).to(tl.int64)
        live = rmask & (v != 0.0)  # padding / zero slots: no load at all
        u = tl.load(w1_ptr + f[:, None] * R1 + cols[None, :], mask=live[:, None] & m1[None, :],
                    other=0.0).to(tl.float32)
        acc1 += v[:, None] * u
        if not SHARED:
            if ORDER >= 2:
                u2 = tl.load(w2_ptr + f[:, None] * R2 + cols[None, :],
                             mask=live[:, None] & m2[None, :], other=0.0).to(tl.float32)
                acc2 += v[:, None] * u2
            if ORDER >= 3:
                u3 = tl.load(w3_ptr + f[:, None] * R3 + cols[None, :],
                             mask=live[:, None] & m3[None, :], other=0.0).to(tl.float32)
                acc3 += v[:, None] * u3
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + cols, mask=m1, other=0.0).to(tl.float32)[None, :]
    out_t = h_ptr.dtype.element_ty
    base = h_ptr + rows64[:, None] * HW + cols[None, :]
    tl.store(base, acc1.to(out_t), mask=rmask[:, None] & m1[None, :])
    # Polynomial epilogue, in fp32 registers: the cheap part of the decoder, fused so that A is
    # never re-read from memory. lambda is folded in here so the combine step is a single GEMM.
    if ORDER >= 2:
        lam2 = tl.load(lam2_ptr).to(tl.float32)
        if SHARED:
            h2 = acc1 * acc1
        else:
            h2 = acc1 * acc2
            tl.store(a2_ptr + rows64[:, None] * R2 + cols[None, :], acc2.to(out_t),
                     mask=rmask[:, None] & m2[None, :])
        tl.store(base + R1, (lam2 * h2).to(out_t), mask=rmask[:, None] & m2[None, :])
    if ORDER >= 3:
        lam3 = tl.load(lam3_ptr).to(tl.float32)
        if SHARED:
            h3 = acc1 * acc1 * acc1
        else:
            h3 = acc1 * acc2 * acc3
            tl.store(a3_ptr + rows64[:, None] * R3 + cols[None, :], acc3.to(out_t),
                     mask=rmask[:, None] & m3[None, :])
        tl.store(base + R1 + R2, (lam3 * h3).to(out_t), mask=rmask[:, None] & m3[None, :])


def gather_poly(values, indices, U, U2, U3, r2: int, r3: int, order: int, lambda2, lambda3):
    """Polynomial gather: H [N, R1 + R2 + R3] (per ``order``) and A2/A3 in separate-U mode."""
    return _launch_gather(values, indices, U, U2, U3, order, None, lambda2, lambda3,
                          r2 if order >= 2 else 0, r3 if order >= 3 else 0)


def gather_linear(values, indices, W, bias):
    """Linear TopK decode x_hat = bias + densify(values, indices) @ W, fused in one kernel."""
    return _launch_gather(values, indices, W, None, None, 1, bias, None, None, 0, 0)[0]


def _launch_gather(values, indices, w1, w2, w3, order, bias, lambda2, lambda3, R2, R3):
    N, K = values.shape
    F, R1 = w1.shape
    check_indices(indices, F)
    shared = w2 is None
    HW = R1 + R2 + R3
    values = values.contiguous()
    indices = indices.contiguous()
    h = torch.empty(N, HW, device=w1.device, dtype=w1.dtype)
    a2 = torch.empty(N, R2, device=w1.device, dtype=w1.dtype) if not shared and order >= 2 else None
    a3 = torch.empty(N, R3, device=w1.device, dtype=w1.dtype) if not shared and order >= 3 else None
    if N == 0:
        return h, a2, a3
    bc = block_cols(R1)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(R1, bc))
    dummy = w1  # never dereferenced: the constexpr flags compile those branches out
    _gather_fwd_kernel[grid](
        values, indices, w1.contiguous(),
        dummy if w2 is None else w2.contiguous(), dummy if w3 is None else w3.contiguous(),
        dummy if bias is None else bias.contiguous(),
        dummy if lambda2 is None else lambda2, dummy if lambda3 is None else lambda3,
        h, dummy if a2 is None else a2, dummy if a3 is None else a3,
        N, K, R1, R2, R3, HW,
        ORDER=order, SHARED=shared, HAS_BIAS=bias is not None,
        BLOCK_N=BLOCK_N, BLOCK_C=bc, num_warps=NUM_WARPS,
    )
    return h, a2, a3


# ------------------------------------------------------------------------------------------------
# Backward, value gradient: dv[n, k] = <dA[n, :], W[idx[n, k], :]>  (an SDDMM)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_dot_kernel(
    g_ptr, g_stride,                  # dA [N, R] (row stride given: may be a column slice)
    w_ptr,                            # [F, R]
    idx_ptr,                          # [N, K]
    out_ptr,                          # [N, K] fp32, accumulated into when ACCUMULATE
    N, K, R,
    ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program mapping: one program per block of BLOCK_N rows; it walks the K slots and, per slot,
    # the R columns in BLOCK_C chunks. Each output element has one owner and a fixed summation
    # order, so the result is deterministic. Traffic: the same N*K*R gathered reads as the forward,
    # plus the dA tile re-read per slot (from L1/L2: it is the program's own BLOCK_N x R slab).
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    for k in range(0, K):
        f = tl.load(idx_ptr + rows64 * K + k, mask=rmask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, R, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (cols < R)[None, :]
            g = tl.load(g_ptr + rows64[:, None] * g_stride + cols[None, :], mask=m,
                        other=0.0).to(tl.float32)
            w = tl.load(w_ptr + f[:, None] * R + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(g * w, axis=1)
        if ACCUMULATE:
            acc += tl.load(out_ptr + rows64 * K + k, mask=rmask, other=0.0)
        tl.store(out_ptr + rows64 * K + k, acc, mask=rmask)


def gather_dot(grads, weights, indices):
    """dv [N, K] fp32 = sum over (dA, W) pairs of <dA[n], W[idx[n, k]]>, one kernel per pair."""
    N, K = indices.shape
    out = torch.empty(N, K, device=indices.device, dtype=torch.float32)
    if N == 0 or K == 0:
        return out.zero_()
    indices = indices.contiguous()
    for i, (g, w) in enumerate(zip(grads, weights)):
        R = w.shape[1]
        if g.stride(1) != 1:
            g = g.contiguous()
        _gather_dot_kernel[(triton.cdiv(N, BLOCK_N),)](
            g, g.stride(0), w.contiguous(), indices, out, N, K, R,
            ACCUMULATE=i > 0, BLOCK_N=BLOCK_N, BLOCK_C=block_cols(R), num_warps=NUM_WARPS)
    return out


# ------------------------------------------------------------------------------------------------
# Backward, weight gradient: dW[f, :] = sum over (n, k) with idx[n, k] = f of v[n, k] * dA[n, :]
# ------------------------------------------------------------------------------------------------
class ReverseIndex:
    """CSC view of the (row, slot) pairs grouped by latent, built once per backward and shared by
    every matrix (U, U2, U3) that the same indices gathered from.

    ``rows[p]``/``vals[p]`` list the pairs sorted by latent (a stable sort keeps row order inside a
    segment, so each segment's summation order is fixed); latent f owns
    ``offsets[f]:offsets[f+1]``."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, n_latents: int):
        N, K = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        self.rows = torch.div(order, K, rounding_mode="floor")
        self.vals = values.reshape(-1)[order].contiguous()
        counts = torch.bincount(flat, minlength=n_latents)
        self.offsets = torch.zeros(n_latents + 1, device=indices.device, dtype=torch.int64)
        torch.cumsum(counts, 0, out=self.offsets[1:])
        self.n_latents = n_latents


@triton.jit
def _segment_reduce_kernel(
    g_ptr, g_stride,                  # dA [N, R]
    rows_ptr, vals_ptr, offs_ptr,     # ReverseIndex: [P], [P], [F + 1]
    out_ptr, out_s0, out_s1,          # dW [F, R] by strides (written in full: no memset needed);
                                      # (1, F) strides write straight into a [R, F] matrix (W_enc)
    R,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program mapping: one program per (latent f, block of BLOCK_C columns): feature-major, so every
    # output element has exactly one writer and a fixed summation order -> bitwise deterministic,
    # no atomics. It walks f's segment of the sorted pairs BLOCK_P at a time, gathering those rows
    # of dA. Traffic: N*K*R reads of dA (gathered rows), one F*R write. Latents that never fired
    # get an empty loop and a zero row. Hot latents (Zipf head) run longer loops: the straggler cost
    # docs/kernels.md#load-balance describes; split heavy segments if a GPU profile shows it
    # matters.
    f = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < R
    start = tl.load(offs_ptr + f)
    end = tl.load(offs_ptr + f + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < end
        r = tl.load(rows_ptr + p, mask=pm, other=0).to(tl.int64)
        v = tl.load(vals_ptr + p, mask=pm, other=0.0).to(tl.float32)
        live = pm & (v != 0.0)
        g = tl.load(g_ptr + r[:, None] * g_stride + cols[None, :],
                    mask=live[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * g, axis=0)
    tl.store(out_ptr + f.to(tl.int64) * out_s0 + cols.to(tl.int64) * out_s1,
             acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _scatter_atomic_kernel(
    g_ptr, g_stride,                  # dA [N, R]
    val_ptr, idx_ptr,                 # [N, K]
    out_ptr,                          # dW [F, R] fp32, zero-initialised
    N, K, R,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program mapping: token-major, one program per (BLOCK_N rows, BLOCK_C columns): the dA tile is
    # loaded once and scattered K times with fp32 atomics. No sort, fewer passes, but the order of
    # the atomic additions varies run to run (not bitwise reproducible): opt-in only.
    rows64, cols, rmask = row_col_tile(N, BLOCK_N, BLOCK_C)
    cmask = cols < R
    g = tl.load(g_ptr + rows64[:, None] * g_stride + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    for k in range(0, K):
        v = tl.load(val_ptr + rows64 * K + k, mask=rmask, other=0.0).to(tl.float32)
        f = tl.load(idx_ptr + rows64 * K + k, mask=rmask, other=0).to(tl.int64)
        live = rmask & (v != 0.0)
        tl.atomic_add(out_ptr + f[:, None] * R + cols[None, :], v[:, None] * g,
                      mask=live[:, None] & cmask[None, :], sem="relaxed")


def scatter_weight_grad(grad, rev: ReverseIndex | None, values, indices, n_latents: int, dtype,
                        deterministic: bool = True, out: torch.Tensor | None = None):
    """dW [F, R] in ``dtype`` from dA [N, R]: feature-major over ``rev`` (deterministic) or
    token-major fp32 atomics (``deterministic=False``; fp32 buffers only: bf16 atomics are not
    portable and lose precision). ``out`` (deterministic path only) may be any [F, R] view, e.g.
    the transpose of a [R, F] gradient buffer."""
    N, R = grad.shape
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    bc = block_cols(R)
    if deterministic:
        if out is None:
            out = torch.empty(n_latents, R, device=grad.device, dtype=dtype)
        if n_latents == 0:
            return out
        _segment_reduce_kernel[(n_latents, triton.cdiv(R, bc))](
            grad, grad.stride(0), rev.rows, rev.vals, rev.offsets, out, out.stride(0),
            out.stride(1), R, BLOCK_P=BLOCK_P, BLOCK_C=bc, num_warps=NUM_WARPS)
        return out
    out = torch.zeros(n_latents, R, device=grad.device, dtype=torch.float32)
    if N:
        _scatter_atomic_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(R, bc))](
            grad, grad.stride(0), values.contiguous(), indices.contiguous(), out, N,
            indices.shape[1], R, BLOCK_N=BLOCK_N, BLOCK_C=bc, num_warps=NUM_WARPS)
    return out.to(dtype)
