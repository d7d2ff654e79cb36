"""Key-padding masks in the kernels: key blocks of padding alone are dropped from the mask,
partly padded blocks are masked element-wise, forward and backward, on the Triton (interpreter)
and the PyTorch path, against the float64 reference."""
import pytest
import torch

from sparge_compile import kernels
from sparge_compile import reference as R
from sparge_compile.kernels import torch_impl

pytestmark = pytest.mark.usefixtures("one_thread")
BQ = BK = 16


def _case(seed, B=2, Hq=4, Hkv=2, N=80, D=32, causal=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, 37:] = False            # right padding: key blocks 3, 4 of padding alone, block 2 partly
    keep[1, 5:9] = False            # holes inside a block
    return q, k, v, keep


@pytest.mark.parametrize("interpret", ["1", "0"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_and_attention_match_the_reference(interpret, causal, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k, v, keep = _case(0, causal=causal)
    scale = q.shape[-1] ** -0.5
    num, idx = kernels.predict_mask(q, k, scale, causal, 0.5, 0.0, "topk", BQ, BK, keep)
    dense = torch_impl.indices_to_dense(num, idx, R.cdiv(k.shape[2], BK))
    want_mask = R.reference_block_mask(q.double(), k.double(), scale, causal, 0.5, 0.0, "topk", BQ, BK, keep)
    assert torch.equal(dense, want_mask)
    assert not dense[0, :, :, 3:].any()                      # blocks of padding alone: dropped
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = R.masked_attention(qd, kd, vd, dense, scale, causal, BQ, BK, keep)
    out, lse = kernels.attention_fwd(q, k, v, num, idx, scale, causal, BQ, BK, keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    grads = kernels.attention_bwd(dout, q, k, v, out, lse, num, idx, scale, causal, BQ, BK, keep)
    for name, g, t in zip("qkv", grads, (qd, kd, vd)):
        torch.testing.assert_close(g.double(), t.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert grads[1][0, :, 37:].abs().max() == 0 and grads[2][0, :, 37:].abs().max() == 0   # padding keys


def test_padding_that_keeps_every_key_changes_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, _ = _case(1)
    keep = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
    scale = q.shape[-1] ** -0.5
    a = kernels.predict_mask(q, k, scale, False, 0.3, 0.5, "hybrid", BQ, BK, keep)
    b = kernels.predict_mask(q, k, scale, False, 0.3, 0.5, "hybrid", BQ, BK)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    fa, _ = kernels.attention_fwd(q, k, v, *a, scale, False, BQ, BK, keep)
    fb, _ = kernels.attention_fwd(q, k, v, *b, scale, False, BQ, BK)
    assert torch.equal(fa, fb)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,D", [(False, 64), (True, 128), (False, 72)])
def test_padding_on_the_gpu(causal, D):
    """bf16 on the GPU (TMA and padded head dims): the key-padding kernels against float64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, N = 2, 4, 2000
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    keep = torch.ones(B, N, dtype=torch.bool, device="cuda")
    keep[0, 1300:] = False
    keep[1, 100:170] = False
    scale = D ** -0.5
    num, idx = kernels.predict_mask(q, k, scale, causal, 0.3, 0.3, "hybrid", 128, 64, keep)
    dense = torch_impl.indices_to_dense(num, idx, R.cdiv(N, 64))
    assert not dense[0, :, :, R.cdiv(1300, 64):].any()
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = R.masked_attention(qd, kd, vd, dense, scale, causal, 128, 64, keep)
    out, lse = kernels.attention_fwd(q, k, v, num, idx, scale, causal, 128, 64, keep)
    assert (out.double() - ref).norm() / ref.norm() < 2e-2
    dout = torch.randn_like(out)
    ref.backward(dout.double())
    grads = kernels.attention_bwd(dout, q, k, v, out, lse, num, idx, scale, causal, 128, 64, keep)
    for name, gr, t in zip("qkv", grads, (qd, kd, vd)):
        assert (gr.double() - t.grad).norm() / t.grad.norm() < 2e-2, name


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_sparse_attention_takes_a_key_padding_mask(interpret, monkeypatch):
    """The public op: kv_keep masks the keys, forward and (eager autograd) backward."""
    import sparge_compile as sc

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k, v, keep = _case(3)
    cfg = sc.SpargeConfig(topk=0.5, topp=0.0, block_q=BQ, block_k=BK)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, m = sc.sparse_attention(q, k, v, config=cfg, kv_keep=keep, return_mask=True)
    assert torch.equal(m.to_dense(), sc.predict_block_mask(q, k, config=cfg, kv_keep=keep).to_dense())
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = R.masked_attention(qd, kd, vd, m.to_dense(), q.shape[-1] ** -0.5, False, BQ, BK, keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    for t, r in zip((q, k, v), (qd, kd, vd)):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)
