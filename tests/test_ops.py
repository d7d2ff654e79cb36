"""The torch.library registrations: opcheck, torch.compile with no graph break.
Input errors are rows of tests/test_bad_inputs.py."""
from __future__ import annotations

import torch
from kernel_checks import make_qkv

import sparge_compile as sc
from sparge_compile import ops

CFG = sc.SpargeConfig(topk=0.3, topp=0.3, block_q=16, block_k=16, min_seq_len=0)


def _noncontig(seed=0, N=40, requires_grad=False):
    """SDPA-layout views of (B, N, H, D) tensors, as attention modules produce them."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, N, 2, 32, generator=g).transpose(1, 2).requires_grad_(requires_grad)
                 for _ in range(3))


def test_opcheck_predict_and_attention(monkeypatch):
    """The registrations (schema, fake, autograd, AOT dispatch). opcheck calls the ops dozens of
    times, so it runs them on the PyTorch path (the same function; the kernels are checked against
    it and the float64 reference in tests/test_kernels.py, and their fake strides below)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _noncontig()
    num, idx = ops.predict_block_mask_op(q, k, 0.2, False, 0.3, 0.3, "hybrid", 16, 16)
    torch.library.opcheck(ops.predict_block_mask_op, (q, k, 0.2, False, 0.3, 0.3, "hybrid", 16, 16))
    qg, kg, vg = _noncontig(requires_grad=True)
    torch.library.opcheck(ops.block_sparse_attention_op, (qg, kg, vg, num, idx, 0.2, True, 16, 16))


def test_fake_backward_strides_match_real():
    """Regression: the fake backward must give the real kernels' (contiguous) layout."""
    q, k, v = _noncontig(requires_grad=True)
    num, idx = ops.predict_block_mask_op(q.detach(), k.detach(), 0.2, False, 0.3, 0.3, "hybrid", 16, 16)
    out, lse = ops.block_sparse_attention_op(q, k, v, num, idx, 0.2, False, 16, 16)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, num, idx, 0.2,
            False, 16, 16)
    real = ops.block_sparse_attention_backward_op(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = ops.block_sparse_attention_backward_op(*args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride()


def test_compile_fullgraph_forward_and_backward():
    q, k, v = _noncontig(requires_grad=True)
    torch._dynamo.reset()

    def f(q, k, v):
        return sc.sparse_attention(q, k, v, config=CFG) * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(q, k, v)
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    q2, k2, v2 = _noncontig(requires_grad=True)
    ref = f(q2, k2, v2)
    rq, rk, rv = torch.autograd.grad(ref.sum(), (q2, k2, v2))
    torch.testing.assert_close(out, ref)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a, b)


def test_eager_calls_match_the_ops_exactly():
    """Eager sparse_attention/predict_block_mask skip the torch.library dispatch (host cost) but
    run the same kernels: the same mask, output and gradients as the ops, bit for bit."""
    q, k, v = _noncontig(seed=3, requires_grad=True)
    m = sc.predict_block_mask(q, k, config=CFG)
    num, idx = ops.predict_block_mask_op(q.detach(), k.detach(), 32 ** -0.5, False, CFG.topk, CFG.topp,
                                         CFG.mode, 16, 16)
    assert torch.equal(m.kv_num_blocks, num) and torch.equal(m.kv_indices, idx)
    out = sc.sparse_attention(q, k, v, config=CFG)
    ref, _ = ops.block_sparse_attention_op(q, k, v, num, idx, 32 ** -0.5, False, 16, 16)
    assert torch.equal(out, ref) and out.grad_fn is not None
    dout = torch.randn_like(out)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), dout),
                                                 torch.autograd.grad(ref, (q, k, v), dout)))
    with torch.no_grad():
        plain = sc.sparse_attention(q, k, v, config=CFG)
    assert torch.equal(plain, ref) and plain.grad_fn is None


def test_cpu_without_interpreter_uses_torch_path_and_agrees(monkeypatch):
    """A CPU user without TRITON_INTERPRET gets the chunked PyTorch path: same function."""
    q, k, v = make_qkv(1, 1, 2, 1, 70, 90, 64, torch.float32)
    out_triton, m = sc.sparse_attention(q, k, v, is_causal=True, config=CFG, return_mask=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out_torch, m2 = sc.sparse_attention(q, k, v, is_causal=True, config=CFG, return_mask=True)
    assert torch.equal(m.to_dense(), m2.to_dense())
    torch.testing.assert_close(out_torch, out_triton, rtol=1e-5, atol=1e-5)


def _fwd_real_and_fake(q, k, v, num, idx):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = ops.block_sparse_attention_op(q, k, v, num, idx, 0.2, False, 16, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = ops.block_sparse_attention_op(q, k, v, num, idx, 0.2, False, 16, 16)
    return real, fake


def test_forward_output_follows_the_query_layout(monkeypatch):
    """A (B, N, H, D)-major query gives a (B, N, H, D)-major output (as SDPA does), so the
    caller's transpose-and-flatten back is a view, not a copy; a contiguous query a contiguous
    output. Real and fake strides agree, the values equal the contiguous inputs' on both paths."""
    q, k, v = _noncontig(seed=5)
    num, idx = ops.predict_block_mask_op(q, k, 0.2, False, 0.3, 0.3, "hybrid", 16, 16)
    contiguous = [x.contiguous() for x in (q, k, v)]
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        (out, lse), (fout, flse) = _fwd_real_and_fake(q, k, v, num, idx)
        assert out.stride() == fout.stride() and lse.stride() == flse.stride()
        assert out.transpose(1, 2).is_contiguous()
        out.transpose(1, 2).view(1, 40, -1)  # a view: raises if the layout needed a copy
        (cout, clse), (fcout, _) = _fwd_real_and_fake(*contiguous, num, idx)
        assert cout.is_contiguous() and fcout.is_contiguous()
        torch.testing.assert_close(out, cout, rtol=0, atol=0)
        torch.testing.assert_close(lse, clse, rtol=0, atol=0)
