"""SpargeBlockMask.to_fa4(): FlashAttention-4's block-sparse tensors (CPU: the format).

The FA4 tensors are decoded here independently (each listed block -> its tokens, the causal mask
applied as FA4 applies it with causal=True) and the token mask must equal ours exactly; full
blocks must be wholly visible and partial ones crossed by the diagonal. tests/test_fa4_gpu.py
runs FA4 itself on the mask against our kernel.
"""
import pytest
import torch

import sparge_compile as sc
from sparge_compile.block_mask import _kv_lists
from sparge_compile.fa4 import FIELDS
from sparge_compile.reference import dense_token_mask, visible_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def fa4_token_mask(t, q_len, kv_len, causal):
    """(B, H, Nq, Nk) bool: the pairs FA4 computes with these tensors; checks the lists' format."""
    BQ, BK = t.block_size
    B, H, M = t.mask_block_cnt.shape
    N = -(-kv_len // BK)
    tril = torch.ones(q_len, kv_len, dtype=torch.bool).tril() if causal else torch.ones(q_len, kv_len).bool()
    tok = torch.zeros(B, H, q_len, kv_len, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for m in range(M):
                rows = slice(m * BQ, (m + 1) * BQ)
                lists = [t.full_block_idx[b, h, m, :t.full_block_cnt[b, h, m]].tolist(),
                         t.mask_block_idx[b, h, m, :t.mask_block_cnt[b, h, m]].tolist()]
                assert not set(lists[0]) & set(lists[1])
                for full, idx in zip((True, False), lists):
                    assert idx == sorted(set(idx)) and all(0 <= j < N for j in idx)
                    for j in idx:
                        cols = slice(j * BK, (j + 1) * BK)
                        assert bool(tril[rows, cols].all()) == full   # full: wholly visible
                        tok[b, h, rows, cols] |= tril[rows, cols]
    return tok


def check_format(t, B, H, M, N):
    assert type(t).__name__ == "BlockSparseTensorsTorch" and set(FIELDS[:4]) <= set(t._fields)
    for cnt, idx in ((t.mask_block_cnt, t.mask_block_idx), (t.full_block_cnt, t.full_block_idx)):
        assert cnt.dtype == idx.dtype == torch.int32
        assert cnt.shape == (B, H, M) and idx.shape == (B, H, M, N)


def ours(m):
    return dense_token_mask(m.to_dense(), m.q_len, m.kv_len, m.block_q, m.block_k, m.is_causal)


def qkv(Nq, Nk, B=2, H=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64),
            *(torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64) for _ in range(2)))


# (Nq, Nk, causal): whole blocks, ragged causal self-attention, ragged cross-attention
CASES = [(384, 384, True), (300, 300, True), (384, 384, False), (200, 330, False)]


@pytest.mark.parametrize("Nq,Nk,causal", CASES)
def test_128_blocks_convert_exactly(Nq, Nk, causal):
    q, k, v = qkv(Nq, Nk)
    cfg = sc.SpargeConfig(topk=0.4, topp=0.0, block_q=128, block_k=128)
    m = sc.predict_block_mask(q, k, is_causal=causal, config=cfg)
    assert 0 < int(m.kv_num_blocks.sum()) < m.to_dense().numel()
    t = m.to_fa4()
    M, N = -(-Nq // 128), -(-Nk // 128)
    check_format(t, 2, 2, M, N)
    assert tuple(t.block_size) == (128, 128)
    tok = fa4_token_mask(t, Nq, Nk, causal)
    assert torch.equal(tok, ours(m))
    assert (int(t.mask_block_cnt.sum()) > 0) == causal   # partial blocks: only on a causal diagonal
    # the same attention: dense attention under FA4's token mask vs our kernel on the mask
    want = torch.softmax((q @ k.transpose(-1, -2) * 32 ** -0.5).masked_fill(~tok, float("-inf")), -1) @ v
    got = sc.sparse_attention(q, k, v, is_causal=causal, block_mask=m, config=cfg)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("Nq,Nk,causal", CASES)
def test_64_wide_mask_with_whole_128_blocks_converts_exactly(Nq, Nk, causal):
    q, k, _ = qkv(Nq, Nk)
    m128 = sc.predict_block_mask(q, k, is_causal=causal, config=sc.SpargeConfig(topk=0.4, topp=0.0,
                                                                                   block_q=128, block_k=128))
    dense64 = m128.to_dense().repeat_interleave(2, -1)[..., :-(-Nk // 64)]
    dense64 &= visible_blocks(Nq, Nk, 128, 64, causal)   # never a key block wholly in the future
    m64 = sc.SpargeBlockMask(*_kv_lists(dense64), Nq, Nk, 128, 64, causal)
    t = m64.to_fa4()
    assert torch.equal(fa4_token_mask(t, Nq, Nk, causal), ours(m64))
    ref = m128.to_fa4()
    for f in FIELDS[:4]:
        assert torch.equal(getattr(t, f), getattr(ref, f)), f


def test_64_wide_mask_keeping_half_a_block_raises_or_gives_a_superset():
    q, k, _ = qkv(300, 300)
    m = sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=0.3, topp=0.0))   # 128 x 64
    with pytest.raises(ValueError, match="block_k=128"):
        m.to_fa4()
    tok, mine = fa4_token_mask(m.to_fa4(superset=True), 300, 300, False), ours(m)
    assert bool((tok | mine).eq(tok).all()) and int(tok.sum()) > int(mine.sum())   # strictly more


def test_smaller_fa4_blocks_refine_exactly():
    q, k, _ = qkv(256, 512, B=1)
    m = sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=0.3, topp=0.0, block_q=128, block_k=256))
    t = m.to_fa4()
    check_format(t, 1, 2, 2, 4)
    assert torch.equal(fa4_token_mask(t, 256, 512, False), ours(m))


def test_to_fa4_bad_arguments():
    q, k, _ = qkv(256, 384, B=1)
    m = sc.predict_block_mask(q, k, config=sc.SpargeConfig(block_k=128))
    with pytest.raises(TypeError, match="block_size"):
        m.to_fa4(block_size=128)
    with pytest.raises(ValueError, match="do not nest"):
        m.to_fa4(block_size=(128, 96))
    for name in ("superset", "backward"):   # "False" would read as True
        with pytest.raises(TypeError, match=name):
            m.to_fa4(**{name: "False"})
    q, k, _ = qkv(256, 256, B=1)
    m = sc.predict_block_mask(q, k, is_causal=True, config=sc.SpargeConfig(block_k=128))
    m.kv_len = 384   # a causal mask of another key length: FA4 aligns its diagonal elsewhere
    with pytest.raises(ValueError, match="bottom-right"):
        m.to_fa4()


def _listed(cnt, idx, rows: int, cols: int) -> torch.Tensor:
    """(B, H, rows, cols) bool from FA4-style counts and left-packed indices."""
    B, H = cnt.shape[:2]
    out = torch.zeros(B, H, rows, cols, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for r in range(rows):
                out[b, h, r, idx[b, h, r, :cnt[b, h, r]].long()] = True
    return out


@pytest.mark.parametrize("Nq,Nk,causal", CASES)
def test_backward_lists_are_the_forward_blocks_transposed(Nq, Nk, causal):
    """to_fa4(backward=True): per key block its query blocks, full and partial as in the forward
    lists (FA4's block_sparse_tensors_bwd: counts (B, H, N), indices (B, H, N, M))."""
    q, k, _ = qkv(Nq, Nk, seed=3)
    cfg = sc.SpargeConfig(topk=0.4, topp=0.0, block_q=128, block_k=128)
    m = sc.predict_block_mask(q, k, is_causal=causal, config=cfg)
    fwd, bwd = m.to_fa4(), m.to_fa4(backward=True)
    M, N = -(-Nq // 128), -(-Nk // 128)
    assert bwd.full_block_cnt.shape == (2, 2, N) and bwd.full_block_idx.shape == (2, 2, N, M)
    assert all(t.is_contiguous() for t in bwd[:4])   # FA4 refuses a non-unit last stride (H200)
    for kind in ("full", "mask"):
        f = _listed(getattr(fwd, f"{kind}_block_cnt"), getattr(fwd, f"{kind}_block_idx"), M, N)
        b = _listed(getattr(bwd, f"{kind}_block_cnt"), getattr(bwd, f"{kind}_block_idx"), N, M)
        assert torch.equal(b, f.transpose(-1, -2))
    assert int(bwd.full_block_cnt.sum() + bwd.mask_block_cnt.sum()) == int(m.kv_num_blocks.sum())
