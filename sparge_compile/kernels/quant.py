"""Low-bit attention math in plain PyTorch: the specification of the Triton low-bit forward
(:mod:`.forward_lowbit`, :mod:`.quant_triton`) and its CPU path.

The recipe (SageAttention / SpargeAttn, ``DESIGN.md`` §1b):

* K smoothing: k_s = k - mean_n(k) per (b, kv head). Every score of a query row shifts by the
  same q·mean(k), so the softmax is unchanged; the row's log-sum-exp gets ``scale·q·mean(k)``
  added back (:func:`row_offsets`) so that it is the log-sum-exp of the original scores.
* Q per 128-query block, K per key block: one scale ``amax / QMAX`` (QMAX 448 for FP8 e4m3,
  127 for INT8; an all-zero block gets scale 1), values ``x / scale`` cast to e4m3 (round to
  nearest even, saturating at ±448) or rounded half away from zero to int8.
* V (FP8 P·V only): one scale per channel, ``amax_n |v[:, d]| / 448``.
* P: the online softmax's p = exp2(s - m_running) in [0, 1], times 448, cast to e4m3; the
  accumulator is divided by 448 (and multiplied by V's channel scale) at the end. The row sum
  l is of the unquantized p.

:func:`lowbit_reference_attention` runs exactly this forward, the quantization in float32 as the
kernels do it and the rest in float64, walking each row's kept key blocks in the mask's order (the
running maximum, hence P's rounding, depends on it). :func:`exact_attention` is the fp32/float64
masked attention the low-bit error is measured against.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import reference as R
from ..validate import PRECISIONS  # noqa: F401  (re-exported: the forward's arithmetics)
from .layout import attention_out

FP8_MAX = 448.0
INT8_MAX = 127.0
QK_KINDS = ("fp8", "int8")


def qmax(kind: str) -> float:
    if kind == "fp8":
        return FP8_MAX
    if kind == "int8":
        return INT8_MAX
    raise ValueError(f"kind must be 'fp8' or 'int8', got {kind!r}")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """The kernels' float -> int8 rounding: trunc(x + 0.5·sign(x))."""
    return torch.trunc(x + 0.5 * torch.sign(x))


def to_kind(x: torch.Tensor, kind: str) -> torch.Tensor:
    """fp32 values already divided by their scale -> e4m3 (saturating) or int8."""
    m = qmax(kind)
    if kind == "fp8":
        return x.clamp(-m, m).to(torch.float8_e4m3fn)
    return round_half_away(x).clamp(-m, m).to(torch.int8)


def smooth_k(k: torch.Tensor):
    """(k - km, km): km (B, Hkv, 1, D) float32, the mean key over the sequence."""
    km = k.to(torch.float32).mean(dim=2, keepdim=True)
    return k.to(torch.float32) - km, km


def block_scales(x: torch.Tensor, block: int, kind: str) -> torch.Tensor:
    """(B, H, nb) float32: amax of each block of ``block`` rows over qmax(kind); 1 for a zero block."""
    B, H, N, D = x.shape
    nb = R.cdiv(N, block)
    xp = torch.nn.functional.pad(x.to(torch.float32), (0, 0, 0, nb * block - N))
    amax = xp.abs().reshape(B, H, nb, block * D).amax(-1)
    return torch.where(amax == 0, torch.ones_like(amax), amax / qmax(kind))


def expand_blocks(scale: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(B, H, nb) -> (B, H, n, 1): each block's scale on its rows."""
    return scale.repeat_interleave(block, dim=-1)[..., :n, None]


def quantize_blocks(x: torch.Tensor, block: int, kind: str):
    """(xq, scale): x (B, H, N, D) quantized per block of rows; xq.float() * scale ≈ x."""
    scale = block_scales(x, block, kind)
    return to_kind(x.to(torch.float32) / expand_blocks(scale, block, x.shape[2]), kind), scale


def channel_scales(v: torch.Tensor) -> torch.Tensor:
    """(B, H, D) float32: V's per-channel amax over the sequence / 448 (1 for a zero channel)."""
    amax = v.to(torch.float32).abs().amax(dim=2)
    return torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)


def quantize_v(v: torch.Tensor):
    """(v8, vs): v (B, H, N, D) in e4m3 with a per-channel scale vs (B, H, D)."""
    vs = channel_scales(v)
    return to_kind(v.to(torch.float32) / vs[:, :, None, :], "fp8"), vs


def quantize_p(p: torch.Tensor) -> torch.Tensor:
    """p in [0, 1] -> the value its e4m3 code stands for after the division by 448."""
    return (p * FP8_MAX).to(torch.float32).clamp(0, FP8_MAX).to(torch.float8_e4m3fn).to(p.dtype) / FP8_MAX


def row_offsets(q: torch.Tensor, km: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hq, Nq) float32: scale·q·km, what K smoothing took off every score of a row."""
    G = q.shape[1] // km.shape[1]
    return (q.to(torch.float32) @ km.repeat_interleave(G, dim=1).transpose(-2, -1))[..., 0] * scale


class Quantized(NamedTuple):
    """The low-bit forward's inputs: q8 (B, Hq, Nq, D) with qs (B, Hq, nq); k8 the smoothed keys
    (B, Hkv, Nk, D) with ks (B, Hkv, nk); v8 (B, Hkv, Nk, D) e4m3 with vs (B, Hkv, D), or v itself
    and vs None (P·V in v's dtype); row_off (B, Hq, Nq) float32, added to the log-sum-exp.
    The Triton pass pads q8/k8/v8 (whole tiles); v_t: its v8 is stored transposed (B, Hkv, D, N)."""
    q8: torch.Tensor
    qs: torch.Tensor
    k8: torch.Tensor
    ks: torch.Tensor
    v8: torch.Tensor
    vs: torch.Tensor | None
    row_off: torch.Tensor
    v_t: bool = False


def split_precision(precision: str, pv: str | None = None):
    """(Q·Kᵀ kind, P·V in fp8): "fp8" -> FP8 both; "int8" -> INT8 Q·Kᵀ, P·V in v's dtype.
    pv ("fp8" or "half") overrides the P·V choice."""
    if precision not in QK_KINDS:
        raise ValueError(f"precision must be one of {QK_KINDS} for the low-bit forward, got {precision!r}")
    if pv is None:
        return precision, precision == "fp8"
    if pv not in ("fp8", "half"):
        raise ValueError(f"pv must be 'fp8' or 'half', got {pv!r}")
    return precision, pv == "fp8"


def quantize_inputs(q, k, v, scale, block_q, block_k, precision, pv=None) -> Quantized:
    """The torch quantization of (q, k, v) for the low-bit forward (module docstring)."""
    kind, pv_fp8 = split_precision(precision, pv)
    ks_, km = smooth_k(k)
    q8, qs = quantize_blocks(q, block_q, kind)
    k8, ks = quantize_blocks(ks_, block_k, kind)
    v8, vs = quantize_v(v) if pv_fp8 else (v, None)
    return Quantized(q8, qs, k8, ks, v8, vs, row_offsets(q, km, scale))


def dequantize(x8: torch.Tensor, scale: torch.Tensor, block: int, dtype=torch.float64) -> torch.Tensor:
    """x8 (B, H, N, D) with its per-block scale (B, H, nb) -> values in ``dtype``."""
    return x8.to(dtype) * expand_blocks(scale, block, x8.shape[2]).to(dtype)


def _gather_blocks(x: torch.Tensor, j: torch.Tensor, block: int) -> torch.Tensor:
    """x (B, H, nk*block, D) padded; j (B, H, nq) block indices -> (B, H, nq, block, D)."""
    B, H, _, D = x.shape
    rows = (j[..., None] * block + torch.arange(block, device=x.device)).reshape(B, H, -1)
    return torch.gather(x, 2, rows[..., None].expand(B, H, rows.shape[-1], D)).reshape(B, H, -1, block, D)


def _padded(x: torch.Tensor, block: int, dtype) -> torch.Tensor:
    """x (B, H, N, D) in ``dtype``, zero rows appended up to a multiple of block."""
    n = R.cdiv(x.shape[2], block) * block
    return torch.nn.functional.pad(x.to(dtype), (0, 0, 0, n - x.shape[2]))


def _tile_mask(j, q_rows, Nk, block_k, is_causal, kv_keep):
    """(B, H, nq, block_q, block_k) bool: the keys of key blocks j each query row may see."""
    keys = j[..., None] * block_k + torch.arange(block_k, device=j.device)  # (B, H, nq, bk)
    ok = (keys < Nk)[..., None, :]
    if is_causal:
        ok = ok & (keys[..., None, :] <= q_rows[..., None])
    if kv_keep is not None:
        B = j.shape[0]
        keep = torch.nn.functional.pad(kv_keep, (0, block_k))  # keys past Nk read as hidden
        ok = ok & torch.gather(keep[:, None, None, :].expand(B, *keys.shape[1:3], keep.shape[-1]), -1,
                               keys.clamp(max=keep.shape[-1] - 1))[..., None, :]
    return ok


def _online_step(state, s, ok, vblk, active, pv_fp8, v_dtype):
    """One online-softmax update (log2 domain) of the rows whose block is ``active``."""
    m_i, l_i, acc = state
    s = s.masked_fill(~ok, -math.inf)
    m_new = torch.maximum(m_i, s.amax(-1))
    m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
    p = torch.exp2(s - m_use[..., None])
    alpha = torch.exp2(m_i - m_use)
    pq = quantize_p(p) if pv_fp8 else p.to(v_dtype).to(p.dtype)
    new = (m_new, l_i * alpha + p.sum(-1), acc * alpha[..., None] + pq @ vblk)
    a = active[..., None]
    return (torch.where(a, new[0], m_i), torch.where(a, new[1], l_i), torch.where(a[..., None], new[2], acc))


def simulate_lowbit(z: Quantized, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                    kv_keep=None, dtype=torch.float64):
    """The low-bit forward on quantized inputs ``z``, step by step as the kernel runs it: each row's
    kept key blocks in the mask's order, online softmax in the log2 domain. Returns (out, lse) in
    ``dtype``: out (B, Hq, Nq, D), lse (B, Hq, Nq) (natural log, of the original scores)."""
    B, Hq, Nq, D = z.q8.shape
    Nk, G = z.k8.shape[2], Hq // z.k8.shape[1]
    nq = R.cdiv(Nq, block_q)
    qd = _padded(dequantize(z.q8, z.qs, block_q, dtype), block_q, dtype).reshape(B, Hq, nq, block_q, D)
    kd = _padded(dequantize(z.k8, z.ks, block_k, dtype), block_k, dtype).repeat_interleave(G, dim=1)
    vd = _padded(z.v8, block_k, dtype).repeat_interleave(G, dim=1)
    q_rows = (torch.arange(nq, device=qd.device)[:, None] * block_q
              + torch.arange(block_q, device=qd.device)).reshape(nq, block_q)
    state = (torch.full((B, Hq, nq, block_q), -math.inf, dtype=dtype, device=qd.device),
             torch.zeros((B, Hq, nq, block_q), dtype=dtype, device=qd.device),
             torch.zeros((B, Hq, nq, block_q, D), dtype=dtype, device=qd.device))
    qk_scale = scale / math.log(2.0)
    num = kv_num_blocks.to(torch.int64)
    for t in range(int(num.max()) if num.numel() else 0):
        j = kv_indices[..., t].to(torch.int64).clamp(0, R.cdiv(Nk, block_k) - 1)
        kblk = _gather_blocks(kd, j, block_k)
        s = (qd @ kblk.transpose(-2, -1)) * qk_scale
        ok = _tile_mask(j, q_rows, Nk, block_k, is_causal, kv_keep)
        state = _online_step(state, s, ok, _gather_blocks(vd, j, block_k), t < num, z.vs is not None,
                             z.v8.dtype)
    m_i, l_i, acc = state
    l_safe = torch.where(l_i == 0, torch.ones_like(l_i), l_i)
    out = (acc / l_safe[..., None]).reshape(B, Hq, nq * block_q, D)[:, :, :Nq]
    if z.vs is not None:
        out = out * z.vs.repeat_interleave(G, dim=1)[:, :, None, :].to(dtype)
    lse = torch.where(l_i == 0, -math.inf, (m_i + torch.log2(l_safe)) * math.log(2.0))
    return out, lse.reshape(B, Hq, -1)[:, :, :Nq] + z.row_off.to(dtype)


def lowbit_reference_attention(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                               precision, kv_keep=None, pv=None, dtype=torch.float64):
    """(out, lse) of the low-bit forward (``precision`` "fp8" or "int8"), float64 by default:
    torch's quantization (:func:`quantize_inputs`) then :func:`simulate_lowbit`."""
    z = quantize_inputs(q, k, v, scale, block_q, block_k, precision, pv)
    return simulate_lowbit(z, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep, dtype)


def exact_attention(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep=None,
                    dtype=torch.float64):
    """The exact masked attention on the same mask, in ``dtype`` (the low-bit error's yardstick)."""
    from .torch_impl import indices_to_dense

    dense = indices_to_dense(kv_num_blocks, kv_indices, R.cdiv(k.shape[2], block_k))
    return R.masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), dense, scale, is_causal, block_q,
                              block_k, kv_keep)


def lowbit_attention_torch(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                           precision, kv_keep=None, pv=None):
    """The CPU path of the low-bit op: the reference, returned as the kernel returns it (out in q's
    dtype and layout, lse float32)."""
    out, lse = lowbit_reference_attention(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q,
                                          block_k, precision, kv_keep, pv)
    return attention_out(q, v.shape[-1]).copy_(out), lse.to(torch.float32)
