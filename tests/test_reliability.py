"""Issue 16: plausible calls that gave a wrong answer, a crash or an unclear error (CPU path).
The pure bad-input checks are rows of tests/test_bad_inputs.py."""
import pickle

import pytest
import torch
import torch.nn.functional as F
from _backend_util import TinyAttention

import sparge_compile as sc
from sparge_compile.block_mask import SpargeBlockMask

CFG = sc.SpargeConfig(topk=0.25, topp=0.0, block_q=16, block_k=16, min_seq_len=0)


def _qkv(B=1, H=2, N=64, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def _mask(q, k):
    return sc.predict_block_mask(q, k, config=CFG)


def test_block_mask_changed_in_place_is_checked_again():
    q, k, v = _qkv()
    m = _mask(q, k)
    sc.sparse_attention(q, k, v, config=CFG, block_mask=m)   # valid: passes
    m.kv_num_blocks.fill_(99)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        sc.sparse_attention(q, k, v, config=CFG, block_mask=m)


def test_valid_block_mask_gives_the_predicted_result():
    q, k, v = _qkv()
    m = SpargeBlockMask(*[t.clone() for t in (_mask(q, k).kv_num_blocks, _mask(q, k).kv_indices)], 64,
                        64, 16, 16)
    torch.testing.assert_close(sc.sparse_attention(q, k, v, config=CFG, block_mask=m),
                               sc.sparse_attention(q, k, v, config=CFG))


def test_cpu_training_through_inductor_with_permuted_qkv_matches_eager(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the op's PyTorch path, what CPU users run
    B, N, H, D = 2, 256, 2, 32
    w = (torch.randn(H * D, H * D) * 0.05).requires_grad_()
    x = torch.randn(B, N, H * D)

    def f(x):
        q = (x @ w).view(B, N, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)

    opts = {"min_seq_len": 0, "topk": 1.0}   # keep every block: equal to eager
    torch._dynamo.reset()
    torch.compile(f, backend="sparge", options=opts)(x).sum().backward()
    g_compiled = w.grad.clone()
    w.grad = None
    f(x).sum().backward()
    assert (g_compiled - w.grad).norm() / w.grad.norm() < 1e-5


@pytest.mark.parametrize("grad", [False, True])
def test_dense_softmax_over_query_axis_compiles_to_the_eager_result(grad):
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-2) @ v

    q, k, v = (t.requires_grad_(grad) for t in _qkv(B=2, H=4, N=64, D=32))
    torch._dynamo.reset()
    out = torch.compile(f, backend="sparge")(q, k, v)
    ref = f(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if grad:
        gc = torch.autograd.grad(out.sum(), (q, k, v))
        ge = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_rows_keep_every_block_on_every_path(where, monkeypatch):
    q, k, v = _qkv(N=64)
    (q if where == "q" else k)[0, 0, 5, 3] = float("nan")
    from sparge_compile import reference as R

    ref = R.reference_block_mask(q.double(), k.double(), None, False, 0.25, 0.0, "hybrid", 16, 16)
    assert ref[0, 0, 0].all()          # the NaN row (or every row seeing the NaN key) is dense
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dense_cpu = _mask(q, k).to_dense()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dense_triton = _mask(q, k).to_dense()
    assert torch.equal(dense_cpu, ref) and torch.equal(dense_triton, ref)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_finite_rows_of_a_nan_query_block_get_dense_attention(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k, v = _qkv(N=64)
    q[0, 0, 5, 3] = float("nan")
    out = sc.sparse_attention(q, k, v, config=CFG)
    ref = F.scaled_dot_product_attention(q, k, v)
    rows = [r for r in range(16) if r != 5]
    torch.testing.assert_close(out[0, 0, rows], ref[0, 0, rows])




def test_model_compiled_with_a_backend_object_pickles():
    torch._dynamo.reset()
    be = sc.backend(config=CFG, inner="eager")
    m = torch.compile(TinyAttention(), backend=be)
    x = torch.randn(1, 64, 64)
    y = m(x)
    m2 = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(m2(x), y)
