"""Ulysses: all-to-all from sequence shards to head shards, the sparse op per head unchanged on
the whole sequence, all-to-all back. Work per rank is the kept blocks of its heads: heads differ
in sparsity, so :func:`balanced_head_order` assigns heads to ranks by their kept blocks
(measured on an earlier call's mask, see :func:`kept_blocks_per_head`), and ``head_order`` applies it.
"""
from __future__ import annotations

import torch

from .. import ops
from ..attention import _config, predict_block_mask
from ..block_mask import SpargeBlockMask
from ..validate import check_block_mask, check_flag, check_qkv
from .comm import all_gather_cat, group_rank_size, heads_to_seq, seq_to_heads


def _q_order(head_order, Hq: int, Hkv: int, device) -> torch.Tensor:
    """The q-head permutation of a kv-head order: each kv head's G query heads follow it."""
    order = torch.as_tensor(head_order, dtype=torch.int64, device=device)
    if sorted(order.tolist()) != list(range(Hkv)):
        raise ValueError(f"head_order must be a permutation of the {Hkv} key/value heads, "
                         f"got {order.tolist()}")
    G = Hq // Hkv
    return (order[:, None] * G + torch.arange(G, device=device)).reshape(-1)


def _check_heads(q, k, P: int) -> None:
    if q.shape[1] % P or k.shape[1] % P:
        raise ValueError(f"Ulysses splits heads over {P} ranks: q heads ({q.shape[1]}) and k/v heads "
                         f"({k.shape[1]}) must be multiples of the group size")


def ulysses_attention(q, k, v, scale=None, is_causal: bool = False, config=None, group=None,
                      block_mask: SpargeBlockMask | None = None, return_mask: bool = False, head_order=None):
    """Head-parallel block-sparse attention over the ranks of ``group`` (None: all ranks).

    q: (B, Hq, N/P, D), k, v: (B, Hkv, N/P, D), rank r holding the r-th sequence shard; Hq and
    Hkv multiples of P. After the all-to-all each rank attends H/P heads over the whole sequence,
    with the mask predicted there (or ``block_mask``, this rank's heads over the whole
    sequence). head_order: a permutation of the kv heads; rank r takes the r-th H/P of them in
    that order (see :func:`balanced_head_order`). Returns (B, Hq, N/P, D) (and this rank's mask).
    """
    cfg = _config(config)
    check_flag("is_causal", is_causal)
    check_flag("return_mask", return_mask)
    scale = check_qkv(q, k, v, scale)
    _check_heads(q, k, group_rank_size(group)[1])
    if head_order is not None:
        qo = _q_order(head_order, q.shape[1], k.shape[1], q.device)
        ko = torch.as_tensor(head_order, dtype=torch.int64, device=q.device)
        q, k, v = q[:, qo], k[:, ko], v[:, ko]
    qh, kh, vh = (seq_to_heads(t, group) for t in (q, k, v))
    if block_mask is not None:
        check_block_mask(block_mask, qh, kh)   # this rank's heads over the whole sequence
    mask = predict_block_mask(qh.detach(), kh.detach(), scale, is_causal,
                              cfg) if block_mask is None else block_mask
    out, _ = ops.block_sparse_attention_op(qh, kh, vh, mask.kv_num_blocks, mask.kv_indices, scale, is_causal,
                                           mask.block_q, mask.block_k)
    out = heads_to_seq(out, group)
    if head_order is not None:
        out = out[:, torch.argsort(qo)]
    return (out, mask) if return_mask else out


def kept_blocks_per_head(mask: SpargeBlockMask, group=None, head_order=None) -> torch.Tensor:
    """(Hq,) int64: kept block pairs of every query head (summed over the batch), in the model's
    head order, from each rank's Ulysses mask (collective over ``group``)."""
    local = mask.kv_num_blocks.to(torch.int64).sum(dim=(0, 2))
    loads = all_gather_cat(local, 0, group)
    if head_order is None:
        return loads
    Hq = loads.shape[0]
    qo = _q_order(head_order, Hq, len(head_order), loads.device)
    return loads[torch.argsort(qo)]


def balanced_head_order(loads, world_size: int, kv_heads: int | None = None) -> list[int]:
    """A kv-head order for ``ulysses_attention(head_order=...)`` that evens out the kept blocks per
    rank: longest-processing-time first, each rank taking exactly kv_heads / world_size kv heads.

    loads: (Hq,) kept blocks per query head (:func:`kept_blocks_per_head`); kv_heads: default Hq.
    """
    loads = torch.as_tensor(loads, dtype=torch.int64)
    Hkv = loads.shape[0] if kv_heads is None else kv_heads
    if Hkv % world_size or loads.shape[0] % Hkv:
        raise ValueError(f"kv_heads ({Hkv}) must divide the {loads.shape[0]} query heads and be a "
                         "multiple of "
                         f"world_size ({world_size})")
    unit = loads.reshape(Hkv, -1).sum(1).tolist()
    per = Hkv // world_size
    ranks = [[] for _ in range(world_size)]
    total = [0] * world_size
    for h in sorted(range(Hkv), key=lambda h: (-unit[h], h)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per), key=lambda r: (total[r], r))
        ranks[r].append(h)
        total[r] += unit[h]
    return [h for r in ranks for h in sorted(r)]
