"""Triton sparse attention backward: dQ, dK, dV of the masked function (the mask is constant).

* ``_bwd_dq_kernel``   one program per (query block, batch x query head); walks the same
  kv index list as the forward and accumulates dQ.
* ``_bwd_dkdv_kernel`` one program per (key block, batch x kv head); for each query head of
  the GQA group it walks the transposed index (the query blocks that kept this key block)
  and accumulates dK and dV. No atomics: the result is deterministic.

P is recomputed from the saved log-sum-exp; delta = rowsum(dO ∘ O) as in FlashAttention-2, computed
by the dQ kernel (it loads dO anyway) and stored for the dK/dV kernel, which runs after it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from . import forward as fwd_mod
from . import torch_impl, tuning
from .forward import _LOG2E, LOG2E, block_rows, dot_precision, tile_start
from .torch_impl import transpose_indices
from .transpose import transpose_indices_triton


@triton.jit
def _dq_step(q, do, lse2, delta, dq, k, v, offs_k, offs_m, m_ok, qk_scale, Nk, keep_base,
             PREC: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    """dQ += dS · K over the key rows offs_k (P recomputed from the saved log-sum-exp)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    valid = (offs_k < Nk)[None, :] & m_ok[:, None]
    if IS_CAUSAL:
        valid = valid & (offs_k[None, :] <= offs_m[:, None])
    if HAS_KEEP:   # keys the key-padding mask hides
        valid = valid & (tl.load(keep_base + offs_k, mask=offs_k < Nk, other=0) != 0)[None, :]
    p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, Lse, Delta, DQ, KvNum, KvIdx, Keep, qk_scale, scale,
                   sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   Hq, G, Nq, Nk, nq, nk, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
                   HAS_KEEP: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr):
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)   # Inductor: fp64
    i, row0 = block_rows(BLOCK_M, TILE_M)   # TILE_M rows of query block i; TILE_N keys a step
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = row0 + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Nq
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md, other=0.0)
    # DO and DQ are contiguous (B, Hq, Nq, D)
    do = tl.load(DO + (bh * Nq + offs_m[:, None]) * D + offs_d[None, :], mask=md, other=0.0)
    lse2 = tl.load(Lse + bh * Nq + offs_m, mask=m_ok, other=0.0) * _LOG2E
    # delta = rowsum(dO ∘ O) of these rows, stored for the dK/dV kernel (launched after this one)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=md, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * Nq + offs_m, delta, mask=m_ok)
    dq = tl.zeros([TILE_M, BLOCK_D], tl.float32)
    row = bh * nq + i
    n_steps = tl.load(KvNum + row) * (BLOCK_N // TILE_N)
    lut = KvIdx + row * nk
    keep_base = Keep + b * Nk
    if USE_TMA:  # K, V: (B, Hkv, Nk, D) tensor descriptors, rows past Nk read as zeros
        for t in range(n_steps):
            start = tile_start(lut, t, BLOCK_N, TILE_N)
            k = K.load([b, hk, start, 0]).reshape(TILE_N, BLOCK_D)
            v = V.load([b, hk, start, 0]).reshape(TILE_N, BLOCK_D)
            dq = _dq_step(q, do, lse2, delta, dq, k, v, start + tl.arange(0, TILE_N), offs_m, m_ok,
                          qk_scale, Nk, keep_base, PREC, IS_CAUSAL, HAS_KEEP)
    else:
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        for t in range(n_steps):
            offs_k = tile_start(lut, t, BLOCK_N, TILE_N) + tl.arange(0, TILE_N)
            kd = (offs_k < Nk)[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :] * skd, mask=kd, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :] * svd, mask=kd, other=0.0)
            dq = _dq_step(q, do, lse2, delta, dq, k, v, offs_k, offs_m, m_ok, qk_scale, Nk, keep_base, PREC,
                          IS_CAUSAL, HAS_KEEP)
    dq = dq * scale
    tl.store(DQ + (bh * Nq + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md)


@triton.jit
def _dkdv_slice(Q, DO, Lse, Delta, k, v, dk, dv, b, h, bh, row0, offs_m0, offs_n, offs_d, d_ok, n_ok,
                qk_scale, sqb, sqh, sqn, sqd, Nq, D, SUB_M: tl.constexpr, BLOCK_D: tl.constexpr,
                IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """dK, dV += the contribution of the SUB_M query rows from row0 (P recomputed from lse)."""
    offs_m = row0 + offs_m0
    m_ok = offs_m < Nq
    if USE_TMA:  # Q, DO: (B, Hq, Nq, D) descriptors, rows past Nq read as zeros
        q = Q.load([b, h, row0, 0]).reshape(SUB_M, BLOCK_D)
        do = DO.load([b, h, row0, 0]).reshape(SUB_M, BLOCK_D)
    else:
        md = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md, other=0.0)
        do = tl.load(DO + (bh * Nq + offs_m[:, None]) * D + offs_d[None, :], mask=md, other=0.0)
    lse2 = tl.load(Lse + bh * Nq + offs_m, mask=m_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + bh * Nq + offs_m, mask=m_ok, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_N, SUB_M)
    valid = n_ok[:, None] & m_ok[None, :]
    if IS_CAUSAL:
        valid = valid & (offs_n[:, None] <= offs_m[None, :])
    pt = tl.where(valid, tl.math.exp2(st - lse2[None, :]), 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, QNum, QIdx, Keep, qk_scale, scale,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     Hq, G, Nq, Nk, nq, nk, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, SUB_M: tl.constexpr,
                     USE_TMA: tl.constexpr, HAS_KEEP: tl.constexpr, TILE_N: tl.constexpr):
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)   # Inductor: fp64
    j, key0 = block_rows(BLOCK_N, TILE_N)   # TILE_N keys of key block j
    bhk = tl.program_id(1)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = key0 + tl.arange(0, TILE_N)
    offs_m0 = tl.arange(0, SUB_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < Nk
    nd = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd, other=0.0)
    dk = tl.zeros([TILE_N, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE_N, BLOCK_D], tl.float32)
    n_vis = n_ok   # key rows with a gradient: not past Nk, not hidden by the key-padding mask
    if HAS_KEEP:
        n_vis = n_ok & (tl.load(Keep + b * Nk + offs_n, mask=n_ok, other=0) != 0)
    NSUB: tl.constexpr = BLOCK_M // SUB_M
    for g in range(G):
        h = hk * G + g
        bh = b * Hq + h
        col = bh * nk + j
        n_q = tl.load(QNum + col)
        # one pipelined loop over (kept query block, slice): one slice's Q/dO buffers per stage
        # (a nested loop over the slices kept both slices' buffers: 161 KB of shared memory, one
        # program per SM; this: 96 KB, two programs per SM, dK/dV ~20% faster on the H100)
        for it in range(n_q * NSUB):
            row0 = tl.load(QIdx + col * nq + it // NSUB) * BLOCK_M + (it % NSUB) * SUB_M
            dk, dv = _dkdv_slice(Q, DO, Lse, Delta, k, v, dk, dv, b, h, bh, row0, offs_m0, offs_n, offs_d,
                                 d_ok, n_vis, qk_scale, sqb, sqh, sqn, sqd, Nq, D, SUB_M, BLOCK_D,
                                 IS_CAUSAL, PREC, USE_TMA)
    dk = dk * scale
    # DK and DV are contiguous (B, Hkv, Nk, D)
    tl.store(DK + (bhk * Nk + offs_n[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + (bhk * Nk + offs_n[:, None]) * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd)


_dq_autotuned = tuning.autotuned(_bwd_dq_kernel, tuning.DQ_CONFIGS, ["TILE_M", "TILE_N"])
_dkdv_autotuned = tuning.autotuned(_bwd_dkdv_kernel, tuning.DKDV_CONFIGS, ["SUB_M", "TILE_N"])

# Tuning knobs (the kernel-tuning benchmark overrides them): fixed launch settings where nothing
# is autotuned (None = the H100 default below) and the dK/dV query slice. Measured on the H100:
# dQ 8 warps, 3 stages (2 at a head-dim tile > 128; fewer where the buffers would not fit the
# shared memory, see tuning.fit_stages), a program per query block;
# dK/dV 64-row query slices, 4 warps, 2 stages; TMA loads where the GPU has them
# (None = forward.USE_TMA_DEFAULT).
BWD_DEFAULTS = dict(dq_warps=None, dq_stages=None, sub_m=64, dkdv_warps=None, dkdv_stages=None, use_tma=None)


def _bwd_tiles(q, block_q, block_k, sub_m):
    """(dQ tiles, dK/dV tiles) of :func:`.tuning.fit_tiles`, or None where one does not fit.
    dQ: Q and dO rows stay, K/V rows per stage; dK/dV: K and V rows stay, Q/dO slices per stage."""
    row = tuning.head_dim_tile(q.shape[-1]) * q.element_size()  # bytes of one tile row
    dq_tiles = tuning.fit_tiles(block_q, block_k, 2 * row, 2 * row, q)
    dkdv_tiles = tuning.fit_tiles(block_k, sub_m, 2 * row, 2 * row, q)
    return None if dq_tiles is None or dkdv_tiles is None else (dq_tiles, dkdv_tiles)


def attention_bwd_triton(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal, block_q,
                         block_k, kv_keep=None, **overrides):
    """kv_keep: None or a (B, Nk) bool key-padding mask; overrides: of BWD_DEFAULTS (tuning knobs).
    Where not even the smallest tiles fit the shared memory (or tuning.wide_exact_fp32): the
    PyTorch backward."""
    bad = set(overrides) - set(BWD_DEFAULTS)
    if bad:
        raise TypeError(f"unknown tuning options {sorted(bad)}")
    cfg = dict(BWD_DEFAULTS, **overrides)
    tiles = _bwd_tiles(q, block_q, block_k, min(block_q, cfg["sub_m"]))
    if tiles is None or tuning.wide_exact_fp32(q, tuning.head_dim_tile(q.shape[-1])):
        return torch_impl.attention_bwd(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal,
                                        block_q, block_k, kv_keep)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    dout = dout.contiguous()
    BLOCK_D = tuning.head_dim_tile(D)
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)  # written by the dQ kernel
    # the transposed index: two Triton launches on the GPU; torch ops in the interpreter (faster there)
    transposed = transpose_indices_triton if q.is_cuda else transpose_indices
    q_num, q_idx = transposed(kv_num_blocks, kv_indices, nk)
    dq = torch.empty((B, Hq, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Nk, D), dtype=v.dtype, device=q.device)
    common = dict(BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=BLOCK_D, IS_CAUSAL=bool(is_causal),
                  PREC=dot_precision(q.dtype), HAS_KEEP=kv_keep is not None)
    keep = fwd_mod.keep_pointer(kv_keep, kv_num_blocks)
    strides = (*q.stride(), *k.stride(), *v.stride())
    dims = (Hq, Hq // Hkv, Nq, Nk, nq, nk, D)
    qk_scale = float(scale) * LOG2E
    use_tma = fwd_mod.USE_TMA_DEFAULT if cfg["use_tma"] is None else cfg["use_tma"]
    use_tma = (bool(use_tma) and BLOCK_D <= 128 and v.shape[-1] == D  # measured up to D = 128
               and all(fwd_mod.tma_ok(x, D) for x in (q, k, v, dout)))
    (tm, tn), (tk, sub_m) = tiles
    row = BLOCK_D * q.element_size()  # bytes of one tile row
    dq_stages = tuning.fit_stages(3 if BLOCK_D <= 128 else 2, 2 * tm * row, 2 * tn * row, q)
    dkdv_stages = tuning.fit_stages(2, 2 * tk * row, 2 * sub_m * row, q)
    kd, vd = (fwd_mod.descriptor(k, tn), fwd_mod.descriptor(v, tn)) if use_tma else (k, v)
    qd, dod = (fwd_mod.descriptor(q, sub_m), fwd_mod.descriptor(dout, sub_m)) if use_tma else (q, dout)
    dq_args = (q, kd, vd, out, dout, lse, delta, dq, kv_num_blocks, kv_indices, keep, qk_scale, float(scale),
               *out.stride(), *strides, *dims)
    tuning.launch(_bwd_dq_kernel, _dq_autotuned, (nq * (block_q // tm), B * Hq), q, dq_args,
                  dict(common, USE_TMA=use_tma, TILE_M=tm, TILE_N=tn), cfg["dq_warps"], cfg["dq_stages"],
                  fixed=(8, dq_stages))
    tuning.launch(_bwd_dkdv_kernel, _dkdv_autotuned, (nk * (block_k // tk), B * Hkv), q,
                  (qd, k, v, dod, lse, delta, dk, dv, q_num, q_idx, keep, qk_scale, float(scale), *strides,
                   *dims),
                  dict(common, USE_TMA=use_tma, SUB_M=sub_m, TILE_N=tk), cfg["dkdv_warps"],
                  cfg["dkdv_stages"], fixed=(4, dkdv_stages))
    return dq, dk, dv
