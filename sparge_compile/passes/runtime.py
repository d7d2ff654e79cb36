"""What a rewritten graph calls at run time.

* ``sparge::site_block_mask``: predicts a site's block mask (through ``sparge::predict_block_mask``)
  with the site's *current* topk/topp/mode, and records the mask for the report (a reference to
  the index tensors, no device sync). Reading the config at run time is what lets topk/topp/mode
  change without a recompile; block sizes fix output shapes and stay compile-time constants.
* :func:`site_attention`: the replacement of one attention site (traced by AOTAutograd).
* :func:`mha_forward`: ``F.multi_head_attention_forward`` with its attention made sparse.
* ``sparge::site_capture`` / :func:`site_capture_attention`: what a site calls in the graphs
  :func:`sparge_compile.calibrate` compiles: dense attention, with q, k, v handed to the active
  capture hook (:func:`capture_hook`) on the way.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import SpargeConfig
from ..reference import cdiv


@dataclass
class SiteState:
    """Run-time state of one rewritten site: its config and the last mask it used."""

    config: SpargeConfig
    kv_num: Tensor | None = None
    kv_idx: Tensor | None = None
    q_len: int = 0
    kv_len: int = 0
    is_causal: bool = False
    calls: int = 0
    record: bool = True   # keep a reference to the last mask (for the report's measured sparsity)


_SITES: dict[str, SiteState] = {}
_LOCK = threading.Lock()
_COUNTER = [0]


def new_site_key(prefix: str) -> str:
    with _LOCK:
        _COUNTER[0] += 1
        return f"{prefix}#{_COUNTER[0]}"


def register_site(key: str, config: SpargeConfig) -> SiteState:
    st = SiteState(config=config)
    _SITES[key] = st
    return st


def site_state(key: str) -> SiteState | None:
    return _SITES.get(key)


@torch.library.custom_op("sparge::site_block_mask", mutates_args=())
def site_block_mask(q: Tensor, k: Tensor, scale: float, is_causal: bool, block_q: int, block_k: int,
                    site: str) -> tuple[Tensor, Tensor]:
    st = _SITES.get(site)
    cfg = st.config if st is not None else SpargeConfig(block_q=block_q, block_k=block_k)
    num, idx = ops.predict_block_mask_op(q, k, scale, is_causal, cfg.topk, cfg.topp, cfg.mode,
                                         block_q, block_k)
    if st is not None:
        # record=False under CUDA graphs (backend option record_masks): the graph's memory pool,
        # eager warm-up runs included, may hold no untracked references
        st.kv_num, st.kv_idx = (num, idx) if st.record else (None, None)
        st.q_len, st.kv_len, st.is_causal = q.shape[2], k.shape[2], is_causal
        st.calls += 1
    return num, idx


@site_block_mask.register_fake
def _(q, k, scale, is_causal, block_q, block_k, site):
    B, H, Nq, _ = q.shape
    nq, nk = cdiv(Nq, block_q), cdiv(k.shape[2], block_k)
    return (q.new_empty((B, H, nq), dtype=torch.int32), q.new_empty((B, H, nq, nk), dtype=torch.int32))


_CAPTURE: list = []   # the active capture hook(s); the innermost one receives the calls


class capture_hook:
    """Context: ``sparge::site_capture`` calls ``fn(site_key, q, k, v, scale, is_causal)``.

    ``fn`` returns the attention output (or None for plain dense attention).
    """

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        _CAPTURE.append(self.fn)
        return self

    def __exit__(self, *exc):
        _CAPTURE.remove(self.fn)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool) -> Tensor:
    """SDPA on op-layout (B, Hq, N, D) tensors, GQA aware."""
    gqa = q.shape[1] != k.shape[1]
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal)


@torch.library.custom_op("sparge::site_capture", mutates_args=())
def site_capture(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool, block_q: int, block_k: int,
                 site: str) -> Tensor:
    st = _SITES.get(site)
    if st is not None:
        st.calls += 1
    out = _CAPTURE[-1](site, q, k, v, scale, is_causal) if _CAPTURE else None
    if out is None:
        out = dense_attention(q, k, v, scale, is_causal)
    if any(out is t for t in (q, k, v)):   # a custom op may not return an input
        out = out.clone()
    return out.contiguous()   # the layout the fake kernel gives


@site_capture.register_fake
def _(q, k, v, scale, is_causal, block_q, block_k, site):
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


def site_attention(q: Tensor, k: Tensor, v: Tensor, scale_parts, is_causal: bool, block_q: int,
                   block_k: int, site: str) -> Tensor:
    """Sparse attention for a site: q (..., Nq, D), k/v (..., Nk, D), rank 3 or 4.

    scale_parts: factors whose product is the softmax scale (a symbolic size is allowed: then
    q is pre-scaled and the op runs with scale 1, which is the same function).
    """
    q, k, v, scale, squeeze = _op_layout(q, k, v, scale_parts)
    num, idx = site_block_mask(q.detach(), k.detach(), scale, bool(is_causal), block_q, block_k, site)
    out, _ = ops.block_sparse_attention_op(q, k, v, num, idx, scale, bool(is_causal), block_q, block_k)
    return out.squeeze(0) if squeeze else out


def site_capture_attention(q: Tensor, k: Tensor, v: Tensor, scale_parts, is_causal: bool, block_q: int,
                           block_k: int, site: str) -> Tensor:
    """The calibration stand-in for :func:`site_attention`: dense attention, q/k/v captured."""
    q, k, v, scale, squeeze = _op_layout(q, k, v, scale_parts)
    out = site_capture(q, k, v, scale, bool(is_causal), block_q, block_k, site)
    return out.squeeze(0) if squeeze else out


def mha_forward(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
                out_proj_bias, use_separate_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight,
                block_q: int, block_k: int, site: str, capture: bool = False):
    """``F.multi_head_attention_forward`` for the plain case (no masks, no bias_k/v, no dropout).

    query (L, N, E) or (L, E); returns (attn_output, None) like the original with weights unused.
    capture: the calibration stand-in (dense attention, q/k/v captured).
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
    out = attend(q, k, v, [("mul", None)], False, block_q, block_k, site)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, embed_dim)
    if unbatched:
        out = out.squeeze(1)
    return out, None
