"""torch.library registrations: the sparse attention ops, their fake (meta) kernels and autograd.

* ``sparge::predict_block_mask``  (q, k, ...) -> (kv_num_blocks, kv_indices)      no gradient
* ``sparge::block_sparse_attention`` (q, k, v, kv_num_blocks, kv_indices, ...) -> (out, lse)  differentiable
  in q, k and v (the mask is a constant); lse is not differentiated
* ``sparge::block_sparse_attention_backward`` -> (dq, dk, dv)

Each takes an optional ``kv_keep`` (B, Nk) bool key-padding mask (False: the key is hidden); the
forward an optional ``pv_threshold`` (SpargeAttn's P·V filter λ; the backward ignores it).
torch.compile traces all three with no graph break (fake kernels give the output metadata).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels.layout import attention_out
from .reference import cdiv


@torch.library.custom_op("sparge::predict_block_mask", mutates_args=())
def predict_block_mask_op(q: Tensor, k: Tensor, scale: float, is_causal: bool, topk: float,
                          topp: float, mode: str, block_q: int, block_k: int,
                          kv_keep: Tensor | None = None, theta: float | None = None) -> tuple[Tensor, Tensor]:
    return kernels.predict_mask(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep, theta)


@predict_block_mask_op.register_fake
def _(q, k, scale, is_causal, topk, topp, mode, block_q, block_k, kv_keep=None, theta=None):
    B, H, Nq, _ = q.shape
    nq, nk = cdiv(Nq, block_q), cdiv(k.shape[2], block_k)
    return q.new_empty((B, H, nq), dtype=torch.int32), q.new_empty((B, H, nq, nk), dtype=torch.int32)


@torch.library.custom_op("sparge::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                              scale: float, is_causal: bool, block_q: int, block_k: int,
                              kv_keep: Tensor | None = None,
                              pv_threshold: float | None = None) -> tuple[Tensor, Tensor]:
    return kernels.attention_fwd(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                                 kv_keep, pv_threshold)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep=None,
      pv_threshold=None):
    out = attention_out(q, v.shape[-1])
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("sparge::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                       lse: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, scale: float,
                                       is_causal: bool, block_q: int, block_k: int,
                                       kv_keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.attention_bwd(dout.contiguous(), q, k, v, out, lse, kv_num_blocks, kv_indices, scale,
                                 is_causal, block_q, block_k, kv_keep)


@block_sparse_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep=None):
    # the kernels return contiguous gradients whatever the layout of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k = inputs[:9]
    kv_keep = inputs[9] if len(inputs) > 9 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, kv_keep)
    ctx.args = (scale, is_causal, block_q, block_k)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_num_blocks, kv_indices, kv_keep = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_backward_op(dout, q, k, v, out, lse, kv_num_blocks, kv_indices,
                                                    *ctx.args, kv_keep)
    return dq, dk, dv, None, None, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)
