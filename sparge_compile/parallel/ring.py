"""Ring attention with a block-sparse mask: each rank keeps its query shard; the key/value shards
travel around the ring; each step is the sparse op of the local queries against the visiting
shard, with the mask sliced to that shard's key blocks, merged through the returned log-sum-exp.

Backward (the ring trick): every step calls the backward op with the *global* out and lse, so
P = exp(s - lse) is the exact softmax of the whole row; dq accumulates locally, and dk/dv
accumulators travel with the key shards and arrive back at their owner after a full turn.
With is_causal the shards' global offsets decide: a key shard after the query shard is skipped,
the rank's own shard is causal inside, earlier shards are fully visible (their mask slice already
keeps only the blocks the causal rule allows).
"""
from __future__ import annotations

import torch

from .. import ops
from .. import reference as R
from ..attention import _config
from ..block_mask import SpargeBlockMask
from ..kernels.torch_impl import dense_to_indices
from ..validate import _mask_values_ok, check_flag, check_qkv
from .comm import all_gather_cat, group_rank_size, ring_shift, wait_all
from .mask import mask_from_pooled, shard_slices


def _step_kind(rank: int, j: int, is_causal: bool):
    """None: skip the shard; else the is_causal flag of the step (queries of `rank`, keys of `j`)."""
    if not is_causal:
        return False
    if j > rank:
        return None
    return j == rank


def merge_lse(out, lse, out_j, lse_j):
    """Merge two partial attentions of the same rows: (out, lse) of the union of their keys.

    Rows that saw no key in a part carry lse -inf and out 0; a row that saw none in both stays
    (0, -inf). out is float32 (float64 for float64 inputs), lse float32/float64.
    """
    new = torch.logaddexp(lse, lse_j)
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w, w_j = torch.exp(lse - ref)[..., None], torch.exp(lse_j - ref)[..., None]
    return out * w + out_j.to(out.dtype) * w_j, new


def _ring_forward(q, k, v, slices, args, group):
    scale, is_causal, bq, bk = args
    rank, P = group_rank_size(group)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    for s in range(P):
        j = (rank - s) % P
        handle = ring_shift([k, v], group) if s < P - 1 else None
        causal = _step_kind(rank, j, is_causal)
        if causal is not None and slices[j] is not None:
            o_j, l_j = ops.block_sparse_attention_op(q, k, v, *slices[j], scale, causal, bq, bk)
            out, lse = merge_lse(out, lse, o_j, l_j.to(acc))
        if handle is not None:
            wait_all(handle[1])
            k, v = handle[0]
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, slices, args, group):
    scale, is_causal, bq, bk = args
    rank, P = group_rank_size(group)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse32, moving = lse.to(torch.float32), None   # moving: the dk/dv accumulators in flight
    for s in range(P):
        j = (rank - s) % P
        handle = ring_shift([k, v], group) if s < P - 1 else None
        causal = _step_kind(rank, j, is_causal)
        g = None
        if causal is not None and slices[j] is not None:
            g = ops.block_sparse_attention_backward_op(dout, q, k, v, out, lse32, *slices[j], scale, causal,
                                                      bq, bk)
            dq += g[0]
        # shard j's accumulators, sent by the previous rank during this step's compute
        if moving is None:
            dk, dv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc,
                                                                                   device=v.device)
        else:
            wait_all(moving[1])
            dk, dv = moving[0]
        if g is not None:
            dk += g[1]
            dv += g[2]
        moving = ring_shift([dk, dv], group)   # on to the next rank, overlapping its next step
        if handle is not None:
            wait_all(handle[1])
            k, v = handle[0]
    wait_all(moving[1])   # after P shifts each rank holds its own shard's dk, dv
    dk, dv = moving[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, group):
        P = group_rank_size(group)[1]
        slices = shard_slices(kv_num_blocks, kv_indices, kv_indices.shape[-1], P)
        kept = torch.stack([n.sum() for n, _ in slices]).tolist()   # one host sync per call
        slices = [sl if c > 0 else None for sl, c in zip(slices, kept)]   # None: no kept block, skip
        args = (scale, is_causal, block_q, block_k)
        out, lse = _ring_forward(q, k, v, slices, args, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.slices, ctx.args, ctx.group = slices, args, group
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.slices, ctx.args, ctx.group)
        return dq, dk, dv, None, None, None, None, None, None, None


def ring_sparse_attention(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, group=None):
    """The ring with a given mask of the local query rows against the whole key set:
    kv_num_blocks (B, H, nq_local), kv_indices (B, H, nq_local, nk_total). Returns (out, lse) of the
    local rows."""
    return _RingAttention.apply(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, group)


def _check_ring_shards(q, k, block_q: int, block_k: int, is_causal: bool) -> None:
    if k.shape[2] % block_k:
        raise ValueError(f"the key shard length ({k.shape[2]}, k.shape[2]) must be a multiple of "
                         f"block_k ({block_k}): the mask is sliced at shard boundaries")
    if is_causal and (q.shape[2] != k.shape[2] or q.shape[2] % block_q):
        raise ValueError(f"with is_causal the query and key shards must have the same length, a multiple of "
                         f"block_q ({block_q}); got q {q.shape[2]}, k {k.shape[2]} tokens")


def predict_ring_mask(q, k, scale, is_causal, cfg, group=None) -> SpargeBlockMask:
    """The mask of this rank's query rows against the whole key sequence, from pooled keys
    all-gathered over ``group`` (rank r holds query and key shard r, in sequence order)."""
    rank, P = group_rank_size(group)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kbar = all_gather_cat(R.pool_blocks(k.detach().to(acc), cfg.block_k), 2, group)
    qbar = R.pool_blocks(q.detach().to(acc), cfg.block_q)
    kv_len = P * k.shape[2]
    dense = mask_from_pooled(qbar, kbar, scale, is_causal, cfg, rank * q.shape[2], q.shape[2], kv_len)
    return SpargeBlockMask(*dense_to_indices(dense), q.shape[2], kv_len, cfg.block_q, cfg.block_k, is_causal)


def _check_given_mask(block_mask, q, k, P: int) -> None:
    if not isinstance(block_mask, SpargeBlockMask):
        raise TypeError(f"block_mask must be a SpargeBlockMask, got {type(block_mask).__name__}")
    bq, bk = block_mask.block_q, block_mask.block_k
    want = (q.shape[0], q.shape[1], R.cdiv(q.shape[2], bq), R.cdiv(P * k.shape[2], bk))
    if tuple(block_mask.shape) != want or block_mask.kv_len != P * k.shape[2]:
        raise ValueError(f"block_mask has shape {tuple(block_mask.shape)} over {block_mask.kv_len} keys; "
                         f"this rank's query rows against the whole key sequence ({P * k.shape[2]} keys) "
                         f"need {want}")
    _mask_values_ok(block_mask.kv_num_blocks, block_mask.kv_indices)


def ring_attention(q, k, v, scale=None, is_causal: bool = False, config=None, group=None,
                   block_mask: SpargeBlockMask | None = None, return_mask: bool = False):
    """Sequence-parallel block-sparse attention over the ranks of ``group`` (None: all ranks).

    q: (B, Hq, Nq/P, D), k, v: (B, Hkv, Nk/P, D): rank r holds the r-th shard of the sequence.
    The key shard length must be a multiple of config.block_k (with is_causal: query and key
    shards of one length, a multiple of block_q). The mask is predicted on the whole key set
    (pooled keys all-gathered) unless ``block_mask`` (local rows x all key blocks) is given.
    Returns this rank's (B, Hq, Nq/P, D) output rows (and the mask with ``return_mask``).
    Differentiable in q, k and v.
    """
    cfg = _config(config)
    check_flag("is_causal", is_causal)
    check_flag("return_mask", return_mask)
    scale = check_qkv(q, k, v, scale)
    P = group_rank_size(group)[1]
    if block_mask is not None:
        _check_given_mask(block_mask, q, k, P)
    bq, bk = (cfg.block_q, cfg.block_k) if block_mask is None else (block_mask.block_q, block_mask.block_k)
    _check_ring_shards(q, k, bq, bk, is_causal)
    mask = predict_ring_mask(q, k, scale, is_causal, cfg, group) if block_mask is None else block_mask
    out, _ = ring_sparse_attention(q, k, v, mask.kv_num_blocks, mask.kv_indices, scale, is_causal, bq, bk,
                                   group)
    return (out, mask) if return_mask else out
