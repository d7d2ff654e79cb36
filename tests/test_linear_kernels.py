"""The Triton linear-branch kernels (sparge_compile/kernels/linear.py, op sparge::linear_dropped)
against the float64 PyTorch definition (linear_branch.linear_attention_dropped): forward and
gradients (torch.autograd on the reference), hypothesis-drawn shapes on the CPU interpreter,
bf16 at larger shapes on the GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import TOL, make_qkv, rel_err

from sparge_compile import SpargeConfig, kernels, ops_linear
from sparge_compile import linear_branch as lb
from sparge_compile.kernels.linear import block_states_triton, linear_fwd_triton
from sparge_compile.kernels.torch_impl import dense_to_indices

needs_triton = pytest.mark.skipif(not kernels.use_triton(torch.empty(1)) and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
pytestmark = needs_triton


@st.composite
def problems(draw, max_n=80, dtypes=(torch.float32, torch.float16)):
    Hkv = draw(st.integers(1, 2))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), B=draw(st.integers(1, 2)), Hkv=Hkv,
                Hq=Hkv * draw(st.integers(1, 2)), Nq=draw(st.integers(1, max_n)),
                Nk=draw(st.integers(1, max_n)),
                D=draw(st.sampled_from([16, 24, 32])), dtype=draw(st.sampled_from(dtypes)),
                causal=draw(st.booleans()), kind=draw(st.sampled_from(lb.FEATURE_MAPS)),
                p_keep=draw(st.floats(0, 1)), bq=draw(st.sampled_from([16, 32])),
                bk=draw(st.sampled_from([16, 32])))


def _inputs(pb, device="cpu", requires_grad=False):
    q, k, v = make_qkv(pb["seed"], pb["B"], pb["Hq"], pb["Hkv"], pb["Nq"], pb["Nk"], pb["D"], pb["dtype"],
                       device=device, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(pb["seed"] + 1)
    nq, nk = -(-pb["Nq"] // pb["bq"]), -(-pb["Nk"] // pb["bk"])
    keep = torch.rand(pb["B"], pb["Hq"], nq, nk, generator=g) < pb["p_keep"]
    keep[..., 0, :] = True                       # a query block that drops nothing: O_lin = 0 there
    num, idx = dense_to_indices(keep)
    return q, k, v, keep, num.to(device), idx.to(device)


def _reference(q, k, v, keep, pb, dout=None):
    qd, kd, vd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    ref = lb.linear_attention_dropped(qd, kd, vd, keep.cpu(), pb["bq"], pb["bk"], pb["causal"], pb["kind"],
                                      1e-5)
    if dout is None:
        return ref, None
    return ref, torch.autograd.grad(ref, (qd, kd, vd), dout.double().cpu())


def _op(q, k, v, num, idx, pb):
    return ops_linear.linear_dropped_op(q, k, v, num, idx, pb["bq"], pb["bk"], pb["causal"], pb["kind"], 1e-5)


@given(problems())
def test_forward_matches_float64_reference(pb):
    q, k, v, keep, num, idx = _inputs(pb)
    out = _op(q, k, v, num, idx, pb)
    ref, _ = _reference(q, k, v, keep, pb)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[pb["dtype"]]
    assert (out[:, :, : pb["bq"]] == 0).all()    # exact zero, not a cancelled total


@settings(max_examples=25)
@given(problems())
def test_recompute_forward_matches_float64_reference(pb):
    """kernels/linear_recompute.py (opt-in: no per-block states; non-causal, head dims <= 128):
    the same O_lin, and it really ran (its kernel counted)."""
    from sparge_compile.kernels import linear_recompute as lr

    pb = dict(pb, causal=False)
    q, k, v, keep, num, idx = _inputs(pb)
    calls = []
    real = lr.linear_fwd_recompute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lr, "RECOMPUTE", True)
        mp.setattr(lr, "CHUNK", 2)   # several chunks of key blocks even at these sizes
        mp.setattr(lr, "linear_fwd_recompute", lambda *a: calls.append(1) or real(*a))
        out = linear_fwd_triton(q, k, v, num, idx, pb["bq"], pb["bk"], False, pb["kind"], 1e-5)
    assert calls == [1]
    ref, _ = _reference(q, k, v, keep, pb)
    assert out.dtype == q.dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[pb["dtype"]]
    assert (out[:, :, : pb["bq"]] == 0).all()    # exact zero where the block drops nothing


@settings(max_examples=6)
@given(problems(max_n=72))
def test_backward_matches_float64_reference(pb):
    q, k, v, keep, num, idx = _inputs(pb, requires_grad=True)
    out = _op(q, k, v, num, idx, pb)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(pb["seed"])).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, ref_grads = _reference(q, k, v, keep, pb, dout)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == q.dtype
        assert rel_err(g, r) < 4 * TOL[pb["dtype"]], name


@pytest.mark.parametrize("is_causal", [False, True])
def test_states_match_reference_and_count_real_keys(is_causal):
    """S_j, z_j per key block; the partial last block (40 = 2·16 + 8) sums φ over its 8 real keys."""
    _, k, v = make_qkv(3, 1, 2, 2, 8, 40, 24, torch.float32)
    S, z = block_states_triton(k, v, 16, "softmax")
    S_ref, z_ref = lb.block_states(k.double(), v.double(), 16, "softmax")
    assert rel_err(S, S_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5
    torch.testing.assert_close(z[:, :, -1].sum(-1), torch.full_like(z[:, :, -1, 0], 8.0))


def test_strided_inputs_and_other_value_dim():
    """q, k, v as transposed (B, N, H, D) views, and v with Dv != D: the kernels read strides and
    return contiguous gradients."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 37, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 50, 2, 32, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 50, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    keep = torch.rand(1, 2, 3, 4, generator=g) < 0.3
    num, idx = dense_to_indices(keep)
    pb = dict(bq=16, bk=16, causal=False, kind="elu")
    out = _op(q, k, v, num, idx, pb)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _reference(q, k, v, keep, pb, dout)
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))


def test_bad_feature_map_is_rejected():
    q, k, v = make_qkv(0, 1, 1, 1, 16, 16, 16, torch.float32)
    num, idx = dense_to_indices(torch.zeros(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="feature_map"):
        linear_fwd_triton(q, k, v, num, idx, 16, 16, False, "relu")


def test_op_registration_passes_opcheck():
    q, k, v = make_qkv(1, 1, 2, 1, 20, 40, 16, torch.float32, requires_grad=True)
    keep = torch.rand(1, 2, 2, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    num, idx = dense_to_indices(keep)
    torch.library.opcheck(ops_linear.linear_dropped_op, (q, k, v, num, idx, 16, 16, True, "softmax", 1e-5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("combine", lb.COMBINES)
def test_sparse_linear_attention_routes_to_the_kernels_and_compiles(combine):
    """sparse_linear_attention takes the Triton op here (float32 under the interpreter); it gives
    the float64 PyTorch path's output and gradients, and compiles with fullgraph=True."""
    q, k, v = make_qkv(4, 1, 2, 1, 48, 64, 16, torch.float32, requires_grad=True)
    cfg = SpargeConfig(topk=0.3, topp=0.3, block_q=16, block_k=16, min_seq_len=0)
    branch = lb.LinearBranch(16, 2, combine=combine)
    with torch.no_grad():
        for p in branch.parameters():
            p.uniform_(0.1, 0.5)
    m = lb.predict_block_mask(q.detach(), k.detach(), None, True, cfg)
    assert not m.to_dense()[..., -1, :].all()       # the last query block drops something
    out = lb.sparse_linear_attention(q, k, v, branch, cfg, True, block_mask=m)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = lb.sparse_linear_attention(qd, kd, vd, branch.double(), cfg, True, block_mask=m)
    assert rel_err(out, ref) < 1e-5
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref.sum(), (qd, kd, vd))
    assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5 and rel_err(dv, rv) < 1e-5
    branch.float()
    compiled = torch.compile(lb.sparse_linear_attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, branch, cfg, True, block_mask=m), out)


GPU_CASES = [(1, 4, 2, 4133, 4133, 64, False, "softmax"), (1, 4, 4, 4096, 4096, 128, True, "softmax"),
             (2, 2, 1, 1000, 3000, 128, False, "elu")]


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,causal,kind", GPU_CASES)
def test_gpu_bf16_forward_and_backward(B, Hq, Hkv, Nq, Nk, D, causal, kind):
    pb = dict(seed=7, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, dtype=torch.bfloat16, causal=causal, kind=kind,
              p_keep=0.1, bq=128, bk=64)
    q, k, v, keep, num, idx = _inputs(pb, device="cuda", requires_grad=True)
    out = _op(q, k, v, num, idx, pb)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _reference(q, k, v, keep, pb, dout)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, r) < 2 * TOL[torch.bfloat16], name
