"""SpargeAttn's in-kernel P·V filter (``SpargeConfig.pv_threshold``, λ; issue 19): the Triton
kernel (interpreter) and the PyTorch path against the float64 reference (exact attention on the
blocks :func:`reference.pv_filter_mask` leaves), its error bound, config checks, the backend."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparge_compile as sc
from sparge_compile import reference as R
from sparge_compile.kernels import forward, torch_impl


def problem(seed, B, Hq, Hkv, N, D, spread):
    """Random q, k, v whose keys differ in scale (spread): scores span many units, so λ bites."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g) * torch.rand(1, 1, N, 1, generator=g).mul(spread).exp()
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q, k, v


def lut(seed, B, H, N, bq, bk, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, H, -(-N // bq), -(-N // bk), generator=g) < keep
    dense[..., 0] = True
    num, idx = torch_impl.dense_to_indices(dense)
    # a shuffled walk order: the running max (and so the filter) follows it
    dropped = torch.arange(idx.shape[-1]) >= num[..., None]
    perm = torch.argsort(torch.rand(idx.shape, generator=g) + dropped * 2)
    return num, torch.gather(idx, -1, perm).to(torch.int32).contiguous()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2 ** 20), N=st.integers(1, 150), hkv=st.integers(1, 2), g=st.integers(1, 2),
       causal=st.booleans(), lam=st.sampled_from([0.5, 2.0, 6.0]), spread=st.sampled_from([0.0, 2.0]))
def test_kernel_and_torch_path_match_the_reference(seed, N, hkv, g, causal, lam, spread):
    q, k, v = problem(seed, 1, hkv * g, hkv, N, 32, spread)
    num, idx = lut(seed, 1, hkv * g, N, 32, 16)
    args = (num, idx, 32 ** -0.5, causal, 32, 16)
    live = R.pv_filter_mask(q.double(), k.double(), *args, lam)
    ref = R.masked_attention(q.double(), k.double(), v.double(), live, 32 ** -0.5, causal, 32, 16)
    out_k, _ = forward.attention_fwd_triton(q, k, v, *args, pv_threshold=lam)
    out_t, _ = torch_impl.attention_fwd(q, k, v, *args, None, lam)
    for out in (out_k, out_t):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_the_filter_skips_blocks_and_stays_within_its_bound():
    """Skipped blocks exist, yet each skipped weight is below e^-λ of its row's largest: the
    output moves at most (skipped keys per row) · e^-λ · 2 max|v| from the unfiltered one."""
    q, k, v = problem(1, 1, 2, 1, 300, 32, 3.0)
    num, idx = lut(1, 1, 2, 300, 32, 16, keep=1.0)
    args = (num, idx, 32 ** -0.5, False, 32, 16)
    dense = torch_impl.indices_to_dense(num, idx, 19)
    for lam in (2.0, 8.0):
        live = R.pv_filter_mask(q.double(), k.double(), *args, lam)
        skipped = (dense & ~live).sum(-1).max().item() * 16
        assert skipped > 0
        out, _ = forward.attention_fwd_triton(q, k, v, *args, pv_threshold=lam)
        base, _ = forward.attention_fwd_triton(q, k, v, *args)
        assert (out - base).abs().max() <= skipped * math.exp(-lam) * 2 * v.abs().max() + 1e-5


def test_a_huge_threshold_changes_nothing():
    q, k, v = problem(2, 1, 2, 2, 200, 32, 2.0)
    num, idx = lut(2, 1, 2, 200, 32, 16)
    args = (num, idx, 32 ** -0.5, True, 32, 16)
    for fwd in (lambda **kw: forward.attention_fwd_triton(q, k, v, *args, **kw),
                lambda **kw: torch_impl.attention_fwd(q, k, v, *args, None, kw.get("pv_threshold"))):
        out, lse = fwd(pv_threshold=1e6)
        ref, ref_lse = fwd()
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                     ("2", TypeError), (True, TypeError)])
def test_config_rejects_bad_thresholds_naming_the_field(bad, err):
    with pytest.raises(err, match="pv_threshold"):
        sc.SpargeConfig(pv_threshold=bad)


def test_low_bit_with_the_filter_is_refused():
    with pytest.raises(ValueError, match="pv_threshold"):
        sc.SpargeConfig(pv_threshold=4.0, precision="fp8")
    q, k, v = problem(3, 1, 2, 2, 64, 32, 0.0)
    with pytest.raises(ValueError, match="pv_threshold"):
        sc.sparse_attention(q, k, v, config=sc.SpargeConfig(pv_threshold=4.0), precision="int8")


def test_sparse_attention_applies_the_filter_and_differentiates():
    cfg = sc.SpargeConfig(topk=0.5, topp=0.5, block_q=32, block_k=16, min_seq_len=0, pv_threshold=2.0)
    q, k, v = (x.requires_grad_() for x in problem(4, 1, 2, 1, 200, 32, 2.0))
    out, m = sc.sparse_attention(q, k, v, config=cfg, return_mask=True)
    live = R.pv_filter_mask(q.double(), k.double(), m.kv_num_blocks, m.kv_indices, 32 ** -0.5, False, 32, 16,
                            2.0)
    assert (live.sum() < m.to_dense().sum()).item()
    ref = R.masked_attention(q.double(), k.double(), v.double(), live, 32 ** -0.5, False, 32, 16)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g_).all() for g_ in grads)


class Attn(torch.nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton", "pytorch-path"])
def test_backend_runs_the_filter_and_refuses_to_change_it_at_run_time(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch.manual_seed(0)
    cfg = sc.SpargeConfig(topk=0.5, topp=0.3, block_q=32, block_k=16, min_seq_len=0, pv_threshold=1.0)
    model, x = Attn(), torch.randn(1, 200, 64) * 3
    x[:, 100:116] *= 6   # one key block far above the rest: the blocks after it are skipped
    torch._dynamo.reset()
    be = sc.backend(config=cfg)
    with torch.no_grad():
        y = torch.compile(model, backend=be)(x)
        q, k, v = model.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        want = sc.sparse_attention(q, k, v, config=cfg).transpose(1, 2).flatten(2)
        plain = sc.sparse_attention(q, k, v, config=cfg.replace(pv_threshold=None)).transpose(1, 2).flatten(2)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, plain, rtol=1e-5, atol=1e-5)   # the filter did something here
    with pytest.raises(ValueError, match="pv_threshold"):
        be.set_config(pv_threshold=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("lam", [2.0, 6.0])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_kernel_matches_the_reference(lam, causal):
    """The compiled kernel (pointer loads and TMA descriptors) on bf16 inputs whose keys differ in
    scale (on model-like ones, 128-row tiles rarely let a block go: H200 probe) against
    exact float64 attention on the blocks the reference filter leaves. A block whose decision is
    a near-tie (fp32 vs float64 scores) may flip: its weight is below e^-λ, inside the bound."""
    q, k, v = (x.to("cuda", torch.bfloat16) for x in problem(7, 1, 4, 2, 4096, 128, 6.0))
    m = sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=0.2, topp=0.0), is_causal=causal)
    args = (m.kv_num_blocks, m.kv_indices, 128 ** -0.5, causal, 128, 64)
    live = R.pv_filter_mask(q.double(), k.double(), *args, lam)
    assert (live.sum() < m.to_dense().sum()).item()
    ref = R.masked_attention(q.double(), k.double(), v.double(), live, 128 ** -0.5, causal, 128, 64)
    for tma in (False, True):
        out, _ = forward.attention_fwd_triton(q, k, v, *args, pv_threshold=lam, use_tma=tma)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (tma, err)


def test_training_through_inductor_on_the_pytorch_path(monkeypatch):
    """Inductor (CPU PyTorch path): the compiled model's gradients with the filter on equal eager
    sparse attention's with the same config."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    cfg = sc.SpargeConfig(topk=0.5, topp=0.3, block_q=32, block_k=16, min_seq_len=0, pv_threshold=1.0)
    model, x = Attn(), torch.randn(1, 200, 64) * 3
    x[:, 100:116] *= 6
    torch._dynamo.reset()
    torch.compile(model, backend=sc.backend(config=cfg))(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    q, k, v = model.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
    sc.sparse_attention(q, k, v, config=cfg).transpose(1, 2).flatten(2).square().sum().backward()
    for g_, p in zip(got, model.parameters()):
        torch.testing.assert_close(g_, p.grad, rtol=1e-4, atol=1e-4)
