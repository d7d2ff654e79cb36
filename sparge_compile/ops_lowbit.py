"""The low-bit sparse attention op and its quantization-aware (QAT) backward.

* ``sparge::block_sparse_attention_lowbit`` (q, k, v, kv_num_blocks, kv_indices, ..., precision)
  -> (out, lse): the FP8 / INT8 forward (:mod:`.kernels.forward_lowbit`; on the CPU without
  Triton's interpreter its PyTorch simulation, :mod:`.kernels.quant`).

Its gradient is the bf16 gradient of the same masked attention (a straight-through estimate, as
SLA2 trains its low-bit forward): :func:`.ops.block_sparse_attention_backward_op` on the same mask,
fed the low-bit forward's out and log-sum-exp. So fine-tuning (``distill()``) under a low-bit
config adapts the model to the forward it will run. The mask and lse are not differentiated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, ops
from .kernels.layout import attention_out


@torch.library.custom_op("sparge::block_sparse_attention_lowbit", mutates_args=())
def block_sparse_attention_lowbit_op(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor,
                                     kv_indices: Tensor, scale: float, is_causal: bool, block_q: int,
                                     block_k: int, precision: str,
                                     kv_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return kernels.attention_fwd_lowbit(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q,
                                        block_k, precision, kv_keep)


@block_sparse_attention_lowbit_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, precision, kv_keep=None):
    out = attention_out(q, v.shape[-1])   # in q's layout, as both implementations return it
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


def _setup_context(ctx, inputs, output):
    """q, k, v and the mask (not the low-bit out and lse: the backward recomputes the bf16 ones)."""
    q, k, v, num, idx, scale, is_causal, block_q, block_k = inputs[:9]
    keep = inputs[10] if len(inputs) > 10 else None
    ctx.save_for_backward(q, k, v, num, idx, keep)
    ctx.args = (scale, is_causal, block_q, block_k)


def _backward(ctx, dout, dlse):
    """The bf16 op's backward (:func:`ops.block_sparse_attention_backward_op`) on the bf16
    forward's out and log-sum-exp, recomputed here on the same mask: the low-bit forward's lse
    is that of the quantized scores (off by up to 0.77 on structured inputs, H200), and the bf16
    backward's P = exp(s - lse) is normalised only with the bf16 one. No gradient for ``precision``."""
    q, k, v, num, idx, keep = ctx.saved_tensors
    with torch.no_grad():
        out, lse = ops.block_sparse_attention_op(q, k, v, num, idx, *ctx.args, keep)
    dq, dk, dv = ops.block_sparse_attention_backward_op(dout, q, k, v, out, lse, num, idx, *ctx.args, keep)
    return dq, dk, dv, None, None, None, None, None, None, None, None


block_sparse_attention_lowbit_op.register_autograd(_backward, setup_context=_setup_context)
