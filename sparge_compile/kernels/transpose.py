"""The transposed block index for the backward pass, in two Triton launches (no sort).

kv index (B, H, nq, ·) -> q index: q_num (B, H, nk), q_idx (B, H, nk, nq), in the same format:
for each key block, the query blocks that kept it in ascending order, then the others.
1. scatter: each query-block row marks its kept key blocks in a zeroed (B, H, nk, nq) byte map;
2. compact: each key-block row turns its byte map into slots with a prefix sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import run


@triton.jit
def _scatter_kernel(KvNum, KvIdx, DenseT, nq, nk, NK_P2: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh * nq + i
    n = tl.load(KvNum + row)
    t = tl.arange(0, NK_P2)
    j = tl.load(KvIdx + row * nk + t, mask=t < n, other=0)
    j = tl.minimum(tl.maximum(j, 0), nk - 1)
    ones = tl.full([NK_P2], 1, tl.int8)
    tl.store(DenseT + (bh * nk + j) * nq + i, ones, mask=t < n)


@triton.jit
def _compact_kernel(DenseT, QNum, QIdx, nq, nk, NQ_P2: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    col = bh * nk + j
    r = tl.arange(0, NQ_P2)
    d = tl.load(DenseT + col * nq + r, mask=r < nq, other=0).to(tl.int32)
    kept_upto = tl.cumsum(d, 0)
    num = tl.sum(d, 0)
    slot = tl.where(d > 0, kept_upto - 1, num + r - kept_upto)
    tl.store(QIdx + col * nq + slot, r, mask=r < nq)
    tl.store(QNum + col, num)


def transpose_indices_triton(num: torch.Tensor, idx: torch.Tensor, nk: int):
    """kv_num_blocks (B, H, nq), kv_indices (B, H, nq, ≥nk) int32 -> q_num (B, H, nk),
    q_idx (B, H, nk, nq)."""
    B, H, nq = num.shape
    num, idx = num.contiguous(), idx.contiguous()
    if idx.shape[-1] != nk:
        raise ValueError(f"kv_indices has {idx.shape[-1]} columns, expected nk={nk}")
    dense_t = torch.zeros((B, H, nk, nq), dtype=torch.int8, device=num.device)
    q_num = torch.empty((B, H, nk), dtype=torch.int32, device=num.device)
    q_idx = torch.empty((B, H, nk, nq), dtype=torch.int32, device=num.device)
    run(_scatter_kernel, (nq, B * H), num, idx, dense_t, nq, nk,
        NK_P2=triton.next_power_of_2(nk), num_warps=4)
    run(_compact_kernel, (nk, B * H), dense_t, q_num, q_idx, nq, nk,
        NQ_P2=triton.next_power_of_2(nq), num_warps=4)
    return q_num, q_idx


__all__ = ["transpose_indices_triton"]
