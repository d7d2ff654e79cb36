"""A model quantized by torchao, then compiled with backend="sparge": both survive.

torchao's quantized weights are tensor subclasses; the backend must neither break their ops nor
hand them to its own ops (it used to pass one as the site's owner tag: NotImplementedError)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparge_compile as sc
from sparge_compile import ops

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402


class Attn(nn.Module):
    def __init__(self, dim=128, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def qkv_heads(self, x):
        return self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _quantized():
    torch.manual_seed(0)
    m = Attn().eval()
    quantize_(m, Int8WeightOnlyConfig())
    assert type(m.qkv.weight).__name__ != "Parameter"   # torchao's subclass is in place
    return m


@pytest.mark.parametrize("topk", [1.0, 0.25])
def test_torchao_int8_weights_compile_sparse(topk):
    m, x = _quantized(), torch.randn(1, 1024, 128)
    be = sc.backend(config=sc.SpargeConfig(topk=topk, topp=0.0), inner="aot_eager")
    cm = torch.compile(m, backend=be)
    with torch.no_grad():
        y = cm(x)
        q, k, v = m.qkv_heads(x)
        scale = q.shape[-1] ** -0.5
        num, idx = ops.predict_block_mask_op(q, k, scale, False, topk, 0.0, "hybrid", 128, 64)
        att, _ = ops.block_sparse_attention_op(q, k, v, num, idx, scale, False, 128, 64)
        ref = m.out(att.transpose(1, 2).flatten(2))
    (site,) = [s for g in be.graphs for s in g.sites]
    assert site.rewritten, site.reason
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    if topk == 1.0:
        torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-4)
    else:
        assert site.sparsity > 0.5
