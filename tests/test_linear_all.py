"""SLA's released form in Triton (sparge_compile/kernels/linear_all.py, op sparge::sla_all):
out_sparse + proj(linear attention over all keys) against the float64 PyTorch definition
(linear_branch.linear_attention_all + combine_outputs), forward and gradients, on the CPU
interpreter; bf16 at a long sequence on the GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import TOL, make_qkv, rel_err

from sparge_compile import SpargeConfig, kernels, ops_linear
from sparge_compile import linear_branch as lb
from sparge_compile.kernels import linear_all

needs_triton = pytest.mark.skipif(not kernels.use_triton(torch.empty(1)) and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
pytestmark = needs_triton


@st.composite
def problems(draw):
    Hkv = draw(st.integers(1, 2))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), B=draw(st.integers(1, 2)), Hkv=Hkv,
                Hq=Hkv * draw(st.integers(1, 2)), Nq=draw(st.integers(1, 150)), Nk=draw(st.integers(1, 150)),
                D=draw(st.sampled_from([16, 24, 40])),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                kind=draw(st.sampled_from(lb.FEATURE_MAPS)), bias=draw(st.booleans()))


def _inputs(pb, device="cpu"):
    q, k, v = make_qkv(pb["seed"], pb["B"], pb["Hq"], pb["Hkv"], pb["Nq"], pb["Nk"], pb["D"], pb["dtype"],
                       device=device, requires_grad=True)
    g = torch.Generator().manual_seed(pb["seed"] + 1)
    D = pb["D"]
    out_s = torch.randn(q.shape, generator=g).to(device, pb["dtype"]).requires_grad_()
    w = (torch.randn(D, D, generator=g) / D ** 0.5).to(device).requires_grad_()
    b = (torch.randn(D, generator=g) * 0.1).to(device).requires_grad_() if pb["bias"] else None
    return [out_s, q, k, v, w, b]


def _reference(xs, pb, dout):
    xd = [None if x is None else x.detach().double().cpu().requires_grad_() for x in xs]
    ref = lb.sla_all_output(*xd, pb["kind"], 1e-5)
    grads = torch.autograd.grad(ref, [x for x in xd if x is not None], dout.double().cpu())
    return ref, grads


@given(problems())
def test_forward_and_gradients_match_float64(pb):
    xs = _inputs(pb)
    out = ops_linear.sla_all_op(*xs, pb["kind"], 1e-5)
    assert out.dtype == pb["dtype"] and out.shape == xs[0].shape
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(pb["seed"] + 2)).to(out.dtype)
    ref, ref_grads = _reference(xs, pb, dout)
    tol = TOL[pb["dtype"]]
    assert rel_err(out, ref) < tol
    grads = torch.autograd.grad(out, [x for x in xs if x is not None], dout)
    # the backward is the fp32 PyTorch definition: at fp32 its own rounding (~1e-4 where a key
    # gradient cancels, e.g. one key: O_lin = v whatever k) is the bound, not the forward's 1e-5
    gtol = max(4 * tol, 5e-4)
    for name, g, r in zip(["out_s", "q", "k", "v", "weight", "bias"], grads, ref_grads):
        assert rel_err(g, r, floor=1e-2) < gtol, name


@pytest.mark.parametrize("kind", lb.FEATURE_MAPS)
@pytest.mark.parametrize("launch", [{}, dict(block_n=32, programs=7, num_warps=2)])
def test_totals_are_the_sum_over_all_keys(kind, launch):
    """total_states: φ(K)ᵀV and φ(K)ᵀ1 over every key (several chunks, a partial last tile), zero
    in the padded head-dim tile; at the default launch and another (more, shorter chunks)."""
    k = torch.randn(2, 3, 1000, 40, dtype=torch.float32)
    v = torch.randn(2, 3, 1000, 24, dtype=torch.float32)
    S, z = linear_all.total_states(k, v, kind, **launch)
    pk = lb.feature_map(k.double(), kind)
    S_ref = (pk.transpose(-1, -2) @ v.double()).reshape(6, 40, 24)
    assert S.shape == (6, 64, 32) and z.shape == (6, 64)
    torch.testing.assert_close(S[:, :40, :24].double(), S_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z[:, :40].double(), pk.sum(-2).reshape(6, 40), rtol=1e-5, atol=1e-4)
    assert S[:, 40:].abs().max() == 0 and S[:, :, 24:].abs().max() == 0 and z[:, 40:].abs().max() == 0


def test_token_major_inputs_and_wide_heads(monkeypatch):
    """Strided (token-major, as SDPA callers often pass) inputs give the contiguous inputs' output;
    a head dim past the kernels' 128 runs the PyTorch definition (no kernel launch)."""
    pb = dict(seed=7, B=2, Hq=4, Hkv=2, Nq=70, Nk=90, D=24, dtype=torch.float32, kind="softmax", bias=True)
    out_s, q, k, v, w, b = (x.detach() for x in _inputs(pb))
    tm = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (out_s, q, k, v)]
    assert not tm[1].is_contiguous()
    got = ops_linear.sla_all_op(*tm, w, b, "softmax", 1e-5)
    want = ops_linear.sla_all_op(out_s, q, k, v, w, b, "softmax", 1e-5)
    assert rel_err(got, want) < 1e-6
    monkeypatch.setattr(ops_linear, "SLA_ALL_MAX_HEAD_DIM", 16)
    monkeypatch.setattr(linear_all, "sla_all_fwd_triton", lambda *a, **kw: pytest.fail("kernel launched"))
    wide = ops_linear.sla_all_op(out_s, q, k, v, w, b, "softmax", 1e-5)
    assert rel_err(wide, want) < 1e-5


def test_fp16_long_sequence_stays_in_range():
    """fp16 at 36k keys of mean-two values: φ(K)ᵀV reaches ~8e4, past fp16's 65504; the folded
    state is kept per key (÷ Nk), so the output is finite and matches float64."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 64, 16, generator=g).half()
    k = torch.randn(1, 1, 36000, 16, generator=g).half()
    v = (2.0 + 0.1 * torch.randn(1, 1, 36000, 16, generator=g)).half()
    out_s = torch.randn(1, 1, 64, 16, generator=g).half()
    w, b = torch.eye(16), torch.zeros(16)
    S, _ = linear_all.total_states(k, v, "elu")
    assert S.abs().max() > 65504   # the raw state would overflow fp16
    got = linear_all.sla_all_fwd_triton(out_s, q, k, v, w, b, "elu")
    want = lb.sla_all_output(out_s.double(), q.double(), k.double(), v.double(), w.double(),
                                         b.double(), "elu", 1e-5)
    assert torch.isfinite(got).all() and rel_err(got, want) < TOL[torch.float16]


def test_sparse_linear_attention_takes_the_kernels(monkeypatch):
    """sparse_linear_attention with combine='sla-all' runs sparge::sla_all's Triton kernels (here
    in the interpreter) and gives the PyTorch definition's output."""
    calls = []
    real = linear_all.sla_all_fwd_triton
    monkeypatch.setattr(linear_all, "sla_all_fwd_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(3, 1, 2, 1, 96, 128, 16, torch.float32)
    branch = lb.LinearBranch(16, combine="sla-all")
    with torch.no_grad():
        for p in branch.parameters():
            p.uniform_(-0.5, 0.5)
    cfg = SpargeConfig(topk=0.3, topp=0.5, block_q=32, block_k=32, min_seq_len=0)
    got = lb.sparse_linear_attention(q, k, v, branch, cfg)
    assert calls == [1]
    monkeypatch.setattr(kernels, "use_triton", lambda t: False)
    want = lb.sparse_linear_attention(q, k, v, branch, cfg)
    assert rel_err(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("D,Hq,Hkv,kind", [(128, 4, 2, "softmax"), (64, 2, 2, "elu"), (72, 2, 1, "softmax")])
def test_gpu_bf16_long(D, Hq, Hkv, kind):
    pb = dict(seed=D, B=1, Hq=Hq, Hkv=Hkv, Nq=8000, Nk=8192, D=D, dtype=torch.bfloat16, kind=kind, bias=True)
    xs = _inputs(pb, "cuda")
    out = ops_linear.sla_all_op(*xs, kind, 1e-5)
    dout = torch.randn_like(out)
    ref, ref_grads = _reference(xs, pb, dout)
    assert rel_err(out.cpu(), ref) < TOL[torch.bfloat16]
    grads = torch.autograd.grad(out, xs, dout)
    for name, g, r in zip(["out_s", "q", "k", "v", "weight", "bias"], grads, ref_grads):
        assert rel_err(g.cpu(), r) < 4 * TOL[torch.bfloat16], name

