"""SpargeBlockMask.to_flex(): FlexAttention with the exported mask computes what the sparse op does."""
import pytest
import torch

import sparge_compile as sc
from sparge_compile.reference import masked_attention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("is_causal", [False, True])
def test_to_flex_gives_the_same_attention(is_causal, monkeypatch):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 256, 32
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.3, topp=0.0, block_q=128, block_k=128)   # FlexAttention's 128 blocks
    m = sc.predict_block_mask(q, k, config=cfg, is_causal=is_causal)
    dense = m.to_dense()
    assert 0 < int(dense.sum()) < dense.numel()          # a mask that really drops blocks
    want = masked_attention(q, k, v, dense, D ** -0.5, is_causal, 128, 128)
    got = flex.flex_attention(q, k, v, block_mask=m.to_flex(), scale=D ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    out = sc.sparse_attention(q, k, v, is_causal=is_causal, block_mask=m, config=cfg)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("is_causal", [False, True])
def test_to_flex_compiled_gives_the_same_attention(is_causal, monkeypatch):
    """Compiled FlexAttention runs full blocks without the mask_mod: the full/partial split must be exact."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(1)
    B, H, N, D = 1, 2, 384, 32
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.5, topp=0.0, block_q=128, block_k=128)
    m = sc.predict_block_mask(q, k, config=cfg, is_causal=is_causal)
    want = masked_attention(q.double(), k.double(), v.double(), m.to_dense(), D ** -0.5, is_causal, 128, 128)
    got = torch.compile(flex.flex_attention)(q, k, v, block_mask=m.to_flex(), scale=D ** -0.5)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
