"""Property tests of the Triton kernels (CPU: Triton's interpreter) against the float64 reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import (
    TOL,
    grad_errors,
    gradient_magnitudes,
    make_qkv,
    mask_mismatch_is_tie,
    reference_out_and_grads,
    rel_err,
)

import sparge_compile as sc
from sparge_compile import reference as R
from sparge_compile.kernels import mask as mask_kernel

blocks = st.sampled_from([16, 32])


@st.composite
def problems(draw, max_n=96, dtypes=(torch.float32, torch.float16), head_dims=(32, 64)):
    Hkv = draw(st.integers(1, 2))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.integers(1, 2)),
        Nq=draw(st.integers(1, max_n)), Nk=draw(st.integers(1, max_n)),
        D=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.booleans()),
        cfg=sc.SpargeConfig(topk=draw(st.floats(0, 1)), topp=draw(st.floats(0, 1)),
                            mode=draw(st.sampled_from(["hybrid", "topk", "topp"])),
                            block_q=draw(blocks), block_k=draw(blocks), min_seq_len=0),
    )


def _inputs(pb, requires_grad=False):
    return make_qkv(pb["seed"], pb["B"], pb["Hq"], pb["Hkv"], pb["Nq"], pb["Nk"], pb["D"], pb["dtype"],
                    requires_grad=requires_grad)


@given(problems())
def test_mask_matches_reference(pb):
    q, k, _ = _inputs(pb)
    m = sc.predict_block_mask(q, k, is_causal=pb["causal"], config=pb["cfg"])
    dense = m.to_dense()
    ok, ref = mask_mismatch_is_tie(q, k, dense, pb["cfg"], pb["causal"])
    assert ok, f"mask differs from the reference beyond near-ties: {(dense != ref).sum()} blocks"
    # every query block keeps at least one key block; kept indices are valid and ascending
    assert (m.kv_num_blocks >= 1).all()
    nk = dense.shape[-1]
    idx = m.kv_indices.long()
    assert ((idx >= 0) & (idx < nk)).all()
    assert (idx.sort(-1).values == torch.arange(nk)).all(), "kv_indices must be a permutation"


@given(problems())
def test_kept_count_is_max_of_rules(pb):
    """Without causal forcing, each row keeps exactly max(c_k, c_p, 1) (c for one-rule modes)."""
    pb["causal"] = False
    q, k, _ = _inputs(pb)
    cfg = pb["cfg"]
    m = sc.predict_block_mask(q, k, config=cfg)
    scale = 1.0 / math.sqrt(pb["D"])
    p = R.block_scores(q.double(), k.double(), scale, False, cfg.block_q, cfg.block_k)
    nvis = torch.full(p.shape[:-1], p.shape[-1])
    _, _, c = R.keep_counts(p, nvis, cfg.topk, cfg.topp, cfg.mode)
    assert torch.equal(c, _counts_by_loop(p, cfg.topk, cfg.topp, cfg.mode))
    got = m.kv_num_blocks.long()
    if not torch.equal(got, c):
        ok, _ = mask_mismatch_is_tie(q, k, m.to_dense(), cfg, False)
        assert ok and (got - c).abs().max() <= 1


def _counts_by_loop(p, topk, topp, mode):
    """The keep rule row by row, written from its definition (an oracle for keep_counts)."""
    rows = p.reshape(-1, p.shape[-1]).tolist()
    out = []
    for row in rows:
        n = len(row)
        c_k = math.ceil(float(np.float32(topk) * np.float32(n)))
        mass, c_p = 0.0, 0
        for x in sorted(row, reverse=True):
            if mass >= topp:
                break
            mass, c_p = mass + x, c_p + 1
        c = {"hybrid": max(c_k, c_p), "topk": c_k, "topp": c_p}[mode]
        out.append(max(1, min(c, n)))
    return torch.tensor(out).reshape(p.shape[:-1])


@given(problems())
def test_forward_matches_float64_reference(pb):
    q, k, v = _inputs(pb)
    out, m = sc.sparse_attention(q, k, v, is_causal=pb["causal"], config=pb["cfg"], return_mask=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    ref, _ = reference_out_and_grads(q, k, v, m.to_dense(), pb["cfg"], pb["causal"])
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[pb["dtype"]]


# one key (Nk = 1): every dS cancels to exactly zero, dK is pure rounding noise (found by hypothesis
# on the TMA path; the error is measured against the gradient's magnitude, see grad_errors)
ONE_KEY = dict(seed=2**31 - 1, B=2, Hkv=2, Hq=4, Nq=59, Nk=1, D=32, dtype=torch.float32, causal=True,
               cfg=sc.SpargeConfig(topk=0.8, topp=0.8, block_q=16, block_k=16, min_seq_len=0))


@settings(max_examples=8)
@given(problems(max_n=80))
@example(ONE_KEY)
def test_backward_matches_float64_reference(pb):
    q, k, v = _inputs(pb, requires_grad=True)
    out, m = sc.sparse_attention(q, k, v, is_causal=pb["causal"], config=pb["cfg"], return_mask=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, ref_grads = reference_out_and_grads(q, k, v, m.to_dense(), pb["cfg"], pb["causal"], dout)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and g.dtype == pb["dtype"]
    mags = gradient_magnitudes(q, k, v, m.to_dense(), pb["cfg"], pb["causal"], dout)
    errs = grad_errors(grads, ref_grads, mags, floor=1e-2)
    assert max(errs.values()) < 2 * TOL[pb["dtype"]], errs


@settings(max_examples=5)
@given(problems(max_n=80, dtypes=(torch.float32,)), st.sampled_from(["topk", "topp"]))
def test_full_budget_equals_dense_sdpa(pb, rule):
    cfg = pb["cfg"].replace(mode="hybrid", **{rule: 1.0})
    q, k, v = _inputs(pb)
    out, m = sc.sparse_attention(q, k, v, is_causal=pb["causal"], config=cfg, return_mask=True)
    assert m.sparsity() == pytest.approx(0.0, abs=1e-9)
    Hq, Hkv = q.shape[1], k.shape[1]
    dense = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(Hq // Hkv, 1),
                                           v.double().repeat_interleave(Hq // Hkv, 1),
                                           is_causal=pb["causal"])
    assert rel_err(out, dense) < TOL[pb["dtype"]]


@settings(max_examples=5)
@given(problems(max_n=96, dtypes=(torch.float32,)), st.integers(0, 3))
def test_sparsity_falls_as_budget_rises(pb, which):
    q, k, _ = _inputs(pb)
    cfg = pb["cfg"].replace(mode="hybrid")
    grid = [0.0, 0.1, 0.3, 0.6, 1.0]
    field = "topk" if which % 2 else "topp"
    sp = [sc.predict_block_mask(q, k, is_causal=pb["causal"], config=cfg.replace(**{field: x})).sparsity()
          for x in grid]
    assert all(a >= b - 1e-12 for a, b in zip(sp, sp[1:])), sp
    assert sp[-1] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=5)
@given(problems(max_n=96))
def test_bisection_path_matches_reference(pb):
    """The large-nk selection path (bit-pattern bisection), forced on small shapes."""
    mask_kernel._FORCE_BISECTION = True
    try:
        q, k, _ = _inputs(pb)
        m = sc.predict_block_mask(q, k, is_causal=pb["causal"], config=pb["cfg"])
        ok, _ = mask_mismatch_is_tie(q, k, m.to_dense(), pb["cfg"], pb["causal"])
        assert ok
    finally:
        mask_kernel._FORCE_BISECTION = False


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 32), st.integers(1, 6),
       st.floats(0.0, 1.0), st.booleans())
def test_bisection_top_k_equals_pairwise_ranking_with_ties(seed, nq, nk, levels, topk, causal):
    """Top-k on block scores with many exact ties (few distinct levels): the bit-pattern
    bisection (which stops early at a cut with exactly c blocks above it) keeps exactly the
    blocks of the pairwise ranking (value, then lower index first)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (1, 2, nq, nk), generator=g).float() * 0.5
    args = (scores, nq * 16, nk * 16, causal, topk, 0.0, "topk", 16, 16)
    pair = mask_kernel.select_triton(*args)
    mask_kernel._FORCE_BISECTION = True
    try:
        bis = mask_kernel.select_triton(*args)
    finally:
        mask_kernel._FORCE_BISECTION = False
    assert torch.equal(pair[0], bis[0]) and torch.equal(pair[1], bis[1])


@pytest.mark.parametrize("D", [8, 32, 40, 64, 72, 96, 128, 160, 256])
def test_head_dims(D):
    q, k, v = make_qkv(D, 1, 2, 1, 40, 50, D, torch.float32)
    cfg = sc.SpargeConfig(topk=0.3, topp=0.3, block_q=16, block_k=16, min_seq_len=0)
    out, m = sc.sparse_attention(q, k, v, config=cfg, return_mask=True)
    ref, _ = reference_out_and_grads(q, k, v, m.to_dense(), cfg, False)
    assert rel_err(out, ref) < 1e-5


# head dims that are no power of two run in the next power of two's tile, masked past D
PADDED = [(40, torch.float32, True, (16, 32)), (72, torch.float32, False, (32, 16)),
          (40, torch.float16, False, (16, 16)), (72, torch.float16, True, (16, 16))]


@pytest.mark.parametrize("D,dtype,causal,blocks", PADDED)
def test_padded_head_dim_mask_forward_backward(D, dtype, causal, blocks):
    """Mask prediction, forward and backward at a padded head dim (GQA, partial blocks) against
    the float64 reference: the padding columns never reach a score, an output or a gradient."""
    q, k, v = make_qkv(D + causal, 1, 4, 2, 45, 70, D, dtype, requires_grad=True)
    cfg = sc.SpargeConfig(topk=0.3, topp=0.4, block_q=blocks[0], block_k=blocks[1], min_seq_len=0)
    out, m = sc.sparse_attention(q, k, v, is_causal=causal, config=cfg, return_mask=True)
    ok, _ = mask_mismatch_is_tie(q, k, m.to_dense(), cfg, causal)
    assert ok and 0.0 < m.sparsity() < 1.0
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = reference_out_and_grads(q, k, v, m.to_dense(), cfg, causal, dout)
    assert out.shape == q.shape and rel_err(out, ref) < TOL[dtype]
    errs = grad_errors(grads, ref_grads, gradient_magnitudes(q, k, v, m.to_dense(), cfg, causal, dout),
                       floor=1e-2)
    assert max(errs.values()) < 2 * TOL[dtype], errs


@pytest.mark.parametrize("D", [40, 72])
def test_pooling_pads_head_dim_with_zeros(D):
    """Block means over the real columns, zeros in the tile's padding (so the block scores are
    those of the unpadded q, k)."""
    q, k, _ = make_qkv(D, 1, 2, 1, 37, 50, D, torch.float32)
    qb, kb = mask_kernel.pool_qk_triton(q, k, 16, 32)
    tile = 1 << (D - 1).bit_length()
    assert qb.shape == (1, 2, 3, tile) and kb.shape == (1, 1, 2, tile)
    assert not qb[..., D:].any() and not kb[..., D:].any()
    assert torch.allclose(qb[..., :D], R.pool_blocks(q.double(), 16).float(), atol=1e-6)
    assert torch.allclose(kb[..., :D], R.pool_blocks(k.double(), 32).float(), atol=1e-6)


@pytest.mark.parametrize("D", [4, 20, 44, 264, 512])
def test_unsupported_head_dim_raises_naming_it(D):
    q, k, v = make_qkv(0, 1, 1, 1, 20, 20, D, torch.float32)
    with pytest.raises(ValueError, match=f"head dim {D} .*multiple of 8 up to 256"):
        sc.sparse_attention(q, k, v)
    with pytest.raises(ValueError, match=f"head dim {D} "):
        sc.predict_block_mask(q, k)


def test_sink_row_keeps_more_than_topp_alone():
    """Paper's example: a row dominated by a sink keeps more blocks under hybrid than Top-p."""
    p = torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.05]], dtype=torch.float64)
    n = torch.tensor([5])
    assert R.keep_counts(p, n, 0.0, 0.6, "topp")[2].item() == 1
    assert R.keep_counts(p, n, 0.5, 0.6, "hybrid")[2].item() == 3


@settings(max_examples=4)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 20), st.booleans())
def test_transposed_index_kernel(seed, nq, nk, garbage_tail):
    """The backward's transposed index (Triton, used on the GPU) equals the torch one; entries
    past kv_num (arbitrary in a FlexAttention BlockMask) are ignored."""
    from sparge_compile.kernels import torch_impl
    from sparge_compile.kernels.transpose import transpose_indices_triton

    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(2, 2, nq, nk, generator=g) < 0.4
    num, idx = torch_impl.dense_to_indices(dense)
    if garbage_tail:
        idx = torch.where(torch.arange(nk) < num[..., None], idx, 0)
    q_num, q_idx = transpose_indices_triton(num, idx, nk)
    assert torch.equal(torch_impl.indices_to_dense(q_num, q_idx, nq), dense.transpose(-2, -1))
    ref_num, ref_idx = torch_impl.dense_to_indices(dense.transpose(-2, -1))
    assert torch.equal(q_num, ref_num) and torch.equal(q_idx, ref_idx)


# a padded head dim: the descriptors load the 64-wide tile, columns past D = 40 read as zeros
TMA_PADDED = dict(seed=3, B=1, Hkv=1, Hq=2, Nq=50, Nk=37, D=40, dtype=torch.float32, causal=False,
                  cfg=sc.SpargeConfig(topk=0.5, topp=0.5, block_q=16, block_k=16, min_seq_len=0))


@settings(max_examples=2)  # backward in the interpreter: ~10-30 s per example
@given(problems(max_n=64, head_dims=(32,), dtypes=(torch.float32,)))
@example(TMA_PADDED)
def test_tma_path_matches_reference(monkeypatch_tma, pb):
    """The kernels' TMA path (tensor descriptors for K/V in the forward and dQ, Q/dO in dK/dV; on
    by default on Hopper GPUs), forced on in the interpreter: rows past the end read as zeros,
    GQA and causal tiles, forward and gradients as the float64 reference."""
    q, k, v = _inputs(pb, requires_grad=True)
    calls = monkeypatch_tma["calls"]
    out, m = sc.sparse_attention(q, k, v, config=pb["cfg"], is_causal=pb["causal"], return_mask=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert monkeypatch_tma["calls"] >= calls + 6  # forward: k, v; backward: q, k, v, dout
    ref, ref_grads = reference_out_and_grads(q, k, v, m.to_dense(), pb["cfg"], pb["causal"], dout)
    assert rel_err(out, ref) < TOL[pb["dtype"]]
    mags = gradient_magnitudes(q, k, v, m.to_dense(), pb["cfg"], pb["causal"], dout)
    errs = grad_errors(grads, ref_grads, mags, floor=1e-2)
    assert max(errs.values()) < 2 * TOL[pb["dtype"]], errs



@settings(max_examples=4, deadline=None)
@given(problems(max_n=80, head_dims=(32, 40)))
@example(TMA_PADDED)
def test_device_descriptor_forward_matches_reference(pb):
    """The forward with K/V descriptors built in the kernel (tl.make_tensor_descriptor: the
    path traced for Inductor on Hopper), run by the interpreter: out and lse as the float64
    reference on the same mask, rows past Nk and columns past D reading as zeros."""
    from sparge_compile.kernels import forward, torch_impl

    q, k, v = _inputs(pb)
    cfg = pb["cfg"]
    m = sc.predict_block_mask(q, k, is_causal=pb["causal"], config=cfg)
    assert forward.tma_mode(q, k, v, "device") == "device"
    args = (m.kv_num_blocks, m.kv_indices, q.shape[-1] ** -0.5, pb["causal"], cfg.block_q, cfg.block_k)
    out, lse = forward.attention_fwd_triton(q, k, v, *args, use_tma="device")
    ref, ref_lse = torch_impl.attention_fwd(q.double(), k.double(), v.double(), *args)
    assert rel_err(out, ref) < TOL[pb["dtype"]]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin].double(), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def monkeypatch_tma():
    from sparge_compile.kernels import forward

    seen = {"calls": 0}
    real = forward.tma_ok

    def always(x, D):
        seen["calls"] += 1
        return x.stride(-1) == 1

    forward.tma_ok, default = always, forward.USE_TMA_DEFAULT
    forward.USE_TMA_DEFAULT = True
    yield seen
    forward.tma_ok, forward.USE_TMA_DEFAULT = real, default
