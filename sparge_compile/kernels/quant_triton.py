"""Triton quantization pass of the low-bit forward (the math: :mod:`.quant`).

Q and the smoothed K are quantized per block of rows (one program per block and head); V per
channel (its channel amax comes from one torch reduction). The outputs are padded for the
forward kernel: rows up to a multiple of the block and the head dim up to its power-of-two tile,
with zeros, so the kernel loads whole tiles; V in FP8 may be stored transposed (D x N, what
Hopper's FP8 MMA wants as its B operand). The mean key is one torch reduction too; fusing all of
this into the mask prediction's pooling pass (which already reads q and k once) is the next step.

Triton's CPU interpreter rounds fp32 -> e4m3 wrongly (1.96 -> 1.0); under it, :func:`to_e4m3`
rounds in fp32 first (:func:`round_e4m3`), so the cast is exact. On a GPU the cast is direct.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from . import quant, tuning


def interpreting(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_e4m3(x):
    """fp32 -> the nearest e4m3 value (ties to even), saturating at ±448, still fp32."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits
    sub = (x + 24576.0) - 24576.0  # subnormals: multiples of 2^-9 (ulp of 24576 = 1.5 * 2^14)
    y = tl.where(tl.abs(x) < 0.015625, sub, normal)
    return tl.minimum(tl.maximum(y, -448.0), 448.0)


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    if EMULATE:
        x = round_e4m3(x)
    else:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv)


@triton.jit
def to_int8(x):
    """Round half away from zero, saturating at ±127."""
    x = tl.minimum(tl.maximum(x, -127.0), 127.0)
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit
def _quant_rows_kernel(X, Mean, Xq, Scale, RowOff, sxb, sxh, sxn, sxd, H, G, N, D, nb, sm_scale,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr,
                       SUB_MEAN: tl.constexpr, ROW_DOT: tl.constexpr, EMULATE: tl.constexpr):
    """One block of rows of x (B, H, N, D): minus the mean (K smoothing), one scale, quantized into
    Xq (B, H, nb*BLOCK, BLOCK_D); with ROW_DOT, RowOff[row] = sm_scale · x·mean (Q)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=ok,
                other=0.0).to(tl.float32)
    if SUB_MEAN or ROW_DOT:
        mean = tl.load(Mean + (b * (H // G) + h // G) * D + offs_d, mask=offs_d < D, other=0.0)
    if SUB_MEAN:
        x = tl.where(ok, x - mean[None, :], 0.0)
    if ROW_DOT:
        tl.store(RowOff + bh * N + offs_n, tl.sum(x * mean[None, :], 1) * sm_scale, mask=offs_n < N)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    qm = 127.0 if INT8 else 448.0
    scale = tl.where(amax == 0.0, 1.0, amax / qm)
    y = x / scale
    yq = to_int8(y) if INT8 else to_e4m3(y, EMULATE)
    tl.store(Xq + (bh * nb * BLOCK + offs_n[:, None]) * BLOCK_D + offs_d[None, :], yq)
    tl.store(Scale + bh * nb + i, scale)


@triton.jit
def _quant_v_kernel(V, Vs, Vq, svb, svh, svn, svd, H, N, D, Npad,
                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr,
                    EMULATE: tl.constexpr):
    """One block of V's rows over its channel scales into e4m3: Vq (B, H, Npad, BLOCK_D), or with
    TRANSPOSE (B, H, BLOCK_D, Npad)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    v = tl.load(V + (bh // H) * svb + (bh % H) * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=ok, other=0.0)
    vs = tl.load(Vs + bh * D + offs_d, mask=offs_d < D, other=1.0)
    y = to_e4m3(v.to(tl.float32) / vs[None, :], EMULATE)
    if TRANSPOSE:
        tl.store(Vq + (bh * BLOCK_D + offs_d[None, :]) * Npad + offs_n[:, None], y)
    else:
        tl.store(Vq + (bh * Npad + offs_n[:, None]) * BLOCK_D + offs_d[None, :], y)


def _launch_rows(x, block, kind, mean, row_dot, sm_scale, G):
    B, H, N, D = x.shape
    BLOCK_D = tuning.head_dim_tile(D)
    nb = cdiv(N, block)
    dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    xq = torch.empty((B, H, nb * block, BLOCK_D), dtype=dtype, device=x.device)
    scale = torch.empty((B, H, nb), dtype=torch.float32, device=x.device)
    row_off = torch.empty((B, H, N), dtype=torch.float32, device=x.device) if row_dot else scale
    _quant_rows_kernel[(nb, B * H)](x, mean, xq, scale, row_off, *x.stride(), H, G, N, D, nb,
                                    float(sm_scale), BLOCK=block, BLOCK_D=BLOCK_D, INT8=kind == "int8",
                                    SUB_MEAN=not row_dot, ROW_DOT=row_dot, EMULATE=interpreting(x),
                                    num_warps=4)
    return xq, scale, row_off


def quantize_v_triton(v, block_k, transpose=False):
    """(v8, vs): v in e4m3 over its per-channel scale vs (B, H, D) float32; v8 padded to
    (B, H, nk*block_k, tile), or with transpose (B, H, tile, nk*block_k)."""
    B, H, N, D = v.shape
    BLOCK_D = tuning.head_dim_tile(D)
    npad = cdiv(N, block_k) * block_k
    vs = torch.linalg.vector_norm(v, float("inf"), dim=2, dtype=torch.float32)
    vs = torch.where(vs == 0, torch.ones_like(vs), vs / quant.FP8_MAX).contiguous()
    shape = (B, H, BLOCK_D, npad) if transpose else (B, H, npad, BLOCK_D)
    v8 = torch.empty(shape, dtype=torch.float8_e4m3fn, device=v.device)
    _quant_v_kernel[(cdiv(N, block_k), B * H)](v, vs, v8, *v.stride(), H, N, D, npad, BLOCK=block_k,
                                               BLOCK_D=BLOCK_D, TRANSPOSE=bool(transpose),
                                               EMULATE=interpreting(v), num_warps=4)
    return v8, vs


def quantize_inputs_triton(q, k, v, scale, block_q, block_k, precision, pv=None, v_transposed=False):
    """:func:`quant.quantize_inputs` in Triton, padded for the forward kernel (module docstring)."""
    kind, pv_fp8 = quant.split_precision(precision, pv)
    G = q.shape[1] // k.shape[1]
    km = k.mean(dim=2, dtype=torch.float32).contiguous()  # (B, Hkv, D)
    k8, ks, _ = _launch_rows(k, block_k, kind, km, False, 1.0, 1)
    q8, qs, row_off = _launch_rows(q, block_q, kind, km, True, scale, G)
    v8, vs = quantize_v_triton(v, block_k, v_transposed) if pv_fp8 else (v, None)
    return quant.Quantized(q8, qs, k8, ks, v8, vs, row_off, bool(v_transposed and pv_fp8))
