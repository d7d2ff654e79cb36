"""The linear branch's forward without per-block states (non-causal; opt-in, see ``RECOMPUTE``).

:mod:`.linear` stores S_j = φ(K_j)ᵀV_j for every key block (fp32, D x Dv: 64 KiB at D = 128) and
its ``_out_kernel`` reads one per (query block, kept block) pair: ~5 GB at 32768 tokens, 12 heads,
95%, and 1.46 ms against the sparse kernel's 0.63 (H200, 2026-12-02, bench/tools/linear.py). Here:

1. φ(K) once, in k's dtype (the states kernel rounds φ(K) to it for its product as well).
2. ``_chunk_states_kernel``: the total Σ_j S_j and Σ_j z_j in chunks of ``CHUNK`` key blocks
   (partial sums, then :func:`.linear._scan` over the chunks): no per-block states in memory.
3. ``_out_recompute_kernel``: per query block, Σ over its kept blocks of φ(K_j)ᵀV_j from the
   φ(K) and V tiles (one (D x Dv) accumulator, 32 KiB of bf16 tiles read per pair, the tiles the
   sparse kernel reads too), then A_i = total − kept and O = φ(Q_i)·A_i / (φ(Q_i)·b_i + eps).

The same function as :func:`.linear.linear_fwd_triton` (tests/test_linear_kernels.py runs both
against the float64 definition); only the non-causal case with head-dim tiles of at most 128.
The backward is :mod:`.linear`'s.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from .forward import dot_precision
from .linear import _phi, _program, _scan, _tiles

# SPARGE_LINEAR_RECOMPUTE=1: linear_fwd_triton takes this path where it applies (not yet timed on
# a GPU: the default stays the per-block states)
RECOMPUTE = os.environ.get("SPARGE_LINEAR_RECOMPUTE", "0") == "1"
CHUNK = 16   # key blocks per program of the totals


def applies(is_causal: bool, D: int, Dv: int) -> bool:
    return RECOMPUTE and not is_causal and max(D, Dv) <= 128


@triton.jit
def _add_block(PK, V, acc, z, offs_n, offs_d, d_ok, offs_v, v_ok, b, hk, spb, sph, spn, spd,
               svb, svh, svn, svd, Nk, PREC: tl.constexpr):
    """acc += φ(K_j)ᵀV_j and z += Σ_rows φ(K_j) over the key rows offs_n (past Nk: nothing)."""
    n_ok = offs_n < Nk
    pk = tl.load(PK + b * spb + hk * sph + offs_n[:, None] * spn + offs_d[None, :] * spd,
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_v[None, :] * svd,
                mask=n_ok[:, None] & v_ok[None, :], other=0.0)
    return acc + tl.dot(tl.trans(pk.to(v.dtype)), v, input_precision=PREC), z + tl.sum(pk.to(tl.float32), 0)


@triton.jit
def _chunk_states_kernel(PK, V, SP, ZP, spb, sph, spn, spd, svb, svh, svn, svd, Hkv, Nk, nc, D, Dv,
                         BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """SP[bh, c] = Σ over the key blocks of chunk c of φ(K_j)ᵀV_j, ZP[bh, c] = Σ φ(K_j) rows."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, hk = bh // Hkv, bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < Dv
    acc = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, CHUNK):
        offs_n = (c * CHUNK + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, z = _add_block(PK, V, acc, z, offs_n, offs_d, d_ok, offs_v, v_ok, b, hk, spb, sph, spn, spd,
                            svb, svh, svn, svd, Nk, PREC)
    base = bh * nc + c
    tl.store(ZP + base * D + offs_d, z, mask=d_ok)
    tl.store(SP + (base * D + offs_d[:, None]) * Dv + offs_v[None, :], acc,
             mask=d_ok[:, None] & v_ok[None, :])


@triton.jit
def _out_recompute_kernel(Q, PK, V, St, Zt, KvNum, KvIdx, Out, eps,
                          sqb, sqh, sqn, sqd, spb, sph, spn, spd, svb, svh, svn, svd, sob, soh, son, sod,
                          Hq, G, Nq, Nk, nq, nk, D, Dv,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    i, bh, b, h, offs_m, offs_d, m_ok, d_ok = _program(Hq, Nq, D, BLOCK_M, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < Dv
    p = _phi(tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32), d_ok, SOFTMAX)
    hk = h // G
    hkv = b * (Hq // G) + hk
    row = bh * nq + i
    n_kept = tl.load(KvNum + row)
    acc = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, n_kept):
        offs_n = tl.load(KvIdx + row * nk + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, z = _add_block(PK, V, acc, z, offs_n, offs_d, d_ok, offs_v, v_ok, b, hk, spb, sph, spn, spd,
                            svb, svh, svn, svd, Nk, PREC)
    z = tl.load(Zt + hkv * D + offs_d, mask=d_ok, other=0.0) - z
    a = tl.load(St + (hkv * D + offs_d[:, None]) * Dv + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :],
                other=0.0) - acc
    w = tl.sum(p * z[None, :], 1) + eps
    inv_w = tl.where((n_kept < nk) & m_ok, 1.0 / w, 0.0)    # exact 0 where the block drops nothing
    o = tl.dot(p, a, input_precision=PREC) * inv_w[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_v[None, :] * sod,
             o.to(Out.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


def linear_fwd_recompute(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, softmax: bool, eps: float):
    """O_lin of a non-causal mask (as linear_fwd_triton), through the two kernels above."""
    from ..linear_branch import feature_map

    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    BLOCK_D, _ = _tiles(D, Dv)
    BLOCK_DV = triton.next_power_of_2(max(Dv, 16))
    pk = feature_map(k.float(), "softmax" if softmax else "elu").to(k.dtype)
    nc = cdiv(nk, CHUNK)
    SP = torch.empty((B * Hkv, nc, D, Dv), dtype=torch.float32, device=q.device)
    ZP = torch.empty((B * Hkv, nc, D), dtype=torch.float32, device=q.device)
    prec = dot_precision(q.dtype)
    _chunk_states_kernel[(nc, B * Hkv)](pk, v, SP, ZP, *pk.stride(), *v.stride(), Hkv, Nk, nc, D, Dv,
                                        BLOCK_N=block_k, CHUNK=CHUNK, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                        PREC=prec, num_warps=4)
    St, Zt = _scan(SP, False, False), _scan(ZP, False, False)
    out = torch.empty((B, Hq, Nq, Dv), dtype=q.dtype, device=q.device)
    num, idx = kv_num_blocks.contiguous(), kv_indices.contiguous()
    _out_recompute_kernel[(nq, B * Hq)](
        q, pk, v, St, Zt, num, idx, out, float(eps), *q.stride(), *pk.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Nq, Nk, nq, nk, D, Dv, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV, SOFTMAX=softmax, PREC=prec, num_warps=8)
    return out


__all__ = ["CHUNK", "RECOMPUTE", "applies", "linear_fwd_recompute"]
