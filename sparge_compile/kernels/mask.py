"""Triton mask prediction: mean-pool Q/K blocks, score, hybrid Top-k + Top-p selection.

Launches: pooling of the query and of the key blocks (fp32, head dim padded to a power of
two); block scores q̄·k̄ᵀ·scale (fp32); per tile of query blocks the softmax and the
selection, which keeps the
max(c_k, c_p, 1) best blocks (ties to the lower index) plus, causal, the diagonal blocks; a
row with a NaN/inf score keeps every visible block.
It writes FlexAttention-style kv_num_blocks / kv_indices (kept blocks ascending, then the
dropped ones ascending). topk and topp are runtime values: changing them never recompiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import cdiv, key_blocks_visible
from .tuning import head_dim_tile, run

MODE_IDS = {"hybrid": 0, "topk": 1, "topp": 2}
_FORCE_BISECTION = False
# GPU selection, measured on the H100 and H200: one warp per program (the bisection's row sums
# stay inside a warp: 0.030 ms vs 0.054 with 8 rows on 4 warps at nk=512, H100), rows of up to
# SELECT_ELEMS block scores per program (one row of 512 scores: 0.0104 vs 0.0116 ms for two,
# top-k, H200); longer rows get a warp per 1024 scores (nk = 1182 at 75600 tokens: one warp
# holds 255 registers, 2 warps 167: 0.150 vs 0.183 ms, H100)
SELECT_ELEMS, SELECT_WARP_ELEMS = 512, 1024
# Pooling: one warp per program at up to 128x128 tiles (a q block: 128 rows of D = 128), more for
# bigger tiles: 1/2/4 warps at 32768x128 0.0495/0.0511/0.0592 ms (pure-read floor 0.0453), at
# 75600x64 0.058/0.058/0.084 (H200; on the H100 1-4 warps tied)
POOL_TILE_PER_WARP = 128 * 128


@triton.jit
def _pool_block(X, Out, sxb, sxh, sxn, sxd, blk, bh, H, N, nb, D,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[bh, blk] = mean of X's rows blk*BLOCK ... (fp32), head dim padded to BLOCK_D."""
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    ptrs = X + b * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd
    x = tl.load(ptrs, mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    cnt = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
    tl.store(Out + (bh * nb + blk) * BLOCK_D + cols, tl.sum(x, 0) / cnt)


@triton.jit
def _pool_qk_kernel(Q, K, QB, KB, sqb, sqh, sqn, sqd, skb, skh, skn, skd, B, Hq, Hk, Nq, Nk, nq, nk, D,
                    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Both poolings in one launch: programs [0, nq) pool query blocks, [nq, nq + nk) key blocks."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    if blk < nq:
        if bh < B * Hq:
            _pool_block(Q, QB, sqb, sqh, sqn, sqd, blk, bh, Hq, Nq, nq, D, BQ, BLOCK_D)
    else:
        if bh < B * Hk:
            _pool_block(K, KB, skb, skh, skn, skd, blk - nq, bh, Hk, Nk, nk, D, BK, BLOCK_D)


@triton.jit
def _score_kernel(QB, KB, S, scale, Hq, G, nq, nk,
                  TILE: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """S[b, h, i, j] = q̄_i · k̄_j · scale (fp32 accuracy; 3xTF32 on the GPU)."""
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // Hq
    bhk = b * (Hq // G) + (bh % Hq) // G
    ri = ti * TILE + tl.arange(0, TILE)
    cj = tj * TILE + tl.arange(0, TILE)
    dd = tl.arange(0, BLOCK_D)
    qb = tl.load(QB + (bh * nq + ri)[:, None] * BLOCK_D + dd[None, :], mask=(ri < nq)[:, None], other=0.0)
    kb = tl.load(KB + (bhk * nk + cj)[:, None] * BLOCK_D + dd[None, :], mask=(cj < nk)[:, None], other=0.0)
    s = tl.dot(qb, tl.trans(kb), input_precision=PREC) * scale
    tl.store(S + (bh * nq + ri)[:, None] * nk + cj[None, :], s, mask=(ri < nq)[:, None] & (cj < nk)[None, :])


@triton.jit
def _keep_count(c_k, c_p, MODE: tl.constexpr):
    """Blocks a row keeps: max(c_k, c_p) (hybrid, MODE 0), c_k (topk, 1) or c_p (topp, 2); at least 1."""
    if MODE == 0:
        c = tl.maximum(c_k, c_p)
    elif MODE == 1:
        c = c_k
    else:
        c = c_p
    return tl.maximum(c, 1)


@triton.jit
def _row_probabilities(s, vis):
    """Softmax of the visible scores of each row; hidden blocks get p = -1 in ``pv``. Rows with a
    NaN/inf score (NaN/inf in q or k) cannot be ranked: ``unranked`` (they keep every visible
    block, reference.nonfinite_rows, on every path alike)."""
    unranked = tl.sum((vis & ((s != s) | (tl.abs(s) == float("inf")))).to(tl.int32), 1) > 0
    s = tl.where(vis, s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(vis, tl.exp(s - m[:, None]), 0.0)
    p = e / tl.maximum(tl.sum(e, 1), 1e-30)[:, None]
    return p, tl.where(vis, p, -1.0), unranked


@triton.jit
def _keep_pairwise(pv, vis, c_k, n_vis, topp, MODE: tl.constexpr, NK_P2: tl.constexpr):
    """Few key blocks: rank every block against every other one (no sort, no search)."""
    pj = pv[:, :, None]
    pl = pv[:, None, :]
    jj = tl.arange(0, NK_P2)[None, :, None]
    ll = tl.arange(0, NK_P2)[None, None, :]
    beats = (pl > pj) | ((pl == pj) & (ll < jj))  # block l ranks before block j
    rank = tl.sum(beats.to(tl.int32), 2)
    before = tl.sum(tl.where(beats, tl.maximum(pl, 0.0), 0.0), 2)  # mass ranked before j
    c_p = tl.minimum(tl.sum((vis & (before < topp)).to(tl.int32), 1), n_vis)
    c = _keep_count(c_k, c_p, MODE)
    return vis & (rank < c[:, None])


@triton.jit
def _topp_count(p, pbits, vis, n_vis, pmin, pmax, topp):
    """Top-p count by bisection on the bit pattern: v* = the largest value whose blocks at or
    above it hold mass >= topp; ties at v* are taken one by one while the mass before is < topp."""
    lo = pmin
    hi = pmax
    while tl.max(hi - lo, 0) > 0:
        mid = lo + (hi - lo + 1) // 2
        mass = tl.sum(tl.where(pbits >= mid[:, None], p, 0.0), 1)
        ok = mass >= topp
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    vstar = lo.to(tl.float32, bitcast=True)
    gt = pbits > lo[:, None]
    g = tl.sum(tl.where(gt, p, 0.0), 1)  # mass strictly above v*
    a = tl.sum(gt.to(tl.int32), 1)
    n_tie = tl.sum((pbits == lo[:, None]).to(tl.int32), 1)
    need = (topp - g) / tl.maximum(vstar, 1e-30)
    t_int = need.to(tl.int32)
    t_int = t_int + (t_int.to(tl.float32) < need).to(tl.int32)
    t_cnt = tl.where(vstar > 0.0, tl.minimum(t_int, n_tie), n_tie)
    total = tl.sum(tl.where(vis, p, 0.0), 1)
    c_p = tl.where(total < topp, n_vis, a + tl.maximum(t_cnt, 0))
    return tl.where(topp <= 0.0, 0, tl.minimum(c_p, n_vis))


@triton.jit
def _keep_bisect(p, vis, c_k, n_vis, topp, MODE: tl.constexpr):
    """Many key blocks: probabilities are >= 0, so their int32 bit patterns sort like their
    values (hidden blocks -1); both cuts are found by bisection over the row's visible range
    [min, max] of patterns (a few thousand wide on flat rows instead of 2^30), no sort."""
    pbits = tl.where(vis, p.to(tl.int32, bitcast=True), -1)
    pmin = tl.where(n_vis > 0, tl.min(tl.where(vis, pbits, 0x7F800000), 1), 0)
    pmax = tl.maximum(tl.max(pbits, 1), pmin)
    c_p = c_k  # unused in topk mode
    if MODE != 1:
        c_p = _topp_count(p, pbits, vis, n_vis, pmin, pmax, topp)
    c = _keep_count(c_k, c_p, MODE)
    # the c-th largest bit pattern T: the largest T with #{bits >= T} >= c. A cut mid with
    # exactly c blocks at or above it keeps the same blocks as T (no tie straddles it): stop there.
    lo = pmin
    hi = pmax
    while tl.max(hi - lo, 0) > 0:
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.sum((pbits >= mid[:, None]).to(tl.int32), 1)
        ok = cnt >= c
        lo = tl.where(ok, mid, lo)
        hi = tl.where(cnt == c, mid, tl.where(ok, hi, mid - 1))
    above = pbits > lo[:, None]
    n_above = tl.sum(above.to(tl.int32), 1)
    tie = pbits == lo[:, None]
    tie_rank = tl.cumsum(tie.to(tl.int32), 1)
    return (above | (tie & (tie_rank <= (c - n_above)[:, None]))) & vis


@triton.jit
def _causal_diagonal(ri, cj, Nq, Nk, BQ: tl.constexpr, BK: tl.constexpr):
    """Key blocks the causal diagonal crosses, for query blocks ri (always kept)."""
    first_row = ri * BQ
    last_row = tl.minimum(first_row + BQ, Nq) - 1
    first_key = cj * BK
    last_key = tl.minimum(first_key + BK, Nk) - 1
    return (first_key[None, :] <= last_row[:, None]) & (last_key[None, :] >= first_row[:, None])


@triton.jit
def _count(Counter, num, n_vis, row_ok, first):
    """Counter[0] += kept pairs, Counter[1] += visible pairs of these rows; Counter[2] += 1 once."""
    tl.atomic_add(Counter, tl.sum(tl.where(row_ok, num, 0).to(tl.int64), 0))
    tl.atomic_add(Counter + 1, tl.sum(tl.where(row_ok, n_vis, 0).to(tl.int64), 0))
    if first:
        tl.atomic_add(Counter + 2, tl.full([], 1, tl.int64))


@triton.jit
def _select_kernel(S, KvNum, KvIdx, KeyVis, Knobs, topk, topp, Hq, Nq, Nk, nq, nk,
                   BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                   NK_P2: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MODE: tl.constexpr, PAIRWISE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_KNOBS: tl.constexpr, COUNT: tl.constexpr):
    """Knobs (HAS_KNOBS): an int64 device tensor [topk bits, topp bits, counter address] (float32
    bits; :func:`pack_knobs`) read instead of the scalars, so a compiled graph follows set_config
    with no recompile. COUNT: the int64 [kept pairs, visible pairs, calls] tensor at the counter
    address is added to atomically (the report reads it lazily); an address read from memory, so
    the compiler sees no mutated input to copy."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if HAS_KNOBS:
        topk = tl.load(Knobs).to(tl.int32).to(tl.float32, bitcast=True)
        topp = tl.load(Knobs + 1).to(tl.int32).to(tl.float32, bitcast=True)
    ri = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # query-block indices of this tile
    cj = tl.arange(0, NK_P2)  # key-block indices
    vis = (cj < nk)[None, :] & (ri < nq)[:, None]
    s = tl.load(S + (bh * nq + ri)[:, None] * nk + cj[None, :], mask=vis, other=0.0)
    if IS_CAUSAL:
        last_row = tl.minimum((ri + 1) * BQ, Nq) - 1
        vis = vis & ((cj * BK)[None, :] <= last_row[:, None])
    if HAS_KEEP:   # key blocks of padding alone (KeyVis (B, nk) == 0) are hidden
        kv = tl.load(KeyVis + (bh // Hq) * nk + cj, mask=cj < nk, other=0)
        vis = vis & (kv != 0)[None, :]
    p, pv, unranked = _row_probabilities(s, vis)
    n_vis = tl.sum(vis.to(tl.int32), 1)
    xk = topk * n_vis.to(tl.float32)
    c_k = xk.to(tl.int32)
    c_k = c_k + (c_k.to(tl.float32) < xk).to(tl.int32)  # ceil
    if PAIRWISE:
        keep = _keep_pairwise(pv, vis, c_k, n_vis, topp, MODE, NK_P2)
    else:
        keep = _keep_bisect(p, vis, c_k, n_vis, topp, MODE)
    if IS_CAUSAL:
        keep = keep | (_causal_diagonal(ri, cj, Nq, Nk, BQ, BK) & vis)
    keep = keep | (vis & unranked[:, None])
    # kept blocks first (ascending), then the dropped ones (ascending)
    keep_i = keep.to(tl.int32)
    kept_cum = tl.cumsum(keep_i, 1)
    num = tl.sum(keep_i, 1)
    out_pos = tl.where(keep, kept_cum - 1, num[:, None] + cj[None, :] - kept_cum)
    row_ok = ri < nq
    tl.store(KvNum + bh * nq + ri, num, mask=row_ok)
    if COUNT:
        counter = tl.load(Knobs + 2).to(tl.pointer_type(tl.int64))
        _count(counter, num, n_vis, row_ok, (pid == 0) & (bh == 0))
    tl.store(KvIdx + (bh * nq + ri)[:, None] * nk + out_pos,
             tl.zeros([BLOCK_M, NK_P2], tl.int32) + cj[None, :],
             mask=row_ok[:, None] & (cj < nk)[None, :])


def pool_qk_triton(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int):
    """Block means of q and of k, (B, H, nb, BLOCK_D) fp32 with the head dim zero-padded to its
    tile (:func:`.tuning.head_dim_tile`), in one launch."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    BLOCK_D = head_dim_tile(D)
    qb = torch.empty((B, Hq, nq, BLOCK_D), dtype=torch.float32, device=q.device)
    kb = torch.empty((B, Hk, nk, BLOCK_D), dtype=torch.float32, device=q.device)
    run(_pool_qk_kernel, (nq + nk, B * max(Hq, Hk)),
        q, k, qb, kb, *q.stride(), *k.stride(), B, Hq, Hk, Nq, Nk, nq, nk, D,
        BQ=block_q, BK=block_k, BLOCK_D=BLOCK_D, num_warps=_pool_warps(max(block_q, block_k) * BLOCK_D))
    return qb, kb


def _pool_warps(tile: int) -> int:
    """Warps for pooling a tile of ``tile`` elements: one per POOL_TILE_PER_WARP, a power of 2, 1-8."""
    return min(8, triton.next_power_of_2(max(1, tile // POOL_TILE_PER_WARP)))


def block_scores_triton(qb: torch.Tensor, kb: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hq, nq, nk) fp32 block scores from pooled q (B, Hq, nq, T) and k (B, Hkv, nk, T), one launch."""
    B, Hq, nq, _ = qb.shape
    Hkv, nk = kb.shape[1], kb.shape[2]
    interp = not qb.is_cuda
    scores = torch.empty((B, Hq, nq, nk), dtype=torch.float32, device=qb.device)
    TILE = 64 if not interp else max(16, min(64, triton.next_power_of_2(max(nq, nk))))
    run(_score_kernel, (cdiv(nq, TILE), cdiv(nk, TILE), B * Hq),
        qb, kb, scores, float(scale), Hq, Hq // Hkv, nq, nk, TILE=TILE, BLOCK_D=qb.shape[-1],
        PREC="ieee" if interp else "tf32x3", num_warps=4)  # 3xTF32: fp32-accurate, on tensor cores
    return scores


def predict_mask_triton(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep=None, *,
                        pooled=None, knobs=None, count=False):
    """Three launches: pool q and k, block scores, selection. Returns (kv_num_blocks, kv_indices).
    kv_keep: None or a (B, Nk) bool key-padding mask (key blocks of padding alone are hidden).
    pooled: None, or (qb, kb) already pooled (:func:`pool_qk_triton`'s layout): the pooling
    launch is skipped. knobs, count: see :func:`select_triton`."""
    Nq, Nk = q.shape[2], k.shape[2]
    qb, kb = pool_qk_triton(q, k, block_q, block_k) if pooled is None else pooled
    scores = block_scores_triton(qb, kb, scale)
    key_vis = None if kv_keep is None else key_blocks_visible(kv_keep, block_k).to(torch.int8)
    return select_triton(scores, Nq, Nk, is_causal, topk, topp, mode, block_q, block_k, key_vis=key_vis,
                         knobs=knobs, count=count)


def pack_knobs(topk: float, topp: float, counter: torch.Tensor | None, out: torch.Tensor | None = None):
    """[topk, topp] as float32 bits and the counter's address, in an int64 tensor (``out`` in place)."""
    bits = torch.tensor([topk, topp], dtype=torch.float32).view(torch.int32).tolist()
    vals = torch.tensor(bits + [0 if counter is None else counter.data_ptr()], dtype=torch.int64)
    if out is None:
        return vals
    return out.copy_(vals)


def select_triton(scores, Nq, Nk, is_causal, topk, topp, mode, block_q, block_k, block_m=None,
                  num_warps=None, key_vis=None, knobs=None, count=False):
    """Hybrid selection on (B, H, nq, nk) block scores: (kv_num_blocks, kv_indices). Tuning knobs (the
    kernel-tuning benchmark sets them): block_m query blocks per program, num_warps.
    knobs: None, or an int64 device tensor from :func:`pack_knobs` (topk, topp and the address of
    a counter; the caller keeps the counter alive); count: the kernel adds to that counter."""
    B, Hq, nq, nk = scores.shape
    NK_P2 = max(16, triton.next_power_of_2(nk))
    interp = not scores.is_cuda
    pairwise = NK_P2 <= (64 if interp else 32) and not _FORCE_BISECTION
    if interp:  # few programs: the interpreter's cost is per operation, not per element
        BLOCK_M = max(16, min(triton.next_power_of_2(nq), 64 if pairwise else 256))
    else:
        BLOCK_M = 4 if pairwise else max(1, min(64, SELECT_ELEMS // NK_P2))
    if block_m is not None:
        BLOCK_M = block_m
    num = torch.empty((B, Hq, nq), dtype=torch.int32, device=scores.device)
    idx = torch.empty((B, Hq, nq, nk), dtype=torch.int32, device=scores.device)
    run(_select_kernel, (cdiv(nq, BLOCK_M), B * Hq),
        scores, num, idx, num if key_vis is None else key_vis.contiguous(), num if knobs is None else knobs,
        float(topk), float(topp),
        Hq, Nq, Nk, nq, nk, BQ=block_q, BK=block_k, BLOCK_M=BLOCK_M, NK_P2=NK_P2,
        IS_CAUSAL=bool(is_causal), MODE=MODE_IDS[mode], PAIRWISE=pairwise, HAS_KEEP=key_vis is not None,
        HAS_KNOBS=knobs is not None, COUNT=knobs is not None and bool(count),
        num_warps=num_warps or (4 if pairwise or interp else max(1, NK_P2 // SELECT_WARP_ELEMS)))
    return num, idx
