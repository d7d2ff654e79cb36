"""Kernels behind the ops: Triton on CUDA (or on the CPU under TRITON_INTERPRET=1), otherwise
the chunked PyTorch implementation in :mod:`torch_impl`.

* :mod:`.mask`      Triton mask prediction: block pooling, block scores, hybrid Top-k+Top-p
* :mod:`.forward`   Triton sparse forward (online softmax over the kept key blocks)
* :mod:`.backward`  Triton sparse backward (dQ; dK/dV over the transposed index)
* :mod:`.forward_lowbit`, :mod:`.quant_triton`  the low-bit (FP8 / INT8) forward and its
  quantization pass; :mod:`.quant` their math, float64 reference and CPU path
"""
from __future__ import annotations

import os

import torch

from . import _interpreter, torch_impl

_interpreter.install()


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (tests, CI)."""
    if t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def predict_mask(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep=None, theta=None):
    """kv_keep: None, or a (B, Nk) bool key-padding mask (key blocks of padding alone are dropped).
    theta: None, or SpargeAttn's self-similarity threshold (reference.never_dropped)."""
    if not use_triton(q):
        return torch_impl.predict_mask(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep,
                                       theta)
    from .mask import predict_mask_triton

    num, idx = predict_mask_triton(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep)
    if theta is None:
        return num, idx
    # the judge's blocks, added to the selection with torch ops (not fused into the kernels yet)
    from ..reference import never_dropped, visible

    nk = idx.shape[-1]
    vis = visible(q, k, block_q, block_k, is_causal, kv_keep)
    kept = never_dropped(q, k, block_q, block_k, theta, vis)
    return torch_impl.dense_to_indices(torch_impl.indices_to_dense(num, idx, nk) | kept)


def attention_fwd(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep=None,
                  pv_threshold=None):
    """kv_keep: None, or a (B, Nk) bool key-padding mask (hidden keys masked element-wise).
    pv_threshold: None, or SpargeAttn's P·V filter λ (:func:`..reference.pv_filter_blocks`)."""
    if use_triton(q):
        from .forward import attention_fwd_triton

        return attention_fwd_triton(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                                    kv_keep=kv_keep, pv_threshold=pv_threshold)
    return torch_impl.attention_fwd(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                                    kv_keep, pv_threshold)


def attention_bwd(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                  kv_keep=None):
    if use_triton(q):
        from .backward import attention_bwd_triton

        return attention_bwd_triton(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal,
                                    block_q, block_k, kv_keep=kv_keep)
    return torch_impl.attention_bwd(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal,
                                    block_q, block_k, kv_keep)


def attention_fwd_lowbit(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, precision,
                         kv_keep=None):
    """The low-bit forward ("fp8" or "int8"): (out in q's dtype, lse float32)."""
    if use_triton(q):
        from .forward_lowbit import attention_fwd_lowbit_triton

        return attention_fwd_lowbit_triton(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q,
                                           block_k, precision, kv_keep=kv_keep)
    from .quant import lowbit_attention_torch

    return lowbit_attention_torch(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                                  precision, kv_keep)
