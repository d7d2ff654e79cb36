"""Context parallelism for block-sparse attention on torch.distributed (NCCL on GPUs, gloo on the CPU).

* :func:`ulysses_attention`  all-to-all to head shards, the sparse op per head, all-to-all back
* :func:`ring_attention`     key/value shards around a ring, the mask sliced per shard, lse merge
* :func:`usp_attention`      both: Ulysses inside groups, ring between them (:func:`usp_groups`)

Inputs are sequence shards (B, H, N/P, D), rank r holding the r-th; outputs likewise.
"""
from .ring import merge_lse, predict_ring_mask, ring_attention, ring_sparse_attention
from .ulysses import balanced_head_order, kept_blocks_per_head, ulysses_attention
from .usp import usp_attention, usp_groups

__all__ = ["balanced_head_order", "kept_blocks_per_head", "merge_lse", "predict_ring_mask", "ring_attention",
           "ring_sparse_attention", "ulysses_attention", "usp_attention", "usp_groups"]
