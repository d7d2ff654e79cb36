"""SpargeAttn's self-similarity judge (SpargeConfig.theta): query or key blocks whose tokens are
not alike are never dropped, on the Triton (interpreter) and the PyTorch path alike; computed
from its definition here (explicit pairwise cosines) as the oracle."""
import pytest
import torch

import sparge_compile as sc
from sparge_compile import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairwise_mean_cos(x, block):
    """(B, H, nb) by brute force: every pair of distinct tokens of the block."""
    B, H, N, _ = x.shape
    out = torch.ones(B, H, R.cdiv(N, block), dtype=torch.float64)
    for i, s in enumerate(range(0, N, block)):
        u = torch.nn.functional.normalize(x[:, :, s:s + block].double(), dim=-1)
        n = u.shape[2]
        if n > 1:
            c = u @ u.transpose(-2, -1)
            out[:, :, i] = (c.sum((-2, -1)) - c.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    return out


def _qkv(seed=0, N=72):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 2, 1, 32, generator=g)
    q = base + 0.3 * torch.randn(1, 2, N, 32, generator=g)     # similar tokens: high similarity
    k = base[:, :1] + 0.3 * torch.randn(1, 1, N, 32, generator=g)
    q[:, :, 16:32] = torch.randn(1, 2, 16, 32, generator=g)    # query block 1: unlike tokens
    k[:, :, 48:64] = torch.randn(1, 1, 16, 32, generator=g)    # key block 3: unlike tokens
    v = torch.randn(1, 1, N, 32, generator=g)
    return q, k, v


def test_block_self_similarity_matches_pairwise_cosines():
    q, k, _ = _qkv()
    for x, block in ((q, 16), (k, 16), (q[:, :, :65], 16)):   # a last block of one token
        torch.testing.assert_close(R.block_self_similarity(x.double(), block), _pairwise_mean_cos(x, block))


@pytest.mark.parametrize("interpret", ["1", "0"])
@pytest.mark.parametrize("causal", [False, True])
def test_dissimilar_blocks_are_never_dropped(interpret, causal, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k, v = _qkv()
    cfg = sc.SpargeConfig(topk=0.2, topp=0.0, block_q=16, block_k=16, theta=0.5)
    m = sc.predict_block_mask(q, k, is_causal=causal, config=cfg).to_dense()
    plain = sc.predict_block_mask(q, k, is_causal=causal, config=cfg.replace(theta=None)).to_dense()
    sim_q, sim_k = _pairwise_mean_cos(q, 16), _pairwise_mean_cos(k, 16)
    assert (sim_q[0, :, 1] < 0.5).all() and (sim_k[0, 0, 3] < 0.5) and (sim_q[0, :, 0] > 0.5).all()
    vis = R.visible_blocks(72, 72, 16, 16, causal)
    assert torch.equal(m[0, :, 1], vis[1].expand(2, -1))       # the unlike query block keeps its row
    assert torch.equal(m[0, :, :, 3], vis[:, 3].expand(2, -1))  # the unlike key block its column
    assert not torch.equal(m, plain) and (m | plain).equal(m)   # the judge only adds blocks
    want = R.reference_block_mask(q.double(), k.double(), 32 ** -0.5, causal, 0.2, 0.0, "hybrid", 16, 16,
                                  theta=0.5)
    assert torch.equal(m, want)
    out = sc.sparse_attention(q, k, v, is_causal=causal, config=cfg)
    ref = R.masked_attention(q.double(), k.double(), v.double(), want, 32 ** -0.5, causal, 16, 16)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_theta_changes_at_run_time_without_recompile():
    q, k, v = _qkv()
    torch._dynamo.reset()
    cfg = sc.SpargeConfig(topk=0.2, topp=0.0, block_q=16, block_k=16, min_seq_len=0)
    be = sc.backend(config=cfg, inner="aot_eager")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    f = torch.compile(lambda q, k, v: sdpa(q, k, v, enable_gqa=True), backend=be)
    f(q, k, v)
    before = be.report().rewritten[0].block_mask().to_dense().sum()
    be.set_config(theta=0.5)
    f(q, k, v)
    assert len(be.report().graphs) == 1 and be.report().rewritten[0].block_mask().to_dense().sum() > before


@pytest.mark.parametrize("theta, exc", [("0.5", TypeError), (1.5, ValueError), (True, TypeError)])
def test_theta_is_checked(theta, exc):
    with pytest.raises(exc, match="theta"):
        sc.SpargeConfig(theta=theta)
