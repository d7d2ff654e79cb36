"""The sparse attention as ops whose kernel launches Inductor emits itself (CUDA).

Registered with ``torch.library.triton_op``: torch.compile traces their bodies, so each Triton
launch (recorded through ``wrap_triton``, see :func:`.kernels.tuning.native`) lands in
Inductor's generated code, with no Python op dispatch per call at run time. The mask takes three
launches (the Triton pooling kernel, scores, selection); with ``site_ops.GRAPH_POOL`` the graph
pools q and k with tensor ops (:func:`pool_blocks`) instead, which Inductor did not fuse into the
producer on the H200 (docs/perf-notes.md).

* ``sparge::native_block_mask`` (qb, kb, ..., knobs) -> (kv_num_blocks, kv_indices); topk/topp
  are read from the site's ``knobs`` on the device (:func:`.kernels.mask.pack_knobs`: set_config
  rewrites it in place, no recompile), and the site's ``counter`` (int64 [kept pairs, visible
  pairs, calls]), whose address the knobs hold, is added to on the device (the report reads it
  when asked; nothing syncs on the hot path). The knobs are a constant of the compiled code
  (CUDA-graph safe); both tensors are kept alive for the life of the process (:data:`_KEEP`).
* ``sparge::native_attention`` (q, k, v, kv_num_blocks, kv_indices, ...) -> (out, lse), with
  its backward ``sparge::native_attention_backward``.

The eager and CPU paths keep :mod:`.ops` (Python custom ops); the numbers are the same kernels'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from . import reference
from .kernels import tuning
from .reference import key_blocks_visible


def pool_blocks(x: Tensor, block: int, tile: int) -> Tensor:
    """(B, H, N, D) -> (B, H, ceil(N / block), tile) fp32: the mean of each block's real tokens,
    the head dim zero-padded to ``tile`` (the layout the score kernel reads). Plain tensor ops."""
    return F.pad(reference.pool_blocks(x.float(), block), (0, tile - x.shape[-1]))


_KEEP: list = []   # every site's knobs and counter: compiled code may hold their addresses


def device_buffers(topk: float, topp: float, device) -> tuple[Tensor, Tensor]:
    """A site's knobs and counter (int64 zeros(3)) on ``device``, kept alive."""
    from .kernels.mask import pack_knobs

    counter = torch.zeros(3, dtype=torch.int64, device=device)
    knobs = pack_knobs(topk, topp, counter).to(device)
    _KEEP.append((knobs, counter))
    return knobs, counter


@triton_op("sparge::native_block_mask", mutates_args={})
def native_block_mask(qb: Tensor, kb: Tensor, q_len: int, kv_len: int, scale: float, is_causal: bool,
                      mode: str, block_q: int, block_k: int, kv_keep: Tensor | None, knobs: Tensor,
                      pooled: bool = True) -> tuple[Tensor, Tensor]:
    """pooled: qb, kb are block means (:func:`pool_blocks`); False: they are q and k themselves,
    pooled here by the Triton kernel (one more launch, one more read of q and k)."""
    from .kernels.mask import block_scores_triton, pool_qk_triton, select_triton

    with tuning.native():
        if not pooled:
            qb, kb = pool_qk_triton(qb, kb, block_q, block_k)
        scores = block_scores_triton(qb, kb, scale)
        key_vis = None if kv_keep is None else key_blocks_visible(kv_keep, block_k).to(torch.int8)
        return select_triton(scores, q_len, kv_len, is_causal, 0.0, 0.0, mode, block_q, block_k,
                             key_vis=key_vis, knobs=knobs, count=True)


@triton_op("sparge::native_attention", mutates_args={})
def native_attention(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                     scale: float, is_causal: bool, block_q: int, block_k: int,
                     kv_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    from .kernels.forward import attention_fwd_triton

    with tuning.native():
        return attention_fwd_triton(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k,
                                    kv_keep=kv_keep)


@triton_op("sparge::native_attention_backward", mutates_args={})
def native_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              kv_num_blocks: Tensor, kv_indices: Tensor, scale: float, is_causal: bool,
                              block_q: int, block_k: int,
                              kv_keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    from .kernels.backward import attention_bwd_triton

    with tuning.native():
        return attention_bwd_triton(dout.contiguous(), q, k, v, out, lse, kv_num_blocks, kv_indices, scale,
                                    is_causal, block_q, block_k, kv_keep=kv_keep)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k = inputs[:9]
    kv_keep = inputs[9] if len(inputs) > 9 else None
    ctx.save_for_backward(q, k, v, *output, kv_num_blocks, kv_indices, kv_keep)
    ctx.args = (scale, is_causal, block_q, block_k)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_num_blocks, kv_indices, kv_keep = ctx.saved_tensors
    dq, dk, dv = native_attention_backward(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, *ctx.args,
                                           kv_keep)
    return dq, dk, dv, None, None, None, None, None, None, None


native_attention.register_autograd(_backward, setup_context=_setup_context)
