"""FlashAttention-4 (flash_attn.cute) with the mask from SpargeBlockMask.to_fa4() computes what our
kernel computes on the same mask (bf16, H200). Skipped without a GPU or without flash_attn.cute."""
import pytest
import torch

import sparge_compile as sc
from sparge_compile.block_mask import _kv_lists
from sparge_compile.reference import visible_blocks

pytestmark = pytest.mark.gpu


def _fa4():
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:   # not installed, or its CUDA DSL cannot load
        pytest.skip(f"flash_attn.cute not importable: {e}")
    return flash_attn_func


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _run_fa4(fa4, q, k, v, m):
    res = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=q.shape[-1] ** -0.5,
              causal=m.is_causal, block_sparse_tensors=m.to_fa4())
    out = res[0] if isinstance(res, tuple) else res
    return out.transpose(1, 2)


@pytest.mark.parametrize("block_k", [128, 64])
@pytest.mark.parametrize("N,causal", [(4096, False), (4096, True), (3000, True)])
def test_fa4_with_to_fa4_equals_our_kernel(N, causal, block_k):
    fa4 = _fa4()
    torch.manual_seed(0)
    B, H, D = 1, 4, 128
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.1, topp=0.0, block_q=128, block_k=128)
    m = sc.predict_block_mask(q, k, is_causal=causal, config=cfg)
    if block_k == 64:   # our default key block, a mask whose 64-key halves agree (exactly convertible)
        dense = m.to_dense().repeat_interleave(2, -1)[..., :-(-N // 64)]
        dense &= visible_blocks(N, N, 128, 64, causal).to(dense.device)
        m = sc.SpargeBlockMask(*_kv_lists(dense), N, N, 128, 64, causal)
    assert 0.5 < m.sparsity() < 0.95
    ours = sc.sparse_attention(q, k, v, is_causal=causal, block_mask=m, config=cfg.replace(block_k=block_k))
    theirs = _run_fa4(fa4, q, k, v, m)
    want = sc.sparse_attention(q.float(), k.float(), v.float(), is_causal=causal, block_mask=m,
                               config=cfg.replace(block_k=block_k))
    assert _rel(theirs, want) < 2e-2 and _rel(ours, want) < 2e-2
    assert _rel(theirs, ours) < 2e-2


@pytest.mark.parametrize("N,causal", [(4096, False), (3000, True)])
def test_fa4_backward_lists_give_our_gradients(N, causal):
    """FA4's backward on to_fa4(backward=True) gives the gradients of our kernel on the same mask
    (both against float32 ones)."""
    fa4 = _fa4()
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.1, topp=0.0, block_q=128, block_k=128)
    m = sc.predict_block_mask(q, k, is_causal=causal, config=cfg)
    dout = torch.randn_like(q)

    def grads(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        return torch.autograd.grad(fn(*xs), xs, dout.to(dtype))

    def theirs(q, k, v):
        res = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=128 ** -0.5,
                  causal=causal, block_sparse_tensors=m.to_fa4(),
                  block_sparse_tensors_bwd=m.to_fa4(backward=True))
        return (res[0] if isinstance(res, tuple) else res).transpose(1, 2)

    def ours(q, k, v):
        return sc.sparse_attention(q, k, v, is_causal=causal, block_mask=m, config=cfg)

    want = grads(ours, torch.float32)
    for got in (grads(theirs, torch.bfloat16), grads(ours, torch.bfloat16)):
        assert all(_rel(g, w) < 2e-2 for g, w in zip(got, want))
