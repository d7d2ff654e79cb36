"""The block mask for a shard of query rows against the full key set, from pooled blocks.

Each rank pools its own key shard (one mean per key block) and all-gathers the pooled keys, which
are tiny (N / block_k vectors); the hybrid rule of :func:`sparge_compile.reference.reference_block_mask`
then runs on this rank's pooled queries against every pooled key, with the rows' global offset
(the causal rule needs it). :func:`shard_slices` cuts the mask into one mask per key shard, its
key blocks renumbered from 0, for ring attention.
"""
from __future__ import annotations

import torch

from .. import reference as R
from ..kernels.torch_impl import dense_to_indices, indices_to_dense


def _rows(t: torch.Tensor, first_block: int, n: int) -> torch.Tensor:
    return t[first_block: first_block + n]


def mask_from_pooled(qbar: torch.Tensor, kbar: torch.Tensor, scale: float, is_causal: bool, cfg,
                     q_start: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Dense bool (B, Hq, nq_local, nk) mask of query rows q_start .. q_start + q_len - 1.

    qbar: (B, Hq, nq_local, D) pooled local queries; kbar: (B, Hkv, nk, D) pooled keys of the
    whole sequence (kv_len tokens). q_start is a multiple of cfg.block_q. Same rule and tie
    breaking as the reference: keep the c = max(c_k, c_p, 1) best visible blocks, the causal
    diagonal, and every visible block of a row whose pooled scores are not finite.
    """
    bq, bk = cfg.block_q, cfg.block_k
    acc = torch.float64 if qbar.dtype == torch.float64 else torch.float32
    qbar, kbar = qbar.to(acc), kbar.to(acc).repeat_interleave(qbar.shape[1] // kbar.shape[1], dim=1)
    first, nq = q_start // bq, qbar.shape[2]
    vis = _rows(R.visible_blocks(q_start + q_len, kv_len, bq, bk, is_causal, qbar.device), first, nq)
    diag = _rows(R.diagonal_blocks(q_start + q_len, kv_len, bq, bk, is_causal, qbar.device), first, nq)
    s = (qbar @ kbar.transpose(-2, -1) * scale).masked_fill(~vis, float("-inf"))
    nonfinite = (~torch.isfinite(s) & vis).any(-1)
    p = torch.softmax(s, dim=-1).masked_fill(~vis, -1.0)
    _, _, c = R.keep_counts(p, vis.sum(-1).expand(p.shape[:-1]), cfg.topk, cfg.topp, cfg.mode)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(p.shape[-1], device=p.device).expand_as(order))
    return ((rank < c[..., None]) & vis) | diag | (nonfinite[..., None] & vis)


def shard_slices(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, nk: int, shards: int) -> list:
    """Cut a (B, H, nq, nk) index mask into ``shards`` equal key ranges: [(kv_num_blocks, kv_indices), ...],
    each with the key blocks of its range renumbered 0 .. nk / shards - 1."""
    dense = indices_to_dense(kv_num_blocks, kv_indices, nk)
    per = nk // shards
    return [dense_to_indices(dense[..., j * per: (j + 1) * per]) for j in range(shards)]
