"""The public functions: sparse_attention and predict_block_mask."""
from __future__ import annotations

import torch

from . import ops
from .block_mask import SpargeBlockMask
from .config import DEFAULT_CONFIG, SpargeConfig
from .validate import check_qkv


def _config(config: SpargeConfig | None) -> SpargeConfig:
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, SpargeConfig):
        raise TypeError(f"config must be a SpargeConfig, got {type(config).__name__}")
    return config


def predict_block_mask(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                       is_causal: bool = False, config: SpargeConfig | None = None) -> SpargeBlockMask:
    """Predict the hybrid Top-k + Top-p block mask from mean-pooled Q/K blocks.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) with Hq % Hkv == 0.
    Returns a :class:`SpargeBlockMask` with kv_num_blocks (B, Hq, nq) and kv_indices
    (B, Hq, nq, nk), nq = ceil(Nq / block_q), nk = ceil(Nk / block_k).
    """
    cfg = _config(config)
    scale = check_qkv(q, k, None, scale)
    num, idx = ops.predict_block_mask_op(q.detach(), k.detach(), scale, bool(is_causal), cfg.topk,
                                         cfg.topp, cfg.mode, cfg.block_q, cfg.block_k)
    return SpargeBlockMask(num, idx, q.shape[2], k.shape[2], cfg.block_q, cfg.block_k, bool(is_causal))


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     is_causal: bool = False, config: SpargeConfig | None = None,
                     block_mask: SpargeBlockMask | None = None, return_mask: bool = False):
    """Block-sparse attention with the hybrid Top-k + Top-p mask, a drop-in for SDPA.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq % Hkv == 0; fp16, bf16 or fp32;
    D in {32, 64, 96, 128, 256}. Returns (B, Hq, Nq, D) in q's dtype: exactly attention with
    every score outside the kept blocks at -inf. Differentiable in q, k, v (the mask is not).
    block_mask: use this mask instead of predicting one. return_mask: also return the mask.
    """
    cfg = _config(config)
    scale = check_qkv(q, k, v, scale)
    if block_mask is None:
        num, idx = ops.predict_block_mask_op(q.detach(), k.detach(), scale, bool(is_causal), cfg.topk,
                                             cfg.topp, cfg.mode, cfg.block_q, cfg.block_k)
        bq, bk = cfg.block_q, cfg.block_k
    else:
        num, idx, bq, bk = block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.block_q, block_mask.block_k
    out, _ = ops.block_sparse_attention_op(q, k, v, num, idx, scale, bool(is_causal), bq, bk)
    if return_mask:
        return out, SpargeBlockMask(num, idx, q.shape[2], k.shape[2], bq, bk, bool(is_causal))
    return out
