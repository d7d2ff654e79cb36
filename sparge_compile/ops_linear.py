"""torch.library registration of the linear branch over the dropped blocks (issue 19).

* ``sparge::linear_dropped`` (q, k, v, kv_num_blocks, kv_indices, ...) -> O_lin   differentiable in q, k, v
* ``sparge::linear_dropped_backward`` -> (dq, dk, dv)
* ``sparge::linear_anchor`` (the branch's parameters, its spec) -> empty: the backend's marker
* ``sparge::sla_all`` (out_sparse, q, k, v, proj weight, bias, ...) -> out_sparse + proj(linear
  attention over all keys): SLA's released form (``combine="sla-all"``), differentiable in all six

O_lin is :func:`sparge_compile.linear_branch.linear_attention_dropped` of the mask's kept blocks
(the definition). Triton kernels (:mod:`.kernels.linear`) where :func:`kernels.use_triton` says so
(CUDA, or TRITON_INTERPRET=1); otherwise the PyTorch definition itself (its vjp for the backward).
torch.compile traces both ops with no graph break (fake kernels give the output metadata).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels


def _reference(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, is_causal, feature_map, eps):
    from .kernels.torch_impl import indices_to_dense
    from .linear_branch import linear_attention_dropped

    keep = indices_to_dense(kv_num_blocks, kv_indices, kv_indices.shape[-1])
    return linear_attention_dropped(q, k, v, keep, block_q, block_k, is_causal, feature_map, eps)


@torch.library.custom_op("sparge::linear_dropped", mutates_args=())
def linear_dropped_op(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                      block_q: int, block_k: int, is_causal: bool, feature_map: str, eps: float) -> Tensor:
    args = (q, k, v, kv_num_blocks, kv_indices, block_q, block_k, is_causal, feature_map, eps)
    if kernels.use_triton(q):
        from .kernels.linear import linear_fwd_triton

        return linear_fwd_triton(*args)
    with torch.no_grad():
        return _reference(*args)


@linear_dropped_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, is_causal, feature_map, eps):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("sparge::linear_dropped_backward", mutates_args=())
def linear_dropped_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor,
                               kv_indices: Tensor, block_q: int, block_k: int, is_causal: bool,
                               feature_map: str, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    args = (kv_num_blocks, kv_indices, block_q, block_k, is_causal, feature_map, eps)
    if kernels.use_triton(q):
        from .kernels.linear import linear_bwd_triton

        return linear_bwd_triton(dout.contiguous(), q, k, v, *args)
    with torch.enable_grad():
        qkv = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _reference(*qkv, *args)
        dq, dk, dv = torch.autograd.grad(out, qkv, dout)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@linear_dropped_backward_op.register_fake
def _(dout, q, k, v, kv_num_blocks, kv_indices, block_q, block_k, is_causal, feature_map, eps):
    # both paths return contiguous gradients whatever the layout of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_num_blocks, kv_indices = inputs[:5]
    ctx.save_for_backward(q, k, v, kv_num_blocks, kv_indices)
    ctx.args = inputs[5:]


def _backward(ctx, dout):
    q, k, v, kv_num_blocks, kv_indices = ctx.saved_tensors
    dq, dk, dv = linear_dropped_backward_op(dout, q, k, v, kv_num_blocks, kv_indices, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


linear_dropped_op.register_autograd(_backward, setup_context=_setup_context)



@torch.library.custom_op("sparge::linear_anchor", mutates_args=())
def linear_anchor_op(params: list[Tensor], combine: str, feature_map: str, eps: float, router: bool,
                     num_heads: int) -> Tensor:
    """A marker, not a computation: the call :class:`~sparge_compile.linear_branch.AnchorHook` makes
    under torch.compile so that Dynamo lifts a branch's parameters into the graph and records,
    with the call's nn_module_stack, which module they belong to. The arguments are the branch's
    ``params()`` and ``spec()``. Pure, with an unused empty output: the sparge backend removes it,
    AOTAutograd and Inductor drop it as dead code, Dynamo keeps it (it only drops trivial nodes)."""
    return params[0].new_empty(0)


@linear_anchor_op.register_fake
def _(params, combine, feature_map, eps, router, num_heads):
    return params[0].new_empty(0)


SLA_ALL_MAX_HEAD_DIM = 128   # sparge::sla_all's kernels up to this head dim (q's and v's)


@torch.library.custom_op("sparge::sla_all", mutates_args=())
def sla_all_op(out_s: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, bias: Tensor | None,
               feature_map: str, eps: float) -> Tensor:
    """out_s + proj(O_lin), O_lin = linear attention of every query over all keys: the Triton
    kernels of :mod:`.kernels.linear_all` where :func:`kernels.use_triton` says so and the head
    dims fit a 128-wide tile (a wider one would hold a 256 x 256 fp32 state per program; those
    kernels have not run on a GPU), else the PyTorch definition. The backward is the
    definition's (recomputed in fp32)."""
    if kernels.use_triton(q) and max(q.shape[-1], v.shape[-1]) <= SLA_ALL_MAX_HEAD_DIM:
        from .kernels.linear_all import sla_all_fwd_triton

        return sla_all_fwd_triton(out_s, q, k, v, weight, bias, feature_map, eps)
    from .linear_branch import sla_all_output

    with torch.no_grad():
        return sla_all_output(out_s, q, k, v, weight, bias, feature_map, eps).contiguous()


@sla_all_op.register_fake
def _(out_s, q, k, v, weight, bias, feature_map, eps):
    return out_s.new_empty(out_s.shape)


def _sla_all_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])   # out_s, q, k, v, weight, bias (None saves as None)
    ctx.args = inputs[6:]


def _sla_all_backward(ctx, dout):
    from .linear_branch import sla_all_output

    xs = [None if x is None else x.detach().requires_grad_() for x in ctx.saved_tensors]
    with torch.enable_grad():
        out = sla_all_output(*xs, *ctx.args)
        live = [x for x in xs if x is not None]
        grads = iter(torch.autograd.grad(out, live, dout))
    return (*[None if x is None else next(grads) for x in xs], None, None)


sla_all_op.register_autograd(_sla_all_backward, setup_context=_sla_all_setup)


__all__ = ["linear_anchor_op", "linear_dropped_backward_op", "linear_dropped_op", "sla_all_op"]
