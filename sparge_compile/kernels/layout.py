"""The attention output's memory layout: the query's, as SDPA does.

Diffusers' processors (and most transformer code) build q as a (B, N, H, D) tensor and hand
attention its (B, H, N, D) transpose, then transpose the output back and flatten the heads. When
the output is allocated (B, N, H, D)-major too, that transpose-and-flatten is a view; with a
contiguous (B, H, N, D) output it is a full copy of the output per call (Wan2.1-1.3B on the
H200: `triton_poi_fused_clone_permute`, 1.4 ms of a 206 ms step, 2026-12-02). Every forward
implementation and its fake allocate through here, so their strides agree under Inductor.
"""
from __future__ import annotations

import torch


def heads_inner(q: torch.Tensor) -> bool:
    """q (B, H, N, D) is laid out (B, N, H, D)-major: a transpose of a token-major tensor."""
    _, H, N, _ = q.shape
    return bool(H > 1 and N > 1 and q.stride(1) < q.stride(2))


def attention_out(q: torch.Tensor, dv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (B, H, N, dv) output in q's layout (see the module docstring)."""
    B, H, N, _ = q.shape
    dtype = q.dtype if dtype is None else dtype
    if heads_inner(q):
        return torch.empty((B, N, H, dv), dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, H, N, dv), dtype=dtype, device=q.device)
