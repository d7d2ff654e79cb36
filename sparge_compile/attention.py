"""The public functions: sparse_attention and predict_block_mask."""
from __future__ import annotations

import torch

from . import kernels, ops
from .block_mask import SpargeBlockMask
from .config import DEFAULT_CONFIG, SpargeConfig
from .validate import check_block_mask, check_flag, check_kv_keep, check_precision, check_qkv


def _config(config: SpargeConfig | None) -> SpargeConfig:
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, SpargeConfig):
        raise TypeError(f"config must be a SpargeConfig, got {type(config).__name__}")
    return config


class _EagerSparseAttention(torch.autograd.Function):
    """The same kernels as the ops in :mod:`.ops`, without their torch.library dispatch: eager
    calls take this path (the dispatch cost ~100 us of host time per op on the H100 machine,
    docs/perf-notes.md); anything torch.compile traces goes through the ops."""

    @staticmethod
    def forward(ctx, q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep,
                pv_threshold=None):
        out, lse = kernels.attention_fwd(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q,
                                         block_k, kv_keep, pv_threshold)
        ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, kv_keep)
        ctx.args = (scale, is_causal, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kv_num_blocks, kv_indices, kv_keep = ctx.saved_tensors
        dq, dk, dv = kernels.attention_bwd(dout.contiguous(), q, k, v, out, lse, kv_num_blocks, kv_indices,
                                           *ctx.args, kv_keep)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _predict(q, k, scale, is_causal, cfg, kv_keep=None):
    args = (q.detach(), k.detach(), scale, bool(is_causal), cfg.topk, cfg.topp, cfg.mode, cfg.block_q,
            cfg.block_k, kv_keep, cfg.theta)
    if torch.compiler.is_compiling():
        return ops.predict_block_mask_op(*args)
    return kernels.predict_mask(*args)


def _attend(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, block_q, block_k, kv_keep=None,
            precision="bf16", pv_threshold=None):
    if precision != "bf16":  # the low-bit forward, its bf16 gradient (QAT): always through its op
        from .ops_lowbit import block_sparse_attention_lowbit_op

        return block_sparse_attention_lowbit_op(q, k, v, kv_num_blocks, kv_indices, scale, bool(is_causal),
                                                block_q, block_k, precision, kv_keep)[0]
    args = (q, k, v, kv_num_blocks, kv_indices, scale, bool(is_causal), block_q, block_k, kv_keep,
            pv_threshold)
    if torch.compiler.is_compiling():
        return ops.block_sparse_attention_op(*args)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerSparseAttention.apply(*args)
    return kernels.attention_fwd(*args)[0]


def predict_block_mask(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                       is_causal: bool = False, config: SpargeConfig | None = None,
                       kv_keep: torch.Tensor | None = None) -> SpargeBlockMask:
    """Predict the hybrid Top-k + Top-p block mask from mean-pooled Q/K blocks.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) with Hq % Hkv == 0.
    kv_keep: None, or a (B, Nk) bool key-padding mask, True where a key is attended (a
    tokenizer's attention_mask; the opposite of nn.MultiheadAttention's key_padding_mask): key
    blocks of padding alone are never kept.
    Returns a :class:`SpargeBlockMask` with kv_num_blocks (B, Hq, nq) and kv_indices
    (B, Hq, nq, nk), nq = ceil(Nq / block_q), nk = ceil(Nk / block_k).
    """
    cfg = _config(config)
    check_flag("is_causal", is_causal)
    scale = check_qkv(q, k, None, scale)
    check_kv_keep(kv_keep, q, k)
    kv_num_blocks, kv_indices = _predict(q, k, scale, is_causal, cfg, kv_keep)
    return SpargeBlockMask(kv_num_blocks, kv_indices, q.shape[2], k.shape[2], cfg.block_q, cfg.block_k,
                           bool(is_causal))._trusted()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     is_causal: bool = False, config: SpargeConfig | None = None,
                     block_mask: SpargeBlockMask | None = None, return_mask: bool = False,
                     kv_keep: torch.Tensor | None = None, precision: str | None = None):
    """Block-sparse attention with the hybrid Top-k + Top-p mask, a drop-in for SDPA.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq % Hkv == 0; fp16, bf16 or fp32;
    D a multiple of 8 up to 256. Returns (B, Hq, Nq, D) in q's dtype: exactly attention with
    every score outside the kept blocks at -inf. Differentiable in q, k, v (the mask is not).
    block_mask: use this mask instead of predicting one. return_mask: also return the mask.
    kv_keep: None, or a (B, Nk) bool key-padding mask, True where a key is attended (see
    :func:`predict_block_mask`); hidden keys are masked element-wise, a row that sees no key gives 0.
    precision: None (the config's), "bf16", or a low-bit forward, "fp8" / "int8" (see
    :class:`SpargeConfig`): then the output is the low-bit approximation of that attention
    (relative error ~1e-2 .. 4e-2) and the gradient the bf16 one of the same masked attention.
    """
    cfg = _config(config)
    precision = cfg.precision if precision is None else check_precision("precision", precision)
    if precision != "bf16" and cfg.pv_threshold is not None:
        raise ValueError(f"sparse_attention: config.pv_threshold (the P·V filter) runs in the bf16 forward "
                         f"only, not with precision={precision!r}")
    check_flag("is_causal", is_causal)
    check_flag("return_mask", return_mask)
    scale = check_qkv(q, k, v, scale)
    check_kv_keep(kv_keep, q, k)
    if block_mask is None:
        kv_num_blocks, kv_indices = _predict(q, k, scale, is_causal, cfg, kv_keep)
        bq, bk = cfg.block_q, cfg.block_k
    else:
        check_block_mask(block_mask, q, k)
        kv_num_blocks, kv_indices = block_mask.kv_num_blocks, block_mask.kv_indices
        bq, bk = block_mask.block_q, block_mask.block_k
    out = _attend(q, k, v, kv_num_blocks, kv_indices, scale, is_causal, bq, bk, kv_keep, precision,
                  cfg.pv_threshold)
    if return_mask:
        mask = block_mask if block_mask is not None else SpargeBlockMask(
            kv_num_blocks, kv_indices, q.shape[2], k.shape[2], bq, bk, bool(is_causal))._trusted()
        return out, mask
    return out
