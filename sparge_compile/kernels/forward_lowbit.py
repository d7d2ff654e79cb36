"""Triton low-bit sparse attention forward: FP8 e4m3 or INT8 Q·Kᵀ, FP8 or half P·V.

The structure of :mod:`.forward` (one program per query block of the mask and batch x query
head, an online softmax over the row's kept key blocks, dropped ones never loaded) on the
quantized inputs of :mod:`.quant_triton` (the math and the float64 reference: :mod:`.quant`):

* scores: tl.dot of the e4m3 (fp32 accumulate) or int8 (int32 accumulate) tiles, times the
  query block's scale x the key block's scale x scale·log2(e): the log2-domain scores of the
  smoothed keys; exp2 as in the bf16 kernel;
* P·V in FP8 (PV_FP8): p·448 cast to e4m3 against V in e4m3 over its channel scales, fp32
  accumulate; the end divides by 448 and multiplies by V's channel scale. V may be stored
  transposed (V_T: D x N, the K-major B operand Hopper's FP8 MMA wants). Otherwise P·V in V's
  own dtype (bf16/fp16, "ieee" fp32);
* the log-sum-exp: of the low-bit scores plus scale·q·mean(k) (what smoothing took off), i.e. of
  the original scores as this forward sees them (the bf16 backward recomputes P from it).

Quantized tensors are padded (whole tiles, zero rows and columns): their loads are unmasked.
Knobs (arguments, or environment variables read at import, for the benchmark):
``SPARGE_LOWBIT_PV`` (fp8 | half), ``SPARGE_LOWBIT_V`` (nd | dn: V transposed),
``SPARGE_LOWBIT_WARPS``, ``SPARGE_LOWBIT_STAGES``, ``SPARGE_LOWBIT_TMA`` (0 | 1),
``SPARGE_LOWBIT_PV_ACC`` (Triton's max_num_imprecise_acc of the FP8 P·V dot: a K-count after
which the MMA's partial sums go into an fp32 accumulator; unset: Triton's default).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from . import quant, tuning
from .forward import descriptor, dot_precision, keep_pointer, key_mask, tma_ok
from .layout import attention_out
from .quant_triton import interpreting, quantize_inputs_triton, to_e4m3

_LN2 = tl.constexpr(math.log(2.0))


def _env_int(name):
    val = os.environ.get(name)
    return int(val) if val else None


DEFAULTS = dict(pv=os.environ.get("SPARGE_LOWBIT_PV") or None,
                v_layout=os.environ.get("SPARGE_LOWBIT_V", "dn"),
                num_warps=_env_int("SPARGE_LOWBIT_WARPS"), num_stages=_env_int("SPARGE_LOWBIT_STAGES"),
                use_tma=os.environ.get("SPARGE_LOWBIT_TMA", "0") == "1",   # TMA: no compile on Triton 3.6
                pv_acc=_env_int("SPARGE_LOWBIT_PV_ACC"))


@triton.jit
def _load_kv(K8, V, kbase, vbase, b, hk, start, offs_k, offs_d, k_ok, d_ok, svn, svd, Npad,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PV_FP8: tl.constexpr, V_T: tl.constexpr,
             USE_TMA: tl.constexpr):
    """The key tile (BLOCK_N, BLOCK_D) and the value tile (BLOCK_N, BLOCK_D) of key block start."""
    if USE_TMA:
        k = K8.load([b, hk, start, 0]).reshape(BLOCK_N, BLOCK_D)
        if V_T:
            v = tl.trans(V.load([b, hk, 0, start]).reshape(BLOCK_D, BLOCK_N))
        else:
            v = V.load([b, hk, start, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k = tl.load(kbase + offs_k[:, None] * BLOCK_D + offs_d[None, :])
        if PV_FP8:
            if V_T:
                v = tl.trans(tl.load(vbase + offs_d[:, None] * Npad + offs_k[None, :]))
            else:
                v = tl.load(vbase + offs_k[:, None] * BLOCK_D + offs_d[None, :])
        else:
            v = tl.load(vbase + offs_k[:, None] * svn + offs_d[None, :] * svd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return k, v


@triton.jit
def _lowbit_step(q, k, v, c, offs_k, k_ok, offs_m, m_i, l_i, acc, keep_base, PREC: tl.constexpr,
                 INT8: tl.constexpr, PV_FP8: tl.constexpr, PV_ACC: tl.constexpr, EVEN_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, EMULATE: tl.constexpr):
    """One online-softmax update; c: the tile's dequantization factor (log2-domain scores)."""
    if INT8:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * c
    else:
        s = tl.dot(q, tl.trans(k)) * c
    if not EVEN_N:
        s = tl.where(k_ok[None, :], s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(offs_k[None, :] <= offs_m[:, None], s, float("-inf"))
    s = key_mask(s, keep_base, offs_k, k_ok, HAS_KEEP)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if IS_CAUSAL or HAS_KEEP:  # a row may see no key in this tile yet
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        p8 = to_e4m3(p * 448.0, EMULATE)
        acc = acc * alpha[:, None] + tl.dot(p8, v, max_num_imprecise_acc=PV_ACC)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _lowbit_fwd_kernel(Q8, QS, K8, KS, V, VS, RowOff, Out, Lse, KvNum, KvIdx, Keep, qk_scale,
                       svb, svh, svn, svd, sob, soh, son, sod, Hq, G, Nq, Nk, nq, nk, D, Npad,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, INT8: tl.constexpr,
                       PV_FP8: tl.constexpr, V_T: tl.constexpr, PV_ACC: tl.constexpr,
                       EVEN_N: tl.constexpr, USE_TMA: tl.constexpr, HAS_KEEP: tl.constexpr,
                       EMULATE: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hk = (bh % Hq) // G
    bhk = b * (Hq // G) + hk
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q8 + (bh * nq * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
    qc = tl.load(QS + bh * nq + i) * qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = bh * nq + i
    lut = KvIdx + row * nk
    kbase = K8 + bhk * Npad * BLOCK_D
    vbase = (V + bhk * Npad * BLOCK_D) if PV_FP8 else (V + b * svb + hk * svh)
    for t in range(tl.load(KvNum + row)):
        j = tl.load(lut + t)
        offs_k = j * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = offs_k < Nk
        k, v = _load_kv(K8, V, kbase, vbase, b, hk, j * BLOCK_N, offs_k, offs_d, k_ok, d_ok, svn, svd,
                        Npad, BLOCK_N, BLOCK_D, PV_FP8, V_T, USE_TMA)
        c = qc * tl.load(KS + bhk * nk + j)
        m_i, l_i, acc = _lowbit_step(q, k, v, c, offs_k, k_ok, offs_m, m_i, l_i, acc, Keep + b * Nk, PREC,
                                     INT8, PV_FP8, PV_ACC, EVEN_N, IS_CAUSAL, HAS_KEEP, EMULATE)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if PV_FP8:
        out = out * (tl.load(VS + bhk * D + offs_d, mask=d_ok, other=0.0) / 448.0)[None, :]
    m_ok = offs_m < Nq
    off = tl.load(RowOff + bh * Nq + offs_m, mask=m_ok, other=0.0)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2 + off)
    tl.store(Out + b * sob + (bh % Hq) * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * Nq + offs_m, lse, mask=m_ok)


def _descriptors(z: quant.Quantized, block_k: int, BLOCK_D: int):
    """TMA descriptors of the padded k8 and v8 (or of v itself, P·V in half)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    kd = TensorDescriptor(z.k8, list(z.k8.shape), list(z.k8.stride()), [1, 1, block_k, BLOCK_D])
    if z.vs is None:
        return kd, descriptor(z.v8, block_k)
    box = [1, 1, BLOCK_D, block_k] if z.v_t else [1, 1, block_k, BLOCK_D]
    return kd, TensorDescriptor(z.v8, list(z.v8.shape), list(z.v8.stride()), box)


def _launch_settings(z, block_q, block_k, BLOCK_D, use_tma, num_warps, num_stages):
    warps = num_warps or DEFAULTS["num_warps"] or 4
    stages = num_stages or DEFAULTS["num_stages"] or (2 if use_tma else 3)
    v_bytes = 1 if z.vs is not None else z.v8.element_size()
    stages = tuning.fit_stages(stages, block_q * BLOCK_D, block_k * BLOCK_D * (1 + v_bytes), z.q8)
    return warps, stages


def lowbit_kernel(z: quant.Quantized, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, Nq, Nk,
                  D, out_dtype, *, kv_keep=None, num_warps=None, num_stages=None, use_tma=None, pv_acc=None,
                  like=None):
    """The forward kernel alone on quantized inputs z (:func:`quantize_inputs_triton`, whose padding
    it needs). Returns (out (B, Hq, Nq, D) in out_dtype, in the layout of ``like`` (the unquantized
    q, :func:`.layout.attention_out`) where given, else contiguous; lse (B, Hq, Nq) float32)."""
    B, Hq = z.q8.shape[:2]
    Hkv = z.k8.shape[1]
    BLOCK_D = z.q8.shape[-1]
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    out = (torch.empty((B, Hq, Nq, D), dtype=out_dtype, device=z.q8.device) if like is None
           else attention_out(like, D, out_dtype))
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=z.q8.device)
    use_tma = DEFAULTS["use_tma"] if use_tma is None else bool(use_tma)
    use_tma = use_tma and tma_ok(z.k8, BLOCK_D) and (z.vs is not None or (tma_ok(z.v8, D)))
    kk, vv = _descriptors(z, block_k, BLOCK_D) if use_tma else (z.k8, z.v8)
    v_strides = z.v8.stride() if z.vs is None else (0, 0, 0, 0)
    keep = keep_pointer(kv_keep, kv_num_blocks)
    vs = z.vs if z.vs is not None else z.qs
    args = (z.q8, z.qs, kk, z.ks, vv, vs, z.row_off, out, lse, kv_num_blocks, kv_indices, keep,
            float(scale) / math.log(2.0), *v_strides, *out.stride(), Hq, Hq // Hkv, Nq, Nk, nq, nk, D,
            nk * block_k)
    meta = dict(BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=BLOCK_D, IS_CAUSAL=bool(is_causal),
                PREC=dot_precision(z.v8.dtype), INT8=z.q8.dtype == torch.int8, PV_FP8=z.vs is not None,
                V_T=z.v_t, PV_ACC=pv_acc if pv_acc is not None else DEFAULTS["pv_acc"],
                EVEN_N=Nk % block_k == 0, USE_TMA=use_tma, HAS_KEEP=kv_keep is not None,
                EMULATE=interpreting(z.q8))
    warps, stages = _launch_settings(z, block_q, block_k, BLOCK_D, use_tma, num_warps, num_stages)
    _lowbit_fwd_kernel[(nq, B * Hq)](*args, **meta, num_warps=warps, num_stages=stages)
    return out, lse


def attention_fwd_lowbit_triton(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                                precision, *, kv_keep=None, pv=None, v_layout=None, **launch):
    """Quantization pass then :func:`lowbit_kernel`. precision: "fp8" or "int8"; pv: "fp8" or
    "half" (default: fp8 for "fp8", half for "int8"); v_layout: "dn" (V transposed, default) or
    "nd"; launch: num_warps, num_stages, use_tma, pv_acc (defaults: the module's knobs)."""
    pv = pv or DEFAULTS["pv"]
    v_layout = v_layout or DEFAULTS["v_layout"]
    if v_layout not in ("nd", "dn"):
        raise ValueError(f"v_layout must be 'nd' or 'dn', got {v_layout!r}")
    z = quantize_inputs_triton(q, k, v, scale, block_q, block_k, precision, pv, v_transposed=v_layout == "dn")
    return lowbit_kernel(z, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, q.shape[2],
                         k.shape[2], q.shape[3], q.dtype, kv_keep=kv_keep, like=q, **launch)


__all__ = ["DEFAULTS", "attention_fwd_lowbit_triton", "lowbit_kernel"]
