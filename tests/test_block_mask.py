"""SpargeBlockMask.to_flex(): FlexAttention with the exported mask computes what the sparse op does.

Eager FlexAttention ignores the block indices (the mask_mod must be exact); compiled FlexAttention
runs full blocks without the mask_mod (the full/partial split must be exact): both are checked.
"""
import pytest
import torch

import sparge_compile as sc
from sparge_compile.reference import masked_attention

pytestmark = pytest.mark.usefixtures("one_thread")


# (block_q, block_k, Nq, Nk): FlexAttention's 128 blocks; our default 128x64 with ragged lengths
# (partial last blocks) and cross-attention lengths
SHAPES = [(128, 128, 384, 384), (128, 64, 300, 300), (128, 64, 200, 330)]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_to_flex_gives_the_same_attention(shape, is_causal, compiled, monkeypatch):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    bq, bk, Nq, Nk = shape
    B, H, D = 1, 2, 32
    dtype = torch.float32 if compiled else torch.float64
    q = torch.randn(B, H, Nq, D, dtype=dtype)
    k, v = (torch.randn(B, H, Nk, D, dtype=dtype) for _ in range(2))
    cfg = sc.SpargeConfig(topk=0.4, topp=0.0, block_q=bq, block_k=bk)
    m = sc.predict_block_mask(q, k, config=cfg, is_causal=is_causal)
    dense = m.to_dense()
    assert 0 < int(dense.sum()) < dense.numel()          # a mask that really drops blocks
    want = masked_attention(*(x.double() for x in (q, k, v)), dense, D ** -0.5, is_causal, bq, bk)
    # static: Inductor's CPU FlexAttention template fails to build after a dynamic recompile (torch 2.13)
    attend = torch.compile(flex.flex_attention, dynamic=False) if compiled else flex.flex_attention
    got = attend(q, k, v, block_mask=m.to_flex(), scale=D ** -0.5)
    tol = 2e-4 if compiled else 1e-9
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    out = sc.sparse_attention(q, k, v, is_causal=is_causal, block_mask=m, config=cfg)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
