"""The linear branch's feature map φ inside Triton kernels (kernels/linear.py,
linear_recompute.py, linear_all.py), and SLA's all-keys term on a tile of query rows.

φ: "softmax" (a softmax over the head dim) or "elu" (elu + 1), as
:func:`sparge_compile.linear_branch.feature_map` defines them.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _phi(x, col_ok, SOFTMAX: tl.constexpr):
    """φ of fp32 rows x (R, BLOCK_D); columns past D (col_ok false) give 0."""
    if SOFTMAX:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        e = tl.math.exp(x - tl.max(x, 1)[:, None])
        return e * (1.0 / tl.sum(e, 1))[:, None]   # one division per row, not per entry
    y = tl.where(x > 0, x + 1.0, tl.math.exp(x))
    return tl.where(col_ok[None, :], y, 0.0)


@triton.jit
def add_linear_all(o, q, S2, Z, Bias, eps, hkv, offs_d, d_ok, offs_v, v_ok, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """o (R, BLOCK_DV) fp32 + proj(O_lin) of the query rows q (R, BLOCK_D), O_lin their linear
    attention over all keys: o + (φ(q) / (φ(q)·z + eps)) (S Wᵀ) + b, with S2 = S Wᵀ (B*Hkv,
    BLOCK_D, BLOCK_DV) in q's dtype and z (B*Hkv, BLOCK_D) fp32 for key head hkv (see
    kernels/linear_all.py). The product accumulates into o (no second accumulator)."""
    p = _phi(q.to(tl.float32), d_ok, SOFTMAX)
    z = tl.load(Z + hkv * BLOCK_D + offs_d)
    rw = 1.0 / (tl.sum(p * z[None, :], 1) + eps)
    s2 = tl.load(S2 + (hkv * BLOCK_D + offs_d[:, None]) * BLOCK_DV + offs_v[None, :])
    o = tl.dot((p * rw[:, None]).to(q.dtype), s2.to(q.dtype), o, input_precision=PREC)
    return o + tl.load(Bias + offs_v, mask=v_ok, other=0.0)[None, :]


__all__ = ["add_linear_all"]
