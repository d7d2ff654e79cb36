"""Triton kernels of the linear-attention branch over the dropped key blocks (SLA/SLA2, DESIGN §1b).

The definition and plain PyTorch reference is :func:`sparge_compile.linear_branch.linear_attention_dropped`
(φ = softmax over the head dim, or elu + 1; states over the real keys of each block; a query
block's domain is a prefix of the key blocks; O_lin = φ(q)·A_i / (φ(q)·b_i + eps), A_i, b_i the
sums of S_j, z_j over its dropped blocks, exactly 0 for a query block that drops nothing).

Forward, four launches (fp32 states):
1. ``_states_kernel``  one pass over k, v: S_j = φ(K_j)ᵀV_j (B, Hkv, nk, D, Dv), z_j = φ(K_j)ᵀ1.
2. ``_scan_kernel``    the total over the key blocks (non-causal) or their prefix sums (causal),
                       for S and for z (two launches).
3. ``_out_kernel``     per query block: A_i = total(row's domain) − Σ its kept blocks in the
                       domain (from kv_num_blocks / kv_indices), then φ(Q_i)·A_i / (φ(Q_i)·b_i + eps).

Backward (the states are recomputed, not saved), with w = φ(q)·b + eps and O = φ(q)A/w:
dφ(q) = (A·dO − (O·dO) b) / w; dA_i = Σ_rows φ(q)ᵀ dO / w; db_i = −Σ_rows φ(q) (O·dO) / w.
4. ``_dq_kernel``      per query block: dq (through φ's Jacobian), dA_i, db_i.
5. ``_scan_kernel``    suffix sums of dA, db over the query blocks (a key block j is in the domain
                       of the query blocks i ≥ i0(j)), or their totals (non-causal).
6. ``_dkv_kernel``     per key block: dS_j = Σ over the group's query heads of (suffix at i0(j) −
                       Σ the query blocks that kept j, from the transposed index); then
                       dv = φ(K) dS_j, dφ(k) = dS_j v + dz_j, dk through φ's Jacobian.
Key padding is not supported (neither is it by the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from . import tuning
from .forward import dot_precision
from .phi import _phi

KINDS = ("softmax", "elu")


@triton.jit
def _phi_grad(p, dp, SOFTMAX: tl.constexpr):
    """dx from dφ = dp, with p = φ(x) (0 past D). elu + 1: x > 0 exactly where p > 1 (at x = 0
    both branches give dp)."""
    if SOFTMAX:
        return p * (dp - tl.sum(p * dp, 1)[:, None])
    return tl.where(p > 1.0, dp, p * dp)


@triton.jit
def _both(mask, cond):
    """mask (a block) and a scalar condition (the interpreter rejects a bool block & a bool scalar)."""
    return (mask.to(tl.int32) * cond.to(tl.int32)) != 0


@triton.jit
def _program(H, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ids (block, batch x head) and the block's row and column offsets and bounds."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    offs = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return i, bh, bh // H, bh % H, offs, offs_d, offs < N, offs_d < D


@triton.jit
def _key_block(K, Hkv, skb, skh, skn, skd, Nk, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               SOFTMAX: tl.constexpr):
    """This program's key block (program ids: key block, batch x kv head): φ(K_j) (rows past Nk
    zeroed after φ: padding is not a key) and its offsets."""
    j, bh, b, hk, offs_n, offs_d, n_ok, d_ok = _program(Hkv, Nk, D, BLOCK_N, BLOCK_D)
    x = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    pk = tl.where(n_ok[:, None], _phi(x, d_ok, SOFTMAX), 0.0)
    return pk, j, bh, b, hk, offs_n, offs_d, n_ok, d_ok


@triton.jit
def _states_kernel(K, V, S, Z, skb, skh, skn, skd, svb, svh, svn, svd, Hkv, Nk, nk, D, Dv,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    pk, j, bh, b, hk, offs_n, offs_d, n_ok, d_ok = _key_block(K, Hkv, skb, skh, skn, skd, Nk, D, BLOCK_N,
                                                              BLOCK_D, SOFTMAX)
    base = (bh * nk + j) * D
    tl.store(Z + base + offs_d, tl.sum(pk, 0), mask=d_ok)
    for c in range(0, tl.cdiv(Dv, BLOCK_DV)):
        offs_v = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_ok = offs_v < Dv
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_v[None, :] * svd,
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        s = tl.dot(tl.trans(pk.to(v.dtype)), v, input_precision=PREC)
        tl.store(S + (base + offs_d[:, None]) * Dv + offs_v[None, :], s, mask=d_ok[:, None] & v_ok[None, :])


@triton.jit
def _scan_kernel(X, Y, n, F, ALL: tl.constexpr, REVERSE: tl.constexpr, BLOCK_F: tl.constexpr):
    """X (R, n, F) fp32 -> Y: the running sums along n (ALL; backwards with REVERSE) as (R, n, F),
    or only the total as (R, 1, F)."""
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = offs < F
    acc = tl.zeros([BLOCK_F], tl.float32)
    for t in range(0, n):
        t_ = n - 1 - t if REVERSE else t
        acc += tl.load(X + (r * n + t_) * F + offs, mask=ok, other=0.0)
        if ALL:
            tl.store(Y + (r * n + t_) * F + offs, acc, mask=ok)
    if not ALL:
        tl.store(Y + r * F + offs, acc, mask=ok)


@triton.jit
def _dropped_z(Z, Zt, lut, n_kept, row, n_dom, base, tot_base, offs_d, d_ok, D):
    """b_i = z's total over the row's domain − Σ its kept blocks inside it; and how many kept
    blocks lie inside the domain."""
    zt = tl.load(Zt + (tot_base + tl.maximum(row, 0)) * D + offs_d, mask=_both(d_ok, row >= 0), other=0.0)
    cnt = tl.full([], 0, tl.int32)
    for t in range(0, n_kept):
        j = tl.load(lut + t)
        inside = j < n_dom
        zt -= tl.load(Z + (base + j) * D + offs_d, mask=_both(d_ok, inside), other=0.0)
        cnt += inside.to(tl.int32)
    return zt, cnt


@triton.jit
def _dropped_s(S, St, lut, n_kept, row, n_dom, base, tot_base, offs_d, d_ok, offs_v, v_ok, D, Dv):
    """A_i[:, chunk]: S's total over the row's domain − Σ its kept blocks inside it."""
    tile = offs_d[:, None] * Dv + offs_v[None, :]
    ok = d_ok[:, None] & v_ok[None, :]
    a = tl.load(St + (tot_base + tl.maximum(row, 0)) * D * Dv + tile, mask=_both(ok, row >= 0), other=0.0)
    for t in range(0, n_kept):
        j = tl.load(lut + t)
        a -= tl.load(S + (base + j) * D * Dv + tile, mask=_both(ok, j < n_dom), other=0.0)
    return a


@triton.jit
def _query_setup(Q, Z, Zt, KvNum, KvIdx, NDom, TotRow, eps, Hq, G, sqb, sqh, sqn, sqd, Nq, nq, nk, n_tot, D,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SOFTMAX: tl.constexpr):
    """This program's query block: φ(Q_i), b_i, 1/w per row (0 where the block drops nothing or
    past Nq), and where its mask row and states are."""
    i, bh, b, h, offs_m, offs_d, m_ok, d_ok = _program(Hq, Nq, D, BLOCK_M, BLOCK_D)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    p = _phi(tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32), d_ok, SOFTMAX)
    row_ = bh * nq + i
    n_kept = tl.load(KvNum + row_)
    lut = KvIdx + row_ * nk
    n_dom = tl.load(NDom + i)
    row = tl.load(TotRow + i)
    hkv = b * (Hq // G) + h // G
    zt, cnt = _dropped_z(Z, Zt, lut, n_kept, row, n_dom, hkv * nk, hkv * n_tot, offs_d, d_ok, D)
    w = tl.sum(p * zt[None, :], 1) + eps
    inv_w = tl.where((n_dom - cnt > 0) & m_ok, 1.0 / w, 0.0)    # exact 0 where the block drops nothing
    return p, zt, inv_w, offs_m, m_ok, offs_d, d_ok, n_kept, lut, n_dom, row, hkv, b, h


@triton.jit
def _out_kernel(Q, S, Z, St, Zt, KvNum, KvIdx, NDom, TotRow, Out, eps,
                sqb, sqh, sqn, sqd, sob, soh, son, sod, Hq, G, Nq, nq, nk, n_tot, D, Dv,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    p, zt, inv_w, offs_m, m_ok, offs_d, d_ok, n_kept, lut, n_dom, row, hkv, b, h = _query_setup(
        Q, Z, Zt, KvNum, KvIdx, NDom, TotRow, eps, Hq, G, sqb, sqh, sqn, sqd, Nq, nq, nk, n_tot, D,
        BLOCK_M, BLOCK_D, SOFTMAX)
    for c in range(0, tl.cdiv(Dv, BLOCK_DV)):
        offs_v = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_ok = offs_v < Dv
        a = _dropped_s(S, St, lut, n_kept, row, n_dom, hkv * nk, hkv * n_tot, offs_d, d_ok, offs_v, v_ok,
                       D, Dv)
        o = tl.dot(p, a, input_precision=PREC) * inv_w[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_v[None, :] * sod,
                 o.to(Out.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


@triton.jit
def _dq_kernel(Q, DO, S, Z, St, Zt, KvNum, KvIdx, NDom, TotRow, DQ, DA, DB, eps,
               sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd, sgb, sgh, sgn, sgd, Hq, G, Nq, nq, nk, n_tot, D, Dv,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    p, zt, inv_w, offs_m, m_ok, offs_d, d_ok, n_kept, lut, n_dom, row, hkv, b, h = _query_setup(
        Q, Z, Zt, KvNum, KvIdx, NDom, TotRow, eps, Hq, G, sqb, sqh, sqn, sqd, Nq, nq, nk, n_tot, D,
        BLOCK_M, BLOCK_D, SOFTMAX)
    dp = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    odo = tl.zeros([BLOCK_M], tl.float32)
    blk = ((b * Hq + h) * nq + tl.program_id(0)) * D
    for c in range(0, tl.cdiv(Dv, BLOCK_DV)):
        offs_v = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_ok = offs_v < Dv
        a = _dropped_s(S, St, lut, n_kept, row, n_dom, hkv * nk, hkv * n_tot, offs_d, d_ok, offs_v, v_ok,
                       D, Dv)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_v[None, :] * sdd,
                     mask=m_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        o = tl.dot(p, a, input_precision=PREC) * inv_w[:, None]
        odo += tl.sum(o * do, 1)
        do_w = do * inv_w[:, None]
        dp += tl.dot(do_w, tl.trans(a), input_precision=PREC)
        da = tl.dot(tl.trans(p), do_w, input_precision=PREC)
        tl.store(DA + (blk + offs_d[:, None]) * Dv + offs_v[None, :], da, mask=d_ok[:, None] & v_ok[None, :])
    odo_w = odo * inv_w
    dp -= odo_w[:, None] * zt[None, :]
    tl.store(DB + blk + offs_d, -tl.sum(p * odo_w[:, None], 0), mask=d_ok)
    dq = _phi_grad(p, dp, SOFTMAX)
    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _key_grad_sum(DA, DAt, QNum, QIdx, NDom, j, row, b, hk, G, Hq, nq, nk, n_tot, tile, ok, F):
    """Σ over the group's query heads of dA's suffix at row − its blocks that kept j (in the domain);
    F = D·Dv for dA, D for db (tile: the offsets inside one block's F values)."""
    acc = tile.to(tl.float32) * 0.0
    for g in range(0, G):
        h = b * Hq + hk * G + g
        acc += tl.load(DAt + (h * n_tot + tl.maximum(row, 0)) * F + tile, mask=_both(ok, row >= 0), other=0.0)
        col = h * nk + j
        n = tl.load(QNum + col)
        for t in range(0, n):
            i = tl.load(QIdx + col * nq + t)
            inside = j < tl.load(NDom + i)
            acc -= tl.load(DA + (h * nq + i) * F + tile, mask=_both(ok, inside), other=0.0)
    return acc


@triton.jit
def _dkv_kernel(K, V, DA, DB, DAt, DBt, QNum, QIdx, NDom, SufRow, DK, DV,
                skb, skh, skn, skd, svb, svh, svn, svd, Hkv, G, Nk, nq, nk, n_tot, D, Dv,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    pk, j, bh, b, hk, offs_n, offs_d, n_ok, d_ok = _key_block(K, Hkv, skb, skh, skn, skd, Nk, D, BLOCK_N,
                                                              BLOCK_D, SOFTMAX)
    Hq = Hkv * G
    row = tl.load(SufRow + j)
    dphi = _key_grad_sum(DB, DBt, QNum, QIdx, NDom, j, row, b, hk, G, Hq, nq, nk, n_tot, offs_d, d_ok, D)
    dphi = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + dphi[None, :]
    for c in range(0, tl.cdiv(Dv, BLOCK_DV)):
        offs_v = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_ok = offs_v < Dv
        tile = offs_d[:, None] * Dv + offs_v[None, :]
        ds = _key_grad_sum(DA, DAt, QNum, QIdx, NDom, j, row, b, hk, G, Hq, nq, nk, n_tot, tile,
                           d_ok[:, None] & v_ok[None, :], D * Dv)
        nv_ok = n_ok[:, None] & v_ok[None, :]
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_v[None, :] * svd,
                    mask=nv_ok, other=0.0).to(tl.float32)
        g_off = bh * Nk * Dv + offs_n[:, None] * Dv + offs_v[None, :]       # dv: contiguous
        tl.store(DV + g_off, tl.dot(pk, ds, input_precision=PREC).to(DV.dtype.element_ty), mask=nv_ok)
        dphi += tl.dot(v, tl.trans(ds), input_precision=PREC)
    k_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]              # dk: contiguous
    tl.store(DK + k_off, _phi_grad(pk, dphi, SOFTMAX).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])


def _check_kind(kind: str) -> bool:
    if kind not in KINDS:
        raise ValueError(f"feature_map must be one of {KINDS}, got {kind!r}")
    return kind == "softmax"


def domain_rows(Nq: int, Nk: int, block_q: int, block_k: int, is_causal: bool, device):
    """n_dom (nq,): the length of each query block's domain prefix (linear_branch.linear_domain);
    tot_row (nq,): its row in the scanned states (-1: empty domain); suf_row (nk,): each key block's
    row in the suffix-scanned query gradients (-1: in no domain)."""
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    if not is_causal:
        n_dom = torch.full((nq,), nk, dtype=torch.int32, device=device)
        zeros = torch.zeros((nq,), dtype=torch.int32, device=device)
        return n_dom, zeros, torch.zeros((nk,), dtype=torch.int32, device=device)
    first_row = torch.arange(nq, device=device) * block_q
    last_key = torch.clamp((torch.arange(nk, device=device) + 1) * block_k, max=Nk) - 1
    dom = last_key[None, :] <= first_row[:, None]                  # (nq, nk), a prefix per row
    n_dom = dom.sum(-1).to(torch.int32)
    in_any = dom.any(0)
    suf = torch.where(in_any, dom.to(torch.int8).argmax(0), -1)    # the first query block seeing j
    return n_dom, n_dom - 1, suf.to(torch.int32)


def _scan(x: torch.Tensor, causal: bool, reverse: bool) -> torch.Tensor:
    """x (R, n, ...) fp32 contiguous -> running sums (causal) or the totals (R, 1, ...)."""
    R, n = x.shape[:2]
    F = x[0, 0].numel()
    y = torch.empty((R, n if causal else 1) + x.shape[2:], dtype=torch.float32, device=x.device)
    block_f = min(1024, triton.next_power_of_2(F))
    _scan_kernel[(R, cdiv(F, block_f))](x, y, n, F, ALL=causal, REVERSE=reverse, BLOCK_F=block_f, num_warps=4)
    return y


def _tiles(D: int, Dv: int):
    return tuning.head_dim_tile(D), min(64, tuning.head_dim_tile(Dv))


def block_states_triton(k, v, block_k: int, kind: str = "softmax"):
    """S (B, Hkv, nk, D, Dv), z (B, Hkv, nk, D) fp32, as linear_branch.block_states."""
    softmax = _check_kind(kind)
    B, Hkv, Nk, D = k.shape
    Dv = v.shape[-1]
    nk = cdiv(Nk, block_k)
    S = torch.empty((B, Hkv, nk, D, Dv), dtype=torch.float32, device=k.device)
    Z = torch.empty((B, Hkv, nk, D), dtype=torch.float32, device=k.device)
    BLOCK_D, BLOCK_DV = _tiles(D, Dv)
    _states_kernel[(nk, B * Hkv)](k, v, S, Z, *k.stride(), *v.stride(), Hkv, Nk, nk, D, Dv,
                                  BLOCK_N=block_k, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, SOFTMAX=softmax,
                                  PREC=dot_precision(k.dtype), num_warps=4)
    return S, Z


def _states(k, v, block_k, is_causal, kind):
    S, Z = block_states_triton(k, v, block_k, kind)
    St = _scan(S.flatten(0, 1), is_causal, False)
    Zt = _scan(Z.flatten(0, 1), is_causal, False)
    return S, Z, St, Zt


def linear_fwd_triton(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, is_causal=False,
                      kind="softmax", eps=1e-5):
    """O_lin (B, Hq, Nq, Dv) in q's dtype (linear_branch.linear_attention_dropped) from the mask's
    kv_num_blocks (B, Hq, nq), kv_indices (B, Hq, nq, nk) int32."""
    from . import linear_recompute

    softmax = _check_kind(kind)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if linear_recompute.applies(is_causal, D, Dv):   # opt-in: no per-block states
        return linear_recompute.linear_fwd_recompute(q, k, v, kv_num_blocks, kv_indices, block_q, block_k,
                                                     softmax, eps)
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    S, Z, St, Zt = _states(k, v, block_k, is_causal, kind)
    n_dom, tot_row, _ = domain_rows(Nq, Nk, block_q, block_k, is_causal, q.device)
    out = torch.empty((B, Hq, Nq, Dv), dtype=q.dtype, device=q.device)
    BLOCK_D, BLOCK_DV = _tiles(D, Dv)
    _out_kernel[(nq, B * Hq)](q, S, Z, St, Zt, kv_num_blocks.contiguous(), kv_indices.contiguous(), n_dom,
                              tot_row, out, float(eps), *q.stride(), *out.stride(), Hq, Hq // Hkv, Nq, nq,
                              nk, St.shape[1], D, Dv, BLOCK_M=block_q, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                              SOFTMAX=softmax, PREC=dot_precision(q.dtype),
                              num_warps=4 if BLOCK_D <= 64 else 8)
    return out


def linear_bwd_triton(dout, q, k, v, kv_num_blocks, kv_indices, block_q, block_k, is_causal=False,
                      kind="softmax", eps=1e-5, q_index=None):
    """(dq, dk, dv) of linear_fwd_triton. q_index: the transposed mask (q_num, q_idx) if known."""
    from .transpose import transpose_indices_triton

    softmax = _check_kind(kind)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    num, idx = kv_num_blocks.contiguous(), kv_indices.contiguous()
    S, Z, St, Zt = _states(k, v, block_k, is_causal, kind)
    n_dom, tot_row, suf_row = domain_rows(Nq, Nk, block_q, block_k, is_causal, q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dA = torch.empty((B, Hq, nq, D, Dv), dtype=torch.float32, device=q.device)
    dB = torch.empty((B, Hq, nq, D), dtype=torch.float32, device=q.device)
    BLOCK_D, BLOCK_DV = _tiles(D, Dv)
    meta = dict(BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, SOFTMAX=softmax, PREC=dot_precision(q.dtype),
                num_warps=4 if BLOCK_D <= 64 else 8)
    _dq_kernel[(nq, B * Hq)](q, dout, S, Z, St, Zt, num, idx, n_dom, tot_row, dq, dA, dB, float(eps),
                             *q.stride(), *dout.stride(), *dq.stride(), Hq, Hq // Hkv, Nq, nq, nk,
                             St.shape[1], D, Dv, BLOCK_M=block_q, **meta)
    dAt = _scan(dA.flatten(0, 1), is_causal, True)
    dBt = _scan(dB.flatten(0, 1), is_causal, True)
    q_num, q_idx = q_index if q_index is not None else transpose_indices_triton(num, idx, nk)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _dkv_kernel[(nk, B * Hkv)](k, v, dA, dB, dAt, dBt, q_num.contiguous(), q_idx.contiguous(), n_dom, suf_row,
                               dk, dv, *k.stride(), *v.stride(), Hkv, Hq // Hkv, Nk, nq, nk, dAt.shape[1],
                               D, Dv, BLOCK_N=block_k, **meta)
    return dq, dk, dv


__all__ = ["block_states_triton", "domain_rows", "linear_bwd_triton", "linear_fwd_triton"]
