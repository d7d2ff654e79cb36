"""The per-site run-time ops: what a graph the backend rewrote calls at run time.

* ``sparge::site_block_mask``: predicts a site's block mask (through ``sparge::predict_block_mask``)
  with the site's *current* topk/topp/mode, and records the mask for the report (a reference to
  the index tensors, no device sync). Reading the config at run time is what lets topk/topp/mode
  change without a recompile; block sizes fix output shapes and stay compile-time constants.
* :func:`site_attention`: the replacement of one attention site (traced by AOTAutograd). On a
  device in ``NATIVE_DEVICES`` (CUDA) with static shapes it calls :mod:`.native_ops` instead,
  whose kernel launches Inductor emits itself; the site's topk/topp and its measured counts then
  live in device tensors (``SiteState.knobs`` / ``counter``), and its mode is fixed.
* :func:`mha_forward`: ``F.multi_head_attention_forward`` with its attention made sparse.
* ``sparge::site_capture`` / :func:`site_capture_attention`: what a site calls in the graphs
  :func:`sparge_compile.calibrate` compiles: dense attention, with q, k, v handed to the hook
  of the site's backend (``SpargeBackend.capturing``) on the way.

Each site's :class:`SiteState` is owned by the backend that rewrote it (through its reports);
the registry here only maps the key the graph carries to it, weakly, so nothing outlives its
backend.
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import ops
from .config import SpargeConfig
from .reference import cdiv

MAX_TAGS = 64   # owner tags remembered per site (which models ran it; see SiteState.tags)
# Devices whose compiled sites launch the kernels from Inductor's own code (native_ops); the
# tests add "cpu" (Triton's interpreter, eager graphs). SPARGE_NATIVE=0: the Python ops everywhere.
NATIVE_DEVICES = {"cuda"} if os.environ.get("SPARGE_NATIVE", "1") == "1" else set()
# Native sites pool q and k with graph ops (Inductor may fuse them into the producer) when 1;
# the default, the Triton pooling kernel, measured faster on the H200 (docs/perf-notes.md).
GRAPH_POOL = os.environ.get("SPARGE_GRAPH_POOL", "0") == "1"


@dataclass(eq=False)
class SiteState:
    """Run-time state of one rewritten site: its config, the last mask it used, who ran it."""

    config: SpargeConfig
    kv_num_blocks: Tensor | None = None
    kv_indices: Tensor | None = None
    q_len: int = 0
    kv_len: int = 0
    is_causal: bool = False
    calls: int = 0
    record: bool = True   # keep a reference to the last mask (for the report's measured sparsity)
    hook: object = None   # capture sites: fn(key, q, k, v, scale, is_causal) -> out | None
    tags: set = field(default_factory=set)   # data_ptr of a parameter of each model that ran it
    knobs: Tensor | None = None     # native sites: kernels.mask.pack_knobs(topk, topp, counter)
    counter: Tensor | None = None   # native sites: int64 [kept pairs, visible pairs, calls]
    native: bool = False            # traced with native_ops (mode and theta fixed at compile time)
    per_owner: object = None   # fn(state, owner) -> SpargeConfig: a plan applied per module instance

    def measured(self) -> tuple[int, int, int] | None:
        """(kept, visible, calls) summed over the native calls so far (one device read), or None."""
        if not self.native or self.counter is None:
            return None
        kept, vis, calls = (int(x) for x in self.counter.tolist())
        return kept, vis, calls

    def config_for(self, owner: Tensor | None) -> SpargeConfig:
        """This call's config: the site's, or (``per_owner``, see sparge_compile.plan_scope) the
        choice for the module instance that owns ``owner``. Called before the mask is predicted."""
        return self.config if self.per_owner is None else self.per_owner(self, owner)

    def tag(self, owner: Tensor | None) -> None:
        if owner is not None and len(self.tags) < MAX_TAGS:
            self.tags.add(owner.data_ptr())


_SITES: "weakref.WeakValueDictionary[str, SiteState]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()
_COUNTER = [0]


def new_site(prefix: str, config: SpargeConfig) -> tuple[str, SiteState]:
    """A fresh key and its state; the caller keeps the state alive (the registry is weak)."""
    st = SiteState(config=config)
    with _LOCK:
        _COUNTER[0] += 1
        key = f"{prefix}#{_COUNTER[0]}"
        _SITES[key] = st
    return key, st


def _state(key: str) -> SiteState:
    st = _SITES.get(key)
    if st is None:
        raise RuntimeError(f"sparge: attention site {key!r} belongs to a backend that no longer exists; "
                           "compile the model again (torch._dynamo.reset() first)")
    return st


@torch.library.custom_op("sparge::site_block_mask", mutates_args=())
def site_block_mask(q: Tensor, k: Tensor, scale: float, is_causal: bool, block_q: int, block_k: int,
                    site: str, owner: Tensor | None = None,
                    kv_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    st = _state(site)
    cfg = st.config_for(owner)
    kv_num_blocks, kv_indices = ops.predict_block_mask_op(q, k, scale, is_causal, cfg.topk, cfg.topp,
                                                          cfg.mode, block_q, block_k, kv_keep, cfg.theta)
    # record=False under CUDA graphs (backend option record_masks): the graph's memory pool,
    # eager warm-up runs included, may hold no untracked references
    st.kv_num_blocks, st.kv_indices = (kv_num_blocks, kv_indices) if st.record else (None, None)
    st.q_len, st.kv_len, st.is_causal = q.shape[2], k.shape[2], is_causal
    st.calls += 1
    st.tag(owner)
    return kv_num_blocks, kv_indices


@site_block_mask.register_fake
def _(q, k, scale, is_causal, block_q, block_k, site, owner=None, kv_keep=None):
    B, H, Nq, _ = q.shape
    nq, nk = cdiv(Nq, block_q), cdiv(k.shape[2], block_k)
    return (q.new_empty((B, H, nq), dtype=torch.int32), q.new_empty((B, H, nq, nk), dtype=torch.int32))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool) -> Tensor:
    """SDPA on op-layout (B, Hq, N, D) tensors, GQA aware."""
    gqa = q.shape[1] != k.shape[1]
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal)


@torch.library.custom_op("sparge::site_capture", mutates_args=())
def site_capture(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool, block_q: int, block_k: int,
                 site: str, owner: Tensor | None = None) -> Tensor:
    st = _state(site)
    st.calls += 1
    st.tag(owner)
    out = st.hook(site, q, k, v, scale, is_causal) if st.hook is not None else None
    if out is None:
        out = dense_attention(q, k, v, scale, is_causal)
    if any(out is t for t in (q, k, v)):   # a custom op may not return an input
        out = out.clone()
    return out.contiguous()   # the layout the fake kernel gives


@site_capture.register_fake
def _(q, k, v, scale, is_causal, block_q, block_k, site, owner=None):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _combine_scale(parts, head_dim):
    """Product of the scale factors [("mul"|"div", value), ...]; None parts -> SDPA's default."""
    scale = 1.0
    for op, val in parts:
        if val is None:
            val, op = head_dim, "rsqrt"
        if op == "mul":
            scale = scale * val
        elif op == "div":
            scale = scale / val
        elif op == "rsqrt":
            scale = scale / math.sqrt(val) if isinstance(val, (int, float)) else scale / torch.sym_sqrt(val)
    return scale


def _op_layout(q, k, v, scale_parts):
    """(q, k, v) as rank 4 and the scale as a float (a symbolic scale pre-scales q, scale 1)."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    scale = _combine_scale(scale_parts, q.shape[-1])
    if not isinstance(scale, (int, float)):
        q = q * scale
        scale = 1.0
    return q, k, v, float(scale), squeeze


def _owner(owner):
    """The owner tag as the ops take it: a plain tensor (a tensor subclass such as a torchao
    quantized weight cannot enter a custom op that has no rule for it: no tag then)."""
    if owner is None or is_traceable_wrapper_subclass(owner):
        return None
    return owner.detach()


def _key_padding(kv_keep, q: Tensor, k: Tensor):
    """A key-padding mask as the graph has it ((B | 1, 1, ..., 1, Nk), bool) as the op takes it:
    (B, Nk) bool."""
    if kv_keep is None:
        return None
    keep = kv_keep.reshape(kv_keep.shape[0], kv_keep.shape[-1]).to(torch.bool)
    return keep.expand(q.shape[0], k.shape[2])


def _native(q: Tensor, k: Tensor, keep, st: SiteState) -> bool:
    """The native path where it ran on the GPU: static shapes, no key padding, no per-instance
    plan (chosen in Python), no theta judge, no P·V filter, no capture hook, bf16; otherwise the
    Python ops."""
    static = all(isinstance(n, int) for n in (*q.shape, *k.shape))
    return (st.knobs is not None and q.device.type in NATIVE_DEVICES and static and keep is None
            and st.config.theta is None and st.hook is None and st.per_owner is None
            and st.config.precision == "bf16" and st.config.pv_threshold is None)


def _native_site(q, k, v, scale, causal, keep, block_q, block_k, st):
    """The site through :mod:`.native_ops`: the mask in three launches (pool, scores, select; with
    GRAPH_POOL the pooling is graph ops and two), then the forward."""
    from . import native_ops
    from .kernels.tuning import head_dim_tile

    st.native = True
    qb, kb = q.detach(), k.detach()
    if GRAPH_POOL:
        tile = head_dim_tile(q.shape[-1])
        qb, kb = native_ops.pool_blocks(qb, block_q, tile), native_ops.pool_blocks(kb, block_k, tile)
    mask = native_ops.native_block_mask(qb, kb, q.shape[2], k.shape[2], scale, causal, st.config.mode,
                                        block_q, block_k, keep, st.knobs, GRAPH_POOL)
    out, _ = native_ops.native_attention(q, k, v, *mask, scale, causal, block_q, block_k, keep)
    return out


def site_attention(q: Tensor, k: Tensor, v: Tensor, scale_parts, is_causal: bool, block_q: int,
                   block_k: int, site: str, owner: Tensor | None = None, kv_keep=None) -> Tensor:
    """Sparse attention for a site: q (..., Nq, D), k/v (..., Nk, D), rank 3 or 4.

    scale_parts: factors whose product is the softmax scale (a symbolic size is allowed: then
    q is pre-scaled and the op runs with scale 1, which is the same function).
    owner: a parameter of the model the graph belongs to (tells ``explain`` which model ran it).
    kv_keep: the site's key-padding mask ((B | 1, 1, 1, Nk) bool, True: the key is seen), or None.
    A site with device buffers (``SiteState.knobs``, made by the rewrite for a device in
    NATIVE_DEVICES) runs through :mod:`.native_ops`; its mode and theta are fixed here.
    """
    q, k, v, scale, squeeze = _op_layout(q, k, v, scale_parts)
    causal, keep = bool(is_causal), _key_padding(kv_keep, q, k)
    st = _state(site)
    if _native(q, k, keep, st):
        out = _native_site(q, k, v, scale, causal, keep, block_q, block_k, st)
        return out.squeeze(0) if squeeze else out
    mask = site_block_mask(q.detach(), k.detach(), scale, causal, block_q, block_k, site, _owner(owner), keep)
    if st.config.precision != "bf16":   # the low-bit forward with the bf16 gradient (fixed at compile time)
        from .ops_lowbit import block_sparse_attention_lowbit_op

        out, _ = block_sparse_attention_lowbit_op(q, k, v, *mask, scale, causal, block_q, block_k,
                                                  st.config.precision, keep)
    else:
        out, _ = ops.block_sparse_attention_op(q, k, v, *mask, scale, causal, block_q, block_k, keep,
                                               st.config.pv_threshold)
    return out.squeeze(0) if squeeze else out


def site_linear_attention(q: Tensor, k: Tensor, v: Tensor, scale_parts, is_causal: bool, block_q: int,
                          block_k: int, site: str, owner: Tensor | None, params: list, combine: str,
                          feature_map: str, eps: float, router: bool, num_heads: int) -> Tensor:
    """:func:`site_attention` of a site whose module carries a linear branch (SLA / SLA2, see
    :mod:`sparge_compile.linear_branch`): the site's mask (predicted from the routed q, k when the
    branch has a router), the sparse op, and the branch over the blocks the mask drops, with the
    branch's parameters (``params``, graph inputs: their gradients flow) and spec. The Python ops
    on every device (no native path); no key padding (the pass keeps such sites sparse-only).
    """
    from .linear_branch import route_qk, with_linear

    q0 = q.unsqueeze(0) if q.dim() == 3 else q
    q, k, v, scale, squeeze = _op_layout(q, k, v, scale_parts)
    causal, st = bool(is_causal), _state(site)
    rq, rk = route_qk(q, k, params, combine, router)
    mask = site_block_mask(rq.detach(), rk.detach(), scale, causal, block_q, block_k, site, _owner(owner))
    if st.config.precision != "bf16":
        from .ops_lowbit import block_sparse_attention_lowbit_op

        out, _ = block_sparse_attention_lowbit_op(q, k, v, *mask, scale, causal, block_q, block_k,
                                                  st.config.precision, None)
    else:
        out, _ = ops.block_sparse_attention_op(q, k, v, *mask, scale, causal, block_q, block_k, None,
                                               st.config.pv_threshold)
    out = with_linear(out, q, k, v, *mask, scale, causal, block_q, block_k, params, combine, feature_map, eps,
                      router, num_heads, q_lin=None if q0 is q else q0)
    return out.squeeze(0) if squeeze else out


def site_capture_attention(q: Tensor, k: Tensor, v: Tensor, scale_parts, is_causal: bool, block_q: int,
                           block_k: int, site: str, owner: Tensor | None = None) -> Tensor:
    """The calibration stand-in for :func:`site_attention`: dense attention, q/k/v captured."""
    q, k, v, scale, squeeze = _op_layout(q, k, v, scale_parts)
    out = site_capture(q, k, v, scale, bool(is_causal), block_q, block_k, site, _owner(owner))
    return out.squeeze(0) if squeeze else out


def mha_forward(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                out_proj_bias, use_separate_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight,
                block_q: int, block_k: int, site: str, capture: bool = False, is_causal: bool = False):
    """``F.multi_head_attention_forward`` for the plain case (no masks, no bias_k/v, no dropout).

    query (L, N, E) or (L, E); returns (attn_output, None) like the original with weights unused.
    capture: the calibration stand-in (dense attention, q/k/v captured).
    is_causal: causal attention (the site's attn_mask came with PyTorch's is_causal=True promise).
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    if not use_separate_proj_weight:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight,
                                   b_q, b_k, b_v)
    q = q.view(tgt_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.view(src_len, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    attend = site_capture_attention if capture else site_attention
    out = attend(q, k, v, [("mul", None)], is_causal, block_q, block_k, site, in_proj_weight
                 if in_proj_weight is not None else q_proj_weight)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, embed_dim)
    if unbatched:
        out = out.squeeze(1)
    return out, None
