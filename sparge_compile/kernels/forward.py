"""Triton sparse attention forward: FlashAttention-style online softmax over kept key blocks.

One program per (query block of the mask, batch x query head). It walks the row's index list
(kv_indices[:kv_num_blocks]); dropped key blocks are never loaded. Scores are scaled by
scale·log2(e) and exponentiated with exp2; the accumulators are fp32; the row's log-sum-exp
(natural log) is saved for the backward pass. Causal masking (SDPA's, top-left) is applied
element-wise inside the tiles. The head dim runs in a power-of-two tile (:func:`.tuning.head_dim_tile`):
a padded one (EVEN_D false) is masked past D on every load and store.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..reference import cdiv
from . import tuning
from .layout import attention_out

LOG2E = 1.4426950408889634  # log2(e): scores are exponentiated with exp2
_LOG2E = tl.constexpr(LOG2E)  # the same, inside the kernels
# K/V through TMA tensor descriptors where the GPU has them (Hopper+); SPARGE_TMA=0 turns it off
USE_TMA_DEFAULT = os.environ.get("SPARGE_TMA", "1") == "1"
# Traced for Inductor (tuning.native) the forward builds its descriptors on the device
# (tl.make_tensor_descriptor): torch 2.11's wrap_triton under make_fx takes no host descriptor.
# Bit-identical to pointer loads; compiled 32768x128 at 95% 0.887 -> 0.786 ms (H200, 2026-12-03,
# bench/tools/fwd_probe.py). Only on calls of at least DEVICE_TMA_MIN_WORK dense score entries
# (B·Hq·Nq·Nk): the kernel then needs a global-scratch allocation per launch, host time that
# small, host-bound calls cannot hide. SPARGE_DEVICE_TMA=0: pointer loads throughout.
DEVICE_TMA_DEFAULT = os.environ.get("SPARGE_DEVICE_TMA", "1") == "1"
DEVICE_TMA_MIN_WORK = int(os.environ.get("SPARGE_DEVICE_TMA_MIN_WORK", str(2 ** 32)))


@triton.jit
def key_mask(s, keep_base, offs_k, k_ok, HAS_KEEP: tl.constexpr):
    """Scores on keys the key-padding mask hides (Keep[b, key] == 0) are -inf."""
    if HAS_KEEP:
        keep = tl.load(keep_base + offs_k, mask=k_ok, other=0)
        s = tl.where(keep[None, :] != 0, s, float("-inf"))
    return s


@triton.jit
def _element_masks(s, start, offs_m, Nk, row0, BLOCK_N: tl.constexpr,
                   EVEN_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """-inf on keys past Nk and, causal, on keys after the query row: only on the tiles that
    have such keys (the partial last key block; the tiles the diagonal crosses), decided per
    tile at run time (right for any order of kept blocks). The branch holds the selects alone,
    so the K/V loads stay software-pipelined. row0: the program's first query row."""
    if (not EVEN_N) or IS_CAUSAL:
        edge = start + BLOCK_N > Nk
        if IS_CAUSAL:
            edge = edge | (start + BLOCK_N - 1 > row0)
        if edge:
            offs_k = start + tl.arange(0, BLOCK_N)
            if not EVEN_N:
                s = tl.where((offs_k < Nk)[None, :], s, float("-inf"))
            if IS_CAUSAL:
                s = tl.where(offs_k[None, :] <= offs_m[:, None], s, float("-inf"))
    return s


@triton.jit
def _softmax_step(s, start, offs_m, m_i, l_i, acc, v, qk_scale, Nk, keep_base, PREC: tl.constexpr,
                  row0, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, pv_lam, q_ok, PV_FILTER: tl.constexpr):
    """Online-softmax update with raw scores s = q·kᵀ (unscaled) of the key rows start ...
    start + BLOCK_N - 1. The scale·log2(e) factor is folded into the exponent (one FMA per score).
    PV_FILTER (SpargeAttn's filter): the block is skipped (no exp, no P·V) when no real row
    (q_ok) has its block max within pv_lam (log2 units) of its running max."""
    s = _element_masks(s, start, offs_m, Nk, row0, BLOCK_N, EVEN_N, IS_CAUSAL)
    offs_k = start + tl.arange(0, BLOCK_N)
    s = key_mask(s, keep_base, offs_k, offs_k < Nk, HAS_KEEP)
    m_blk = tl.max(s, 1) * qk_scale
    if PV_FILTER:
        live = (m_blk >= m_i - pv_lam) & q_ok
        if tl.max(live.to(tl.int32), 0) > 0:
            m_i, l_i, acc = _update(s, m_blk, m_i, l_i, acc, v, qk_scale, PREC, IS_CAUSAL, HAS_KEEP)
    else:
        m_i, l_i, acc = _update(s, m_blk, m_i, l_i, acc, v, qk_scale, PREC, IS_CAUSAL, HAS_KEEP)
    return m_i, l_i, acc


@triton.jit
def _update(s, m_blk, m_i, l_i, acc, v, qk_scale, PREC: tl.constexpr, IS_CAUSAL: tl.constexpr,
            HAS_KEEP: tl.constexpr):
    m_new = tl.maximum(m_i, m_blk)
    if IS_CAUSAL or HAS_KEEP:  # a row may see no key in this tile yet
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attend(q, k_base, v_base, start, offs_d, d_ok, offs_m, m_i, l_i, acc, qk_scale, Nk,
            skn, skd, svn, svd, keep_base, PREC: tl.constexpr, row0, BLOCK_N: tl.constexpr,
            EVEN_N: tl.constexpr, EVEN: tl.constexpr,
            IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, pv_lam, q_ok, PV_FILTER: tl.constexpr):
    """One online-softmax step over the key rows start ... start + BLOCK_N - 1 (pointer loads)."""
    offs_k = start + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_k[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = v_base + offs_k[:, None] * svn + offs_d[None, :] * svd
    k_ok = offs_k < Nk
    if EVEN:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    return _softmax_step(s, start, offs_m, m_i, l_i, acc, v, qk_scale, Nk, keep_base, PREC,
                               row0, BLOCK_N, EVEN_N, IS_CAUSAL, HAS_KEEP, pv_lam, q_ok, PV_FILTER)


@triton.jit
def block_rows(BLOCK_M: tl.constexpr, TILE_M: tl.constexpr):
    """(query block, first row) of this program: a mask block runs as BLOCK_M // TILE_M programs
    of TILE_M rows each (TILE_M < BLOCK_M only where a whole block's buffers would not fit the
    shared memory, see :func:`.tuning.fit_tiles`)."""
    if TILE_M == BLOCK_M:
        i = tl.program_id(0)
        row0 = i * BLOCK_M
    else:
        i = tl.program_id(0) // (BLOCK_M // TILE_M)
        row0 = i * BLOCK_M + (tl.program_id(0) % (BLOCK_M // TILE_M)) * TILE_M
    return i, row0


@triton.jit
def tile_start(lut, t, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr):
    """First key of step t over a row's kept blocks (lut): a kept block of BLOCK_N keys is walked
    in BLOCK_N // TILE_N steps of TILE_N keys (one step per block where it fits)."""
    if TILE_N == BLOCK_N:
        start = tl.load(lut + t) * BLOCK_N
    else:
        start = tl.load(lut + t // (BLOCK_N // TILE_N)) * BLOCK_N + (t % (BLOCK_N // TILE_N)) * TILE_N
    return start


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, KvNum, KvIdx, Keep, qk_scale, pv_lam,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                Hq, G, Nq, Nk, nq, nk, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, PREC: tl.constexpr,
                EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
                HAS_KEEP: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
                DEVICE_TMA: tl.constexpr = False, PV_FILTER: tl.constexpr = False):
    qk_scale = tl.cast(qk_scale, tl.float32)   # Inductor's launches pass a Python float as fp64
    pv_lam = tl.cast(pv_lam, tl.float32)
    if DEVICE_TMA:   # K, V come as pointers: their (B, Hkv, Nk, D) descriptors are built here
        K = tl.make_tensor_descriptor(K, shape=[tl.num_programs(1) // Hq, Hq // G, Nk, D],
                                      strides=[skb, skh, skn, 1], block_shape=[1, 1, TILE_N, BLOCK_D])
        V = tl.make_tensor_descriptor(V, shape=[tl.num_programs(1) // Hq, Hq // G, Nk, D],
                                      strides=[svb, svh, svn, 1], block_shape=[1, 1, TILE_N, BLOCK_D])
    i, row0 = block_rows(BLOCK_M, TILE_M)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = row0 + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D) if not EVEN_D else (offs_d < BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=(offs_m < Nq)[:, None] & d_ok[None, :], other=0.0)
    q_ok = offs_m < Nq
    m_i = tl.full([TILE_M], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE_M], tl.float32)
    acc = tl.zeros([TILE_M, BLOCK_D], tl.float32)
    row = bh * nq + i
    n_steps = tl.load(KvNum + row) * (BLOCK_N // TILE_N)
    lut = KvIdx + row * nk
    EVEN: tl.constexpr = EVEN_N and EVEN_D
    keep_base = Keep + b * Nk   # the key-padding mask's row (B, Nk), read only with HAS_KEEP
    if USE_TMA:  # K and V are (B, Hkv, Nk, D) tensor descriptors; rows past Nk read as zeros
        for t in range(n_steps):
            start = tile_start(lut, t, BLOCK_N, TILE_N)
            k = K.load([b, hk, start, 0]).reshape(TILE_N, BLOCK_D)
            v = V.load([b, hk, start, 0]).reshape(TILE_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            m_i, l_i, acc = _softmax_step(s, start, offs_m, m_i, l_i, acc, v, qk_scale, Nk,
                                                keep_base, PREC, row0, TILE_N, EVEN_N, IS_CAUSAL,
                                                HAS_KEEP, pv_lam, q_ok, PV_FILTER)
    else:
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        for t in range(n_steps):
            start = tile_start(lut, t, BLOCK_N, TILE_N)
            m_i, l_i, acc = _attend(q, k_base, v_base, start, offs_d, d_ok, offs_m, m_i, l_i, acc,
                                    qk_scale, Nk, skn, skd, svn, svd, keep_base, PREC, row0, TILE_N,
                                    EVEN_N, EVEN,
                                    IS_CAUSAL, HAS_KEEP, pv_lam, q_ok, PV_FILTER)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / _LOG2E)
    m_ok = offs_m < Nq
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * Nq + offs_m, lse, mask=m_ok)


def keep_pointer(kv_keep, like: torch.Tensor) -> torch.Tensor:
    """The key-padding mask as the kernels read it: (B, Nk) int8, contiguous (a dummy without one)."""
    if kv_keep is None:
        return like
    return kv_keep.to(torch.int8).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no tf32), as the reference promises."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fwd_defaults(block_d: int, tma: bool = False) -> dict:
    """Fixed launch settings (no autotune: the interpreter, SPARGE_AUTOTUNE=0), measured on the
    H100: warps and pipelining stages by the head-dim tile (:func:`tuning.head_dim_tile`, so a
    padded D = 72 runs as D = 128) and by how K/V are loaded (TMA needs fewer stages in flight
    at D = 128). Pointer loads at D = 128 take 2 stages too: 3 ran 1.29 vs 0.82 ms at 32760 tokens
    (a partial last key block; the native path's launch, H200, 2026-12-02) and tied at 32768."""
    if block_d <= 64:
        return dict(num_warps=8, num_stages=3)
    return dict(num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def _tma_device(index: int) -> bool:
    """The GPU has TMA (Hopper+) and this Triton has tensor descriptors (cached: the capability
    query cost ~10 us of host time per call, six calls per forward+backward)."""
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def tma_ok(x: torch.Tensor, D: int) -> bool:
    """Hopper+ TMA loads of (1, 1, BLOCK_N, tile) boxes: CUDA, 16-byte aligned base and strides,
    unit last stride, a head dim of at least 16 bytes, and a Triton that has them. A padded head
    dim loads the box of its power-of-two tile: the columns past D read as zeros."""
    # traced for Inductor (tuning.native): off, torch 2.11's wrap_triton cannot take a host
    # TensorDescriptor (its mutation analysis fails and the graph cache hashes the fake tensor)
    if not (x.is_cuda and _tma_device(x.device.index)) or tuning.is_native():
        return False
    return tma_layout_ok(x, D)


def tma_layout_ok(x: torch.Tensor, D: int) -> bool:
    """x's layout takes (1, 1, BLOCK_N, tile) TMA boxes: unit last stride, 16-byte aligned base
    and strides, a head dim of at least 16 bytes. Traced (fake tensors have no address) the base
    is its storage offset: Inductor copies a misaligned graph input before its kernels run."""
    es = x.element_size()
    base = x.storage_offset() * es if tuning.is_native() else x.data_ptr()
    return (x.stride(-1) == 1 and D * es >= 16
            and base % 16 == 0 and all((st * es) % 16 == 0 for st in x.stride()[:-1]))


def tma_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_tma) -> str | None:
    """How the forward loads K and V: "host" descriptors, "device" ones (built in the kernel:
    traced for Inductor, or asked for; the interpreter runs them too) or None (pointer loads)."""
    D = q.shape[-1]
    if use_tma is None and tuning.is_native():
        work = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        use_tma = USE_TMA_DEFAULT and DEVICE_TMA_DEFAULT and work >= DEVICE_TMA_MIN_WORK
    elif use_tma is None:
        use_tma = USE_TMA_DEFAULT
    if not use_tma or v.shape[-1] != D:
        return None
    if use_tma == "device" or tuning.is_native():
        gpu_ok = not q.is_cuda or _tma_device(q.device.index)
        return "device" if gpu_ok and tma_layout_ok(k, D) and tma_layout_ok(v, D) else None
    return "host" if tma_ok(k, D) and tma_ok(v, D) else None


def _allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=None)
def device_tma_allocator() -> None:
    """Device-built descriptors live in global scratch memory, which Triton's launcher takes
    from the allocator set here (once per process; a torch allocation, so CUDA graphs pool it)."""
    triton.set_allocator(_allocator)


def descriptor(x: torch.Tensor, block_n: int):
    """A TMA descriptor of x (B, H, N, D) loading (1, 1, block_n, tile) boxes (tile: the head dim
    padded to a power of two), zero past N and past D."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    box = [1, 1, block_n, tuning.head_dim_tile(x.shape[-1])]
    return TensorDescriptor(x, list(x.shape), list(x.stride()), box)


_fwd_autotuned = tuning.autotuned(_fwd_kernel, tuning.FWD_CONFIGS, ["EVEN_N", "EVEN_D", "TILE_M", "TILE_N"])


def attention_fwd_triton(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, *,
                         kv_keep=None, num_warps=None, num_stages=None, use_tma=None, pv_threshold=None):
    """kv_keep: None or a (B, Nk) bool key-padding mask. Tuning knobs (the kernel-tuning
    benchmark sets them): num_warps, num_stages: fixed launch settings (default: autotuned on
    CUDA, see :mod:`.tuning`); use_tma: K/V through TMA tensor descriptors, True (host-built
    ones, device-built when traced for Inductor) or "device" (default: :func:`tma_mode`).
    pv_threshold: None, or SpargeAttn's λ (natural-log units of the scaled scores): a kept block
    is skipped when no row's block max is within λ of its running max (see _softmax_step;
    reference: :func:`sparge_compile.reference.pv_filter_mask`)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nq, nk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    BLOCK_D = tuning.head_dim_tile(D)
    row = BLOCK_D * q.element_size()  # bytes of one tile row: Q's rows stay, K/V rows per stage
    tiles = tuning.fit_tiles(block_q, block_k, row, 2 * row, q)
    if (tiles is None or tuning.wide_exact_fp32(q, BLOCK_D)
            or (pv_threshold is not None and tiles != (block_q, block_k))):  # the filter is per block
        from . import torch_impl

        return torch_impl.attention_fwd(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q,
                                        block_k, kv_keep, pv_threshold)
    out = attention_out(q, v.shape[-1])
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    mode = tma_mode(q, k, v, use_tma)
    if mode == "device" and q.is_cuda:
        device_tma_allocator()
    kk, vv = (descriptor(k, tiles[1]), descriptor(v, tiles[1])) if mode == "host" else (k, v)
    keep = keep_pointer(kv_keep, kv_num_blocks)
    lam = 0.0 if pv_threshold is None else float(pv_threshold) * LOG2E
    args = (q, kk, vv, out, lse, kv_num_blocks, kv_indices, keep, float(scale) * LOG2E, lam,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), Hq, Hq // Hkv, Nq, Nk, nq, nk, D)
    meta = dict(BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=BLOCK_D, IS_CAUSAL=bool(is_causal),
                PREC=dot_precision(q.dtype), EVEN_N=Nk % block_k == 0, EVEN_D=D == BLOCK_D,
                USE_TMA=mode is not None, HAS_KEEP=kv_keep is not None, TILE_M=tiles[0], TILE_N=tiles[1],
                DEVICE_TMA=mode == "device", PV_FILTER=pv_threshold is not None)
    fixed = fwd_defaults(BLOCK_D, mode is not None)
    stages = tuning.fit_stages(fixed["num_stages"], tiles[0] * row, 2 * tiles[1] * row, q)
    tuning.launch(_fwd_kernel, _fwd_autotuned, (nq * (block_q // tiles[0]), B * Hq), q, args, meta, num_warps,
                  num_stages, fixed=(fixed["num_warps"], stages))
    return out, lse


__all__ = ["attention_fwd_triton", "dot_precision", "fwd_defaults", "keep_pointer", "key_mask", "LOG2E",
           "tma_layout_ok", "tma_mode"]
