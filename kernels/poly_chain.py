"""Triton kernel for the chain rule through the polynomial terms (the poly backward's epilogue).

Given dH = dX [C1 C2 C3] (the gradient of H = [a1, l2*h2, l3*h3]) and the saved projections, it
writes dA1 (dA2, dA3 in separate-U mode) and per-program partial sums of dlambda2 / dlambda3 in one
pass, replacing a dozen elementwise torch launches. Spec: autograd through
``reference.poly_terms_ref`` + ``poly_combine_ref`` (tests compare the whole op in float64).

Shared U (h2 = b^2, h3 = c^3 with b = a1[:, :R2], c = a1[:, :R3]):
    dA1 = dH1 + [2 l2 dH2 b] + [3 l3 dH3 c^2];  dl2 = sum dH2 b^2;  dl3 = sum dH3 c^3
Separate U (h2 = b a2, h3 = c a2[:, :R3] a3):
    dA1 = dH1 + [l2 dH2 a2] + [l3 dH3 a2 a3];  dA2 = l2 dH2 b + [l3 dH3 c a3];  dA3 = l3 dH3 c a2
(brackets: only on the first R2 / R3 columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_gather import BLOCK_N, NUM_WARPS, block_cols, row_col_tile


@triton.jit
def _poly_chain_bwd_kernel(
    dh_ptr, dh_stride,                # dH [N, R1+R2+R3] (any float dtype; read as fp32)
    h_ptr, h_stride,                  # H [N, ...]: its first R1 columns are a1
    a2_ptr, a3_ptr,                   # [N, R2], [N, R3] saved projections (separate mode)
    lam2_ptr, lam3_ptr,               # 0-d lambdas (read on device)
    da1_ptr, da2_ptr, da3_ptr,        # out fp32 [N, R1], [N, R2], [N, R3]
    dl_ptr,                           # out fp32 [2, n_programs]: partial dlambda2, dlambda3
    N, R1, R2, R3,
    ORDER: tl.constexpr, SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program mapping: one program per (BLOCK_N rows, BLOCK_C columns), the same tiling as the
    # forward gather. Purely elementwise: reads dH (N*SR) and A (N*R1, +R2+R3), writes dA once.
    # The lambda gradients are reduced inside the program and written as one partial per program;
    # the host sums the partials in a fixed order, so the result is deterministic (no atomics).
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    rows, cols, rmask = row_col_tile(N, BLOCK_N, BLOCK_C)
    m1 = rmask[:, None] & (cols < R1)[None, :]
    m2 = rmask[:, None] & (cols < R2)[None, :]
    m3 = rmask[:, None] & (cols < R3)[None, :]
    dh = dh_ptr + rows[:, None] * dh_stride + cols[None, :]
    a1 = tl.load(h_ptr + rows[:, None] * h_stride + cols[None, :], mask=m1,
                 other=0.0).to(tl.float32)
    da1 = tl.load(dh, mask=m1, other=0.0).to(tl.float32)
    da2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    dl2 = 0.0
    dl3 = 0.0
    if ORDER >= 2:
        l2 = tl.load(lam2_ptr).to(tl.float32)
        dh2 = tl.load(dh + R1, mask=m2, other=0.0).to(tl.float32)  # zero outside the R2 prefix
        if SHARED:
            dl2 = tl.sum(tl.sum(dh2 * a1 * a1, axis=1), axis=0)
            da1 += 2.0 * l2 * dh2 * a1
        else:
            a2 = tl.load(a2_ptr + rows[:, None] * R2 + cols[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            dl2 = tl.sum(tl.sum(dh2 * a1 * a2, axis=1), axis=0)
            da1 += l2 * dh2 * a2
            da2 = l2 * dh2 * a1
    if ORDER >= 3:
        l3 = tl.load(lam3_ptr).to(tl.float32)
        dh3 = tl.load(dh + R1 + R2, mask=m3, other=0.0).to(tl.float32)
        if SHARED:
            dl3 = tl.sum(tl.sum(dh3 * a1 * a1 * a1, axis=1), axis=0)
            da1 += 3.0 * l3 * dh3 * a1 * a1
        else:
            # R3 <= R2 in separate mode, so a2 (loaded under m2) covers the cubic columns.
            a3 = tl.load(a3_ptr + rows[:, None] * R3 + cols[None, :], mask=m3,
                         other=0.0).to(tl.float32)
            t = l3 * dh3
            dl3 = tl.sum(tl.sum(dh3 * a1 * a2 * a3, axis=1), axis=0)
            da1 += t * a2 * a3
            da2 += t * a1 * a3
            tl.store(da3_ptr + rows[:, None] * R3 + cols[None, :], t * a1 * a2, mask=m3)
    tl.store(da1_ptr + rows[:, None] * R1 + cols[None, :], da1, mask=m1)
    if not SHARED:
        if ORDER >= 2:
            tl.store(da2_ptr + rows[:, None] * R2 + cols[None, :], da2, mask=m2)
    tl.store(dl_ptr + pid, dl2)
    tl.store(dl_ptr + n_prog + pid, dl3)


def poly_chain_backward(dH, H, A2, A3, lambda2, lambda3, r1: int, r2: int, r3: int, order: int):
    """(dA1, dA2 | None, dA3 | None, dlambda2 | None, dlambda3 | None), all fp32."""
    N = dH.shape[0]
    shared = A2 is None
    dev = dH.device
    da1 = torch.empty(N, r1, device=dev, dtype=torch.float32)
    da2 = torch.empty(N, r2, device=dev, dtype=torch.float32) if not shared and order >= 2 else None
    da3 = torch.empty(N, r3, device=dev, dtype=torch.float32) if not shared and order >= 3 else None
    bc = block_cols(r1)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(r1, bc))
    partials = torch.zeros(2, grid[0] * grid[1], device=dev, dtype=torch.float32)
    if N:
        if dH.stride(1) != 1:
            dH = dH.contiguous()
        dummy = da1
        _poly_chain_bwd_kernel[grid](
            dH, dH.stride(0), H, H.stride(0),
            dummy if A2 is None else A2.contiguous(), dummy if A3 is None else A3.contiguous(),
            dummy if lambda2 is None else lambda2, dummy if lambda3 is None else lambda3,
            da1, dummy if da2 is None else da2, dummy if da3 is None else da3, partials,
            N, r1, r2, r3, ORDER=order, SHARED=shared, BLOCK_N=BLOCK_N, BLOCK_C=bc,
            num_warps=NUM_WARPS)
    dl = partials.sum(1)  # fixed-order reduction of per-program partials: deterministic
    return (da1, da2, da3, dl[0] if order >= 2 else None, dl[1] if order >= 3 else None)
