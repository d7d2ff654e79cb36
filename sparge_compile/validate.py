"""Input checks for the public functions: clear errors naming the argument, before any kernel."""
from __future__ import annotations

import math

import torch

from .config import HEAD_DIMS

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, scale=None) -> float:
    """Validate SDPA-layout inputs; return the softmax scale to use."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES and t.dtype != torch.float64:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    for name, t in named[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all must match")
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {B}")
    if k.shape[-1] != D:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has {D}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({k.shape[1]}) (Hq % Hkv == 0)")
    if v is not None:
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v shape {tuple(v.shape)} must match k shape {tuple(k.shape)} in (B, H, N)")
        if v.shape[-1] != D:
            raise ValueError(f"v head dim {v.shape[-1]} must equal q/k head dim {D}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} (last axis of q) is not supported; supported: {HEAD_DIMS}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"sequence lengths must be positive, got Nq={q.shape[2]}, Nk={k.shape[2]}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)
