"""FlashAttention-4's block-sparse kernel (``flash_attn.cute``, ``flash-attn-4``) as a peer.

FA4 runs 128x128 sparse blocks on Hopper; the mask reaches it through ``SpargeBlockMask.to_fa4()``
(forward lists) and ``to_fa4(backward=True)`` (its backward lists). On a machine without it
:func:`fa4_or_none` records why and the benchmarks go on without the peer.
"""
from __future__ import annotations

FA4_BLOCK = 128   # FA4's sparse block on Hopper, queries and keys


def fa4_or_none(device, errors: dict):
    """FA4's ``flash_attn_func``, or None with the reason in ``errors["fa4_import"]``."""
    if device.type != "cuda":
        errors["fa4_import"] = "FA4 needs a CUDA GPU"
        return None
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:   # not installed, or its CUDA DSL cannot load here
        errors["fa4_import"] = f"{type(e).__name__}: {e}"[:300]
        return None
    return flash_attn_func


def fa4_call(fa4, q, k, v, mask):
    """A no-argument call of FA4 on ``mask`` with our (B, H, N, D) tensors (FA4 takes
    (B, N, H, D)); the output comes back as (B, H, N, D). Differentiable (FA4's own backward)."""
    fwd, bwd = mask.to_fa4(), mask.to_fa4(backward=True)

    def call():
        res = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=q.shape[-1] ** -0.5,
                  causal=mask.is_causal, block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd)
        return (res[0] if isinstance(res, tuple) else res).transpose(1, 2)
    return call
