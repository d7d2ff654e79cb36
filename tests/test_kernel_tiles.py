"""Split tiles (tuning.fit_tiles): where a mask block's buffers do not fit the shared memory, the
kernels run it as several programs of fewer rows and in several steps of fewer keys; where not
even 16 x 16 fits, the PyTorch path. Forced here by a small SMEM_LIMIT, in Triton's interpreter,
against the float64 reference (an fp32 128 x 128 block at D = 128 did not fit the H200)."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import TOL, make_qkv, reference_out_and_grads, rel_err

import sparge_compile as sc
from sparge_compile import kernels
from sparge_compile.kernels import tuning

H200 = 232448 - 1024


def test_fit_tiles_whole_block_where_it_fits_and_split_where_not():
    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)
    tuning_limit = tuning.SMEM_LIMIT
    try:
        tuning.SMEM_LIMIT = H200
        assert tuning.fit_tiles(128, 64, 256, 512, bf16) == (128, 64)     # forward, bf16, D = 128
        assert tuning.fit_tiles(128, 128, 1024, 1024, fp32) == (128, 64)  # dQ, fp32 128 x 128: split
        assert tuning.fit_tiles(256, 256, 1024, 1024, fp32) == (128, 64)
        tm, tn = tuning.fit_tiles(256, 256, 2048, 2048, fp32)             # fp32 at a 256 tile
        assert tm * 2048 + tn * 2048 <= H200 and min(tm, tn) >= 16
        assert tuning.fit_tiles(16, 16, 10 ** 5, 10 ** 5, fp32) is None
    finally:
        tuning.SMEM_LIMIT = tuning_limit
    assert tuning.fit_tiles(256, 256, 10 ** 6, 10 ** 6, fp32) == (256, 256)   # no limit on the CPU


CASES = [dict(B=1, Hq=2, Hkv=2, Nq=150, Nk=130, causal=False, keep=False),
         dict(B=2, Hq=4, Hkv=2, Nq=130, Nk=130, causal=True, keep=False),
         dict(B=1, Hq=2, Hkv=1, Nq=100, Nk=140, causal=False, keep=True)]


@pytest.fixture
def limit(monkeypatch, request):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not kernels.use_triton(torch.empty(0)):
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setattr(tuning, "SMEM_LIMIT", request.param)
    return request.param


# 12000 bytes: 64 x 64 fp32 blocks at D = 32 run as 32-row programs and 16-key steps (dQ and dK/dV
# split too); 1000: nothing fits, the PyTorch path
@pytest.mark.parametrize("limit", [12000, 1000], indirect=True)
@pytest.mark.parametrize("case", CASES)
def test_split_tiles_match_float64_reference(limit, case):
    cfg = sc.SpargeConfig(topk=0.5, topp=0.3, block_q=64, block_k=64, min_seq_len=0)
    q, k, v = make_qkv(3, case["B"], case["Hq"], case["Hkv"], case["Nq"], case["Nk"], 32, torch.float32,
                       requires_grad=True)
    keep = None
    if case["keep"]:
        keep = torch.ones(case["B"], case["Nk"], dtype=torch.bool)
        keep[:, -30:] = False
    if limit == 12000:
        assert tuning.fit_tiles(64, 64, 128, 256, q) == (32, 16)
    out, m = sc.sparse_attention(q, k, v, is_causal=case["causal"], config=cfg, return_mask=True,
                                 kv_keep=keep)
    assert 0 < m.sparsity() < 1
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    dense = m.to_dense()
    if keep is not None:   # the reference's key padding: hidden keys' columns masked out
        return _check_padded(q, k, v, dense, cfg, case, keep, out, grads, dout)
    ref, ref_grads = reference_out_and_grads(q, k, v, dense, cfg, case["causal"], dout)
    assert rel_err(out, ref) < TOL[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2 * TOL[torch.float32]


def _check_padded(q, k, v, dense, cfg, case, keep, out, grads, dout):
    n = int(keep[0].sum())
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    kd2, vd2 = kd[:, :, :n], vd[:, :, :n]
    from sparge_compile import reference as R

    ref = R.masked_attention(qd, kd2, vd2, dense[..., : -(-n // cfg.block_k)], None, case["causal"],
                             cfg.block_q, cfg.block_k)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    assert rel_err(out, ref) < TOL[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2 * TOL[torch.float32]


class _Attn(torch.nn.Module):
    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("limit", [12000, 1000], indirect=True)
def test_native_path_with_split_tiles_or_the_pytorch_fallback(limit, monkeypatch):
    """The ops Inductor launches on the GPU (native_ops; run eagerly here) with split tiles or the
    PyTorch fallback inside them: output and gradients equal the Python ops' path without a limit."""
    from sparge_compile import site_ops

    cfg = sc.SpargeConfig(topk=0.3, topp=0.0, block_q=64, block_k=64, min_seq_len=0)
    torch.manual_seed(0)
    model, x = _Attn(), torch.randn(1, 200, 64)

    def run(native: bool):
        monkeypatch.setattr(site_ops, "NATIVE_DEVICES", {"cpu"} if native else set())
        torch._dynamo.reset()
        be = sc.backend(config=cfg, inner="eager")   # the interpreter cannot run under AOT's fake tensors
        xx = x.clone().requires_grad_(True)
        y = torch.compile(model, backend=be)(xx)
        y.square().sum().backward()
        site = [s for g in be.graphs for s in g.sites if s.rewritten]
        assert len(site) == 1
        return y.detach(), xx.grad, site[0].state.native

    y, gx, native = run(True)
    assert native
    monkeypatch.setattr(tuning, "SMEM_LIMIT", None)
    ry, rgx, rnative = run(False)
    assert not rnative
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-5)
