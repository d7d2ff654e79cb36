"""SpargeBlockMask.to_flex(): FlexAttention with the exported mask computes what the sparse op does.

Eager FlexAttention ignores the block indices (the mask_mod must be exact); compiled FlexAttention
runs full blocks without the mask_mod (the full/partial split must be exact): both are checked.
"""
import pytest
import torch

import sparge_compile as sc
from sparge_compile.reference import masked_attention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_to_flex_gives_the_same_attention(is_causal, compiled, monkeypatch):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 384, 32
    dtype = torch.float32 if compiled else torch.float64
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.4, topp=0.0, block_q=128, block_k=128)   # FlexAttention's 128 blocks
    m = sc.predict_block_mask(q, k, config=cfg, is_causal=is_causal)
    dense = m.to_dense()
    assert 0 < int(dense.sum()) < dense.numel()          # a mask that really drops blocks
    want = masked_attention(*(x.double() for x in (q, k, v)), dense, D ** -0.5, is_causal, 128, 128)
    attend = torch.compile(flex.flex_attention) if compiled else flex.flex_attention
    got = attend(q, k, v, block_mask=m.to_flex(), scale=D ** -0.5)
    tol = 2e-4 if compiled else 1e-9
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    out = sc.sparse_attention(q, k, v, is_causal=is_causal, block_mask=m, config=cfg)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
