"""Chunked PyTorch implementation of the same functions the Triton kernels compute.

Used for CPU tensors when Triton's interpreter is not enabled, so a CPU user gets the
right answer at PyTorch speed and never a crash. Computes in float32 (float64 stays float64),
one chunk of query blocks at a time, so memory stays O(chunk · Nk) per head.
"""
from __future__ import annotations

import torch

from .. import reference as R
from .layout import attention_out

_CHUNK_TOKENS = 2048


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dense_to_indices(dense: torch.Tensor):
    """(B, H, nq, nk) bool -> kv_num_blocks (B, H, nq) int32, kv_indices (B, H, nq, nk) int32.

    Kept block indices come first in ascending order, then the dropped ones ascending. No sort:
    a kept block j goes to slot (kept up to j) - 1, a dropped one to num + j - (kept up to j).
    """
    dense = dense.contiguous()
    n = dense.shape[-1]
    kept_upto = dense.cumsum(-1, dtype=torch.int32)
    num = kept_upto[..., -1].contiguous() if n else dense.sum(-1, dtype=torch.int32)
    cols = torch.arange(n, device=dense.device, dtype=torch.int32)
    slot = torch.where(dense, kept_upto - 1, num[..., None] + cols - kept_upto)
    idx = torch.empty_like(kept_upto)
    idx.scatter_(-1, slot.long(), cols.expand_as(idx))
    return num, idx


def indices_to_dense(num: torch.Tensor, idx: torch.Tensor, nk: int) -> torch.Tensor:
    """Inverse of :func:`dense_to_indices`; only the first num entries of each row count (the
    rest may hold anything, as in a FlexAttention BlockMask)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].to(torch.int64)
    # entries past num go to a spare column nk, so they can never clear a kept block
    target = torch.where(valid, idx.to(torch.int64).clamp(0, nk - 1), nk)
    dense = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, target, True)
    return dense[..., :nk]


def transpose_indices(num: torch.Tensor, idx: torch.Tensor, nk: int):
    """kv index (B, H, nq, ·) -> q index: q_num (B, H, nk), q_idx (B, H, nk, nq)."""
    dense = indices_to_dense(num, idx, nk)
    return dense_to_indices(dense.transpose(-2, -1))


def predict_mask(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep=None, theta=None):
    acc = _acc_dtype(q)
    dense = R.reference_block_mask(q.to(acc), k.to(acc), scale, is_causal, topk, topp, mode,
                                   block_q, block_k, kv_keep, theta)
    return dense_to_indices(dense)


def _chunks(nq_tok: int, block_q: int):
    step = max(block_q, (_CHUNK_TOKENS // block_q) * block_q)
    for s in range(0, nq_tok, step):
        yield s, min(s + step, nq_tok)


def _chunk_scores(q, k, dense, s, e, scale, is_causal, block_q, block_k, kv_keep=None):
    """fp32 scores of query rows s:e against all keys, -inf outside the kept blocks (and on
    the keys the padding mask kv_keep (B, Nk) hides)."""
    nk_tok = k.shape[2]
    m = dense[:, :, s // block_q: R.cdiv(e, block_q)]
    m = m.repeat_interleave(block_q, dim=-2)[:, :, : e - s]
    m = m.repeat_interleave(block_k, dim=-1)[..., :nk_tok]
    if is_causal:
        rows = torch.arange(s, e, device=q.device)[:, None]
        m = m & (torch.arange(nk_tok, device=q.device)[None, :] <= rows)
    if kv_keep is not None:
        m = m & kv_keep[:, None, None, :]
    sc = (q[:, :, s:e] @ k.transpose(-2, -1)) * scale
    return sc.masked_fill(~m, float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows that see no key) replaced by 0, so exp(-inf - lse) = 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _expand_kv(x, G):
    return x if G == 1 else x.repeat_interleave(G, dim=1)


def attention_fwd(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep=None,
                  pv_threshold=None):
    """pv_threshold: SpargeAttn's P·V filter (:func:`sparge_compile.reference.pv_filter_blocks`),
    applied per chunk of whole query blocks."""
    acc = _acc_dtype(q)
    G = q.shape[1] // k.shape[1]
    qf, kf, vf = q.to(acc), _expand_kv(k.to(acc), G), _expand_kv(v.to(acc), G)
    dense = indices_to_dense(kv_num_blocks, kv_indices, R.cdiv(k.shape[2], block_k))
    out = attention_out(q, v.shape[-1])
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for s, e in _chunks(q.shape[2], block_q):
        sc = _chunk_scores(qf, kf, dense, s, e, scale, is_causal, block_q, block_k, kv_keep)
        if pv_threshold is not None:
            i0, i1 = s // block_q, R.cdiv(e, block_q)
            live = R.pv_filter_blocks(sc, kv_num_blocks[:, :, i0:i1], kv_indices[:, :, i0:i1], block_q,
                                      block_k, pv_threshold)
            live = R.dense_token_mask(live, e - s, k.shape[2], block_q, block_k, False)
            sc = sc.masked_fill(~live, float("-inf"))
        l = torch.logsumexp(sc, dim=-1)
        # a row that sees no key (a mask predicted without is_causal, used with it) gives 0 and
        # lse -inf, as in the Triton kernel, not NaN
        out[:, :, s:e] = (torch.exp(sc - _finite(l)[..., None]) @ vf).to(q.dtype)
        lse[:, :, s:e] = l.to(torch.float32)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                  kv_keep=None):
    acc = _acc_dtype(q)
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf, kf, vf = q.to(acc), _expand_kv(k.to(acc), G), _expand_kv(v.to(acc), G)
    do, of = dout.to(acc), out.to(acc)
    dense = indices_to_dense(kv_num_blocks, kv_indices, R.cdiv(k.shape[2], block_k))
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for s, e in _chunks(q.shape[2], block_q):
        sc = _chunk_scores(qf, kf, dense, s, e, scale, is_causal, block_q, block_k, kv_keep)
        p = torch.exp(sc - _finite(lse[:, :, s:e, None].to(acc)))
        dv += p.transpose(-2, -1) @ do[:, :, s:e]
        dp = do[:, :, s:e] @ vf.transpose(-2, -1)
        delta = (do[:, :, s:e] * of[:, :, s:e]).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, :, s:e] = ds @ kf * scale
        dk += ds.transpose(-2, -1) @ qf[:, :, s:e] * scale
    if G > 1:
        dk = dk.reshape(B, Hkv, G, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, Hkv, G, *dv.shape[2:]).sum(2)
    # contiguous whatever q/k/v's strides (the ops' fake kernels promise it)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous())
