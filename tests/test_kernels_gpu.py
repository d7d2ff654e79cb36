"""GPU suite (run on a CUDA machine with `pytest -m gpu`): bf16, large shapes, no recompiles."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
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
from sparge_compile.kernels import torch_impl, tuning

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def fixed_launches():
    """The fixed launch settings here: autotuning costs ~11 compiles per key, and these tests
    walk many keys (head dims, dtypes, block shapes, causal). The autotuned launches have their
    own test below."""
    saved, tuning.AUTOTUNE = tuning.AUTOTUNE, False
    yield
    tuning.AUTOTUNE = saved


@st.composite
def gpu_problems(draw):
    Hkv = draw(st.integers(1, 2))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), B=draw(st.integers(1, 2)), Hkv=Hkv,
        Hq=Hkv * draw(st.sampled_from([1, 2, 3])), Nq=draw(st.integers(1, 700)),
        Nk=draw(st.integers(1, 700)), D=draw(st.sampled_from([64, 128])),
        dtype=torch.bfloat16,
        causal=draw(st.booleans()),
        cfg=sc.SpargeConfig(topk=draw(st.floats(0, 1)), topp=draw(st.floats(0, 1)),
                            mode=draw(st.sampled_from(["hybrid", "topk", "topp"])),
                            min_seq_len=0))


@settings(max_examples=25, deadline=None)
@given(gpu_problems())
def test_gpu_matches_float64_reference(pb):
    q, k, v = make_qkv(pb["seed"], pb["B"], pb["Hq"], pb["Hkv"], pb["Nq"], pb["Nk"], pb["D"], pb["dtype"],
                       device="cuda", requires_grad=True)
    out, m = sc.sparse_attention(q, k, v, is_causal=pb["causal"], config=pb["cfg"], return_mask=True)
    ok, _ = mask_mismatch_is_tie(q, k, m.to_dense(), pb["cfg"], pb["causal"])
    assert ok
    assert (m.kv_num_blocks >= 1).all()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(pb["seed"])).to(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = reference_out_and_grads(q, k, v, m.to_dense(), pb["cfg"], pb["causal"], dout)
    tol = TOL[pb["dtype"]] * (30 if pb["dtype"] == torch.float32 else 1)  # fp32 on GPU: exact dots
    assert rel_err(out.cpu(), ref) < tol
    mags = gradient_magnitudes(q, k, v, m.to_dense(), pb["cfg"], pb["causal"], dout)
    errs = grad_errors(grads, ref_grads, mags)
    assert max(errs.values()) < 2 * tol, errs


@pytest.mark.parametrize("D,dtype,blocks,causal,tma", [
    (32, torch.float16, (64, 32), False, True), (96, torch.bfloat16, (128, 64), True, True),
    (256, torch.bfloat16, (64, 64), False, True), (64, torch.float32, (128, 64), False, True),
    # padded head dims (a power-of-two tile masked past D), through TMA and through pointer loads
    (40, torch.float16, (64, 64), True, True), (40, torch.bfloat16, (128, 64), False, False),
    (72, torch.bfloat16, (128, 64), False, True), (72, torch.float16, (64, 32), True, False),
    (80, torch.bfloat16, (128, 64), True, True), (80, torch.float32, (64, 64), False, True),
    (160, torch.bfloat16, (64, 64), True, True), (160, torch.float16, (128, 64), False, False),
    # wide tile rows (fp32 at a 128 tile, bf16 at 256): fewer pipelining stages where they would not fit
    (72, torch.float32, (64, 64), False, False), (160, torch.bfloat16, (64, 64), False, False),
    # blocks whose buffers do not fit even one stage: split tiles (tuning.fit_tiles); the fp32
    # 128 x 128 backward at D = 128 asked 262152 of the H200's 232448 bytes before them
    (128, torch.float32, (128, 128), False, True), (128, torch.float32, (128, 128), True, False),
    (128, torch.float32, (256, 256), True, True), (256, torch.bfloat16, (256, 256), False, True),
    # fp32 at a 256 tile (did not finish compiling within minutes on the H200, 2026-12-04: exact
    # fp32 dots are FMA loops): the PyTorch path (tuning.wide_exact_fp32)
    (256, torch.float32, (128, 128), True, False)])
def test_gpu_other_head_dims_dtypes_blocks(monkeypatch, D, dtype, blocks, causal, tma):
    from sparge_compile.kernels import forward

    monkeypatch.setattr(forward, "USE_TMA_DEFAULT", tma)
    pb = dict(seed=D, B=2, Hq=4, Hkv=2, Nq=555, Nk=613, D=D, dtype=dtype, causal=causal,
              cfg=sc.SpargeConfig(topk=0.1, topp=0.3, block_q=blocks[0], block_k=blocks[1], min_seq_len=0))
    test_gpu_matches_float64_reference.hypothesis.inner_test(pb)


LARGE = ([(n, d, c) for n in (8192, 32768) for d in (64, 128) for c in (False, True)]
         + [(32768, 72, False), (8192, 72, True), (8192, 80, False), (8192, 160, True)])  # padded dims


@pytest.mark.parametrize("N,D,causal", LARGE)
def test_gpu_large_bf16(N, D, causal):
    """bf16 at long sequence lengths against a float32 reference on the GPU (chunked)."""
    H = 2
    q, k, v = make_qkv(N + D, 1, H, H, N, N, D, torch.bfloat16, device="cuda", requires_grad=True)
    cfg = sc.SpargeConfig(topk=0.03, topp=0.2)
    out, m = sc.sparse_attention(q, k, v, is_causal=causal, config=cfg, return_mask=True)
    assert 0.5 < m.sparsity() < 1.0
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (x.detach().float() for x in (q, k, v))
    scale = D ** -0.5
    ref, lse = torch_impl.attention_fwd(qf, kf, vf, m.kv_num_blocks, m.kv_indices, scale, causal, 128, 64)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    ref_grads = torch_impl.attention_bwd(dout.float(), qf, kf, vf, ref, lse, m.kv_num_blocks, m.kv_indices,
                                         scale, causal, 128, 64)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < TOL[torch.bfloat16], f"d{name}"


def test_gpu_topk_topp_change_does_not_recompile():
    from sparge_compile.kernels import mask as mk

    q, k, _ = make_qkv(0, 1, 2, 2, 4096, 4096, 128, torch.bfloat16, device="cuda")
    sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=0.1, topp=0.1))
    caches = getattr(mk._select_kernel, "device_caches", None)
    assert caches, "Triton JITFunction.device_caches not found"
    before = sum(len(c[0]) for c in caches.values())
    for t in (0.02, 0.05, 0.3):
        sc.predict_block_mask(q, k, config=sc.SpargeConfig(topk=t, topp=t / 2))
    after = sum(len(c[0]) for c in caches.values())
    assert before == after >= 1


def test_gpu_autotuned_launches_match_fixed(monkeypatch):
    """On CUDA the kernels are autotuned per key (head dim, block shape, causal, TMA, dtypes) on
    the first large enough grid: a small first call tunes nothing; the autotuned launches give
    the fixed launches' results, each kernel records its pick, and a new sequence length (large
    or small) reuses it."""
    monkeypatch.setattr(tuning, "_PICKED", {})
    cfg = sc.SpargeConfig(topk=0.2, topp=0.3, min_seq_len=0)
    big = 40000  # >= 16 programs per SM on an H100 in every kernel (B=1, 8 heads)
    results = []
    try:
        for autotune in (False, True):
            tuning.AUTOTUNE = autotune
            if autotune:  # small first call: launch-bound, must not decide the settings
                q, k, v = make_qkv(6, 1, 8, 8, 1000, 1000, 128, torch.bfloat16, device="cuda",
                                   requires_grad=True)
                sc.sparse_attention(q, k, v, config=cfg).sum().backward()
                assert tuning.best_configs() == {}
            q, k, v = make_qkv(7, 1, 8, 8, big, big, 128, torch.bfloat16, device="cuda", requires_grad=True)
            out = sc.sparse_attention(q, k, v, config=cfg)
            dout = torch.randn(out.shape, device="cuda", dtype=out.dtype,
                               generator=torch.Generator("cuda").manual_seed(1))
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
        picked = tuning.best_configs()
        assert all(len(picked.get(name, ())) == 1 for name in ("_fwd_kernel", "_bwd_dq_kernel",
                                                              "_bwd_dkdv_kernel")), picked
        for a, b in zip(*results):
            assert rel_err(a, b) < 1e-2
        for n in (big + 3200, 1536):  # whole 64-key blocks like big: the same keys
            q, k, v = make_qkv(8, 1, 8, 8, n, n, 128, torch.bfloat16, device="cuda")
            sc.sparse_attention(q, k, v, config=cfg)
            assert tuning.best_configs() == picked  # the length is not in the key
    finally:
        tuning.AUTOTUNE = False


@pytest.mark.parametrize("use_tma", [False, True, "device"])
@pytest.mark.parametrize("N", [4096, 4000])
def test_gpu_token_major_inputs_give_token_major_output(use_tma, N):
    """(B, N, H, D)-major q/k/v (diffusers' layout) give the same output and lse, bit for bit, as
    contiguous copies, in a (B, N, H, D)-major output (SDPA's: the transpose back is a view), and
    the gradients through it match the contiguous inputs' (kernels.layout)."""
    from sparge_compile.kernels.forward import attention_fwd_triton

    g = torch.Generator(device="cuda").manual_seed(N)
    q, k, v = (torch.randn(2, N, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for _ in range(3))
    cfg = sc.SpargeConfig(topk=0.1, topp=0.0, min_seq_len=0)
    m = sc.predict_block_mask(q, k, config=cfg)
    args = (m.kv_num_blocks, m.kv_indices, 128 ** -0.5, False, cfg.block_q, cfg.block_k)
    out, lse = attention_fwd_triton(q, k, v, *args, use_tma=use_tma)
    ref, ref_lse = attention_fwd_triton(*(x.contiguous() for x in (q, k, v)), *args, use_tma=use_tma)
    assert out.transpose(1, 2).is_contiguous() and ref.is_contiguous()
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    qc, kc, vc = (x.detach().contiguous().requires_grad_(True) for x in (q, k, v))
    dout = torch.randn_like(ref)
    a = torch.autograd.grad(sc.sparse_attention(qg, kg, vg, block_mask=m), (qg, kg, vg), dout)
    b = torch.autograd.grad(sc.sparse_attention(qc, kc, vc, block_mask=m), (qc, kc, vc), dout)
    for x, y in zip(a, b):   # bf16 tolerances: the backward's reduction order may differ
        torch.testing.assert_close(x, y)
