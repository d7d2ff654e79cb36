"""SLA's released form in two Triton kernels: O = O_sparse + proj(O_lin), O_lin the linear
attention of every query over all keys (``combine="sla-all"``, non-causal).

proj is linear, so proj(φ(Q)S / (φ(Q)·z + eps)) = (φ(Q) / (φ(Q)·z + eps)) (S Wᵀ) + b with
S = φ(K)ᵀV and z = φ(K)ᵀ1 over all keys: one D x Dv state per (batch, key head), folded with W.

1. ``_total_states_kernel``: φ(K) tile by tile (in-kernel, rounded to v's dtype for the product,
   as :mod:`.linear` does), partial S and z per chunk of key tiles; the chunks' sums and the fold
   with W in torch (a few MB). K and V are read once.
2. ``_sla_all_out_kernel``: per query tile, φ(Q), the denominator, one product with S Wᵀ
   accumulated onto O_sparse, + b, stored once in O_sparse's dtype. Q and O_sparse are read
   once: no O_lin, no proj output in memory.

Measured on the H200 (B=1, H=12, N=32768, D=128, bf16, 95%; bench/tools/linear_all_probe.py,
2026-12-04): states 0.144 ms at the launch below (the sweep: 64 or 128 key rows, K loaded
transposed, S's columns split over programs, 4/8 warps, 256-2048 programs: none faster), the
output kernel ~0.13 ms. The term in the sparse forward's epilogue instead (one pass over the
queries) ran 1.08 ms against 0.69 for the forward alone: the forward's tile holds 255 registers
at 4 warps and runs one program per SM, so the epilogue's work (φ(Q), S Wᵀ's load, the product)
is serial and unhidden; two kernels win.

The definition is :func:`sparge_compile.linear_branch.linear_attention_all` followed by
:func:`~sparge_compile.linear_branch.combine_outputs` (tests/test_linear_all.py compares them in
float64 terms; bench/tools/linear.py times it beside the sparse kernel). The backward is
PyTorch's through that definition (``sparge::sla_all`` in ops_linear.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from . import tuning
from .forward import dot_precision
from .linear import _check_kind
from .phi import _phi, add_linear_all

# launches (the probe's best on the H200): the states kernel's key rows per tile, about how many
# programs (partial sums per chunk), warps, stages; the output kernel's query rows, warps
STATES_LAUNCH = dict(block_n=64, programs=256, num_warps=4, num_stages=2)
OUT_LAUNCH = dict(block_m=64, num_warps=4)


@triton.jit
def _total_states_kernel(K, V, SP, ZP, skb, skh, skn, skd, svb, svh, svn, svd, Hkv, Nk, nc, chunk, D, Dv,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """SP[bh, c] = Σ over the key tiles of chunk c of φ(K_t)ᵀV_t, ZP[bh, c] = Σ of φ(K_t)'s rows."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, hk = bh // Hkv, bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_v = tl.arange(0, BLOCK_DV)
    v_ok = offs_v < Dv
    acc = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, chunk):
        offs_n = (c * chunk + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Nk
        x = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_v[None, :] * svd,
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        pk = tl.where(n_ok[:, None], _phi(x, d_ok, SOFTMAX), 0.0).to(v.dtype)   # rows past Nk: 0
        acc += tl.dot(tl.trans(pk), v, input_precision=PREC)
        z += tl.sum(pk.to(tl.float32), 0)
    base = bh * nc + c
    tl.store(ZP + base * BLOCK_D + offs_d, z)
    tl.store(SP + (base * BLOCK_D + offs_d[:, None]) * BLOCK_DV + offs_v[None, :], acc)


@triton.jit
def _sla_all_out_kernel(Q, OS, S2, Z, Bias, Out, eps, sqb, sqh, sqn, sqd, sob, soh, son, sod,
                        srb, srh, srn, srd, Hq, G, Nq, D, Dv,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """Out = OS + φ(Q)·S2 / (φ(Q)·z + eps) + Bias for one query tile of one (batch, query head)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hkv = b * (Hq // G) + h // G
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    m_ok, d_ok, v_ok = offs_m < Nq, offs_d < D, offs_v < Dv
    x = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    io = m_ok[:, None] & v_ok[None, :]
    o = tl.load(OS + b * sob + h * soh + offs_m[:, None] * son + offs_v[None, :] * sod, mask=io, other=0.0)
    o = add_linear_all(o.to(tl.float32), x, S2, Z, Bias, eps, hkv, offs_d, d_ok, offs_v, v_ok, BLOCK_D,
                       BLOCK_DV, SOFTMAX, PREC)
    tl.store(Out + b * srb + h * srh + offs_m[:, None] * srn + offs_v[None, :] * srd,
             o.to(Out.dtype.element_ty), mask=io)


def total_states(k: torch.Tensor, v: torch.Tensor, kind: str = "softmax", **launch):
    """(S, z): S (B*Hkv, BLOCK_D, BLOCK_DV) = φ(K)ᵀV and z (B*Hkv, BLOCK_D) = φ(K)ᵀ1 over all keys,
    fp32, zero past D / Dv (the head-dim tiles). launch: overrides of :data:`STATES_LAUNCH`."""
    softmax = _check_kind(kind)
    cfg = {**STATES_LAUNCH, **launch}
    B, Hkv, Nk, D = k.shape
    Dv = v.shape[-1]
    BLOCK_D, BLOCK_DV = tuning.head_dim_tile(D), tuning.head_dim_tile(Dv)
    tiles = cdiv(Nk, cfg["block_n"])
    chunk = max(1, cdiv(tiles * B * Hkv, cfg["programs"]))
    nc = cdiv(tiles, chunk)
    SP = torch.empty((B * Hkv, nc, BLOCK_D, BLOCK_DV), dtype=torch.float32, device=k.device)
    ZP = torch.empty((B * Hkv, nc, BLOCK_D), dtype=torch.float32, device=k.device)
    _total_states_kernel[(nc, B * Hkv)](k, v, SP, ZP, *k.stride(), *v.stride(), Hkv, Nk, nc, chunk, D, Dv,
                                        BLOCK_N=cfg["block_n"], BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                        SOFTMAX=softmax, PREC=dot_precision(k.dtype),
                                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return SP.sum(1), ZP.sum(1)


def folded_states(k, v, weight, bias, kind: str = "softmax", **launch):
    """(S2, z, b): S Wᵀ / Nk (B*Hkv, BLOCK_D, BLOCK_DV) in k's dtype (fp32 for fp32), z / Nk
    (B*Hkv, BLOCK_D) and proj's bias (BLOCK_DV,) fp32, zero in the padded tiles: all the all-keys
    term needs beside φ(q). Divided by the key count: S grows with it (φ(K)'s rows are O(1)), past
    fp16's range at long sequences (65504: about 50k keys of unit values), and the term's ratio
    does not change (the caller divides eps too). launch: see :func:`total_states`. Few torch ops
    (each one's launch shows at this size)."""
    S, z = total_states(k, v, kind, **launch)
    Dv, BLOCK_DV = v.shape[-1], S.shape[-1]
    per_key = 1.0 / max(k.shape[2], 1)
    w = weight.float() * per_key
    if Dv != BLOCK_DV:   # a padded head-dim tile: W and b padded with zeros
        w = torch.nn.functional.pad(w, (0, BLOCK_DV - Dv, 0, BLOCK_DV - Dv))
    b = torch.zeros(BLOCK_DV, device=k.device) if bias is None else torch.nn.functional.pad(
        bias.float(), (0, BLOCK_DV - Dv))
    dtype = k.dtype if k.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.matmul(S, w.t()).to(dtype), z * per_key, b


def sla_all_fwd_triton(out_s, q, k, v, weight, bias, kind: str = "softmax", eps: float = 1e-5):
    """O_sparse + proj(linear attention over all keys), (B, Hq, Nq, Dv) in out_s's dtype.
    weight (Dv, Dv), bias (Dv,) or None: proj's. q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv)."""
    return add_term(out_s, q, *folded_states(k, v, weight, bias, kind), kind, eps / max(k.shape[2], 1))


def add_term(out_s, q, S2, z, b, kind: str = "softmax", eps: float = 1e-5):
    """out_s + (φ(q) / (φ(q)·z + eps)) S2 + b from :func:`folded_states`' (S2, z, b) (eps in z's
    units: divided by the key count as they are): the output kernel alone. out_s (B, Hq, Nq, Dv);
    the key heads are S2's rows over B."""
    softmax = _check_kind(kind)
    B, Hq, Nq, D = q.shape
    Dv = out_s.shape[-1]
    BLOCK_D, BLOCK_DV = S2.shape[-2:]
    out = torch.empty(q.shape[:-1] + (Dv,), dtype=out_s.dtype, device=q.device)
    _sla_all_out_kernel[(cdiv(Nq, OUT_LAUNCH["block_m"]), B * Hq)](
        q, out_s, S2, z, b, out, float(eps), *q.stride(), *out_s.stride(), *out.stride(),
        Hq, Hq // (S2.shape[0] // B), Nq, D, Dv, BLOCK_M=OUT_LAUNCH["block_m"], BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV, SOFTMAX=softmax, PREC=dot_precision(q.dtype), num_warps=OUT_LAUNCH["num_warps"])
    return out


__all__ = ["add_term", "folded_states", "sla_all_fwd_triton", "total_states"]
