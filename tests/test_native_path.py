"""The native path (sites launching the kernels from Inductor's code, sparge_compile.native_ops),
checked on the CPU through Triton's interpreter with an eager inner compiler: the same answer
as the Python ops on the same mask, a measured sparsity with no mask kept, set_config through
the device knobs. The compiled (Inductor) form of this path runs on the GPU (tests/test_kernels_gpu)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparge_compile as sc
from sparge_compile import native_ops, ops, site_ops

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs Triton's interpreter")
CFG = sc.SpargeConfig(topk=0.3, topp=0.0, block_q=32, block_k=16, min_seq_len=0)


class Attn(nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x, causal=False):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).flatten(2)


@pytest.fixture(params=[False, True], ids=["triton-pool", "graph-pool"])
def native_on_cpu(monkeypatch, request):
    monkeypatch.setattr(site_ops, "NATIVE_DEVICES", {"cpu"})
    monkeypatch.setattr(site_ops, "GRAPH_POOL", request.param)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(model, x):
    q, k, v = model.qkv(x).unflatten(-1, (3, model.heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_native_site_matches_python_ops_and_counts(native_on_cpu, causal):
    torch.manual_seed(0)
    model, x = Attn(), torch.randn(1, 200, 64)
    be = sc.backend(config=CFG, inner="eager")
    cm = torch.compile(model, backend=be)
    with torch.no_grad():
        y = cm(x, causal)
        y = cm(x, causal)   # two calls: the counter sums both
        q, k, v = _qkv(model, x)
    scale = q.shape[-1] ** -0.5
    num, idx = ops.predict_block_mask_op(q, k, scale, causal, CFG.topk, CFG.topp, CFG.mode, 32, 16)
    ref, _ = ops.block_sparse_attention_op(q, k, v, num, idx, scale, causal, 32, 16)
    torch.testing.assert_close(y, ref.transpose(1, 2).flatten(2), rtol=1e-5, atol=1e-5)
    (site,) = [s for g in be.graphs for s in g.sites if s.rewritten]
    assert site.state.native and site.state.kv_num_blocks is None   # no mask reference kept
    mask = sc.SpargeBlockMask(num, idx, 200, 200, 32, 16, causal)
    assert site.calls == 2
    assert site.sparsity == pytest.approx(mask.sparsity(), abs=1e-9)


def test_set_config_reaches_a_native_site_without_recompiling(native_on_cpu):
    torch.manual_seed(1)
    model, x = Attn(), torch.randn(1, 256, 64)
    be = sc.backend(config=CFG, inner="eager")
    cm = torch.compile(model, backend=be)
    with torch.no_grad():
        cm(x)
        sparse = be.graphs[-1].sites[0].sparsity
        be.set_config(topk=1.0)
        y = cm(x)
    assert len(be.graphs) == 1
    assert torch.allclose(y, F.scaled_dot_product_attention(*_qkv(model, x)).transpose(1, 2).flatten(2),
                          atol=1e-5)
    assert sparse > 0.3 and be.graphs[-1].sites[0].sparsity < sparse
    with pytest.raises(ValueError, match="mode"):
        be.set_config(mode="topk")


def test_native_attention_gradients_match_the_python_op():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 150, 32, requires_grad=True) for _ in range(3))
    num, idx = ops.predict_block_mask_op(q.detach(), k.detach(), 0.2, False, 0.4, 0.0, "hybrid", 32, 16)
    grads = []
    for op in (native_ops.native_attention, ops.block_sparse_attention_op):
        out, _ = op(q, k, v, num, idx, 0.2, False, 32, 16)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_graph_pooling_equals_the_pooling_kernel():
    from sparge_compile.kernels.mask import pool_qk_triton

    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 170, 24), torch.randn(2, 3, 90, 24)
    qb, kb = pool_qk_triton(q, k, 32, 16)
    torch.testing.assert_close(native_ops.pool_blocks(q, 32, qb.shape[-1]), qb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(native_ops.pool_blocks(k, 16, kb.shape[-1]), kb, rtol=1e-6, atol=1e-6)


class PaddedAttn(Attn):
    def forward(self, x, keep):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return o.transpose(1, 2).flatten(2)


def test_sites_the_native_path_was_not_run_for_keep_the_python_ops(native_on_cpu):
    """Key padding and symbolic shapes take the Python ops (their native form never ran on a GPU)."""
    torch.manual_seed(4)
    be = sc.backend(config=CFG, inner="eager")
    keep = torch.ones(1, 200, dtype=torch.bool)
    keep[:, 150:] = False
    traced = sc.backend(config=CFG, inner="aot_eager")   # traced: the sizes are symbolic there
    with torch.no_grad():
        torch.compile(PaddedAttn(), backend=be)(torch.randn(1, 200, 64), keep)
        dyn = torch.compile(Attn(), backend=traced, dynamic=True)
        dyn(torch.randn(1, 200, 64))
        dyn(torch.randn(1, 230, 64))
    sites = [s for b in (be, traced) for g in b.graphs for s in g.sites if s.rewritten]
    assert len(sites) >= 2 and not any(s.state.native for s in sites)
    assert all(s.calls >= 1 and s.sparsity is not None for s in sites)


def test_native_site_with_device_descriptors_matches_python_ops(native_on_cpu, monkeypatch):
    """The native forward with its K/V descriptors built in the kernel (what large calls trace to
    on Hopper; forced here for a small one), run by the interpreter: same output as the ops."""
    from sparge_compile.kernels import forward

    monkeypatch.setattr(forward, "DEVICE_TMA_MIN_WORK", 0)
    modes, real = [], forward.tma_mode
    monkeypatch.setattr(forward, "tma_mode", lambda *a: modes.append(real(*a)) or modes[-1])
    torch.manual_seed(1)
    model, x = Attn(), torch.randn(1, 150, 64)
    cm = torch.compile(model, backend=sc.backend(config=CFG, inner="eager"))
    with torch.no_grad():
        y = cm(x)
        q, k, v = _qkv(model, x)
    assert "device" in modes
    scale = q.shape[-1] ** -0.5
    num, idx = ops.predict_block_mask_op(q, k, scale, False, CFG.topk, CFG.topp, CFG.mode, 32, 16)
    ref, _ = ops.block_sparse_attention_op(q, k, v, num, idx, scale, False, 32, 16)
    torch.testing.assert_close(y, ref.transpose(1, 2).flatten(2), rtol=1e-5, atol=1e-5)
