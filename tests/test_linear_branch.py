"""The linear-attention branch for the dropped blocks (sparge_compile.linear_branch), on the CPU in
float64: against a brute-force reference with explicit loops, the "total minus kept" identity, the
combinations' init properties, gradients (gradcheck) and attaching the branches to a model."""
import pytest
import torch
from torch import nn

from sparge_compile import SpargeBlockMask, SpargeConfig, ops
from sparge_compile import linear_branch as lb
from sparge_compile.kernels.torch_impl import dense_to_indices

BQ, BK = 16, 16
CFG = SpargeConfig(topk=0.25, topp=0.3, block_q=BQ, block_k=BK, min_seq_len=0)


def _qkv(B=1, Hq=2, Hkv=1, Nq=40, Nk=56, D=8, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=dtype) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _random_keep(B, H, Nq, Nk, seed=1, p=0.4, bq=BQ, bk=BK):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Nq // bq), -(-Nk // bk)
    keep = torch.rand(B, H, nq, nk, generator=g) < p
    keep[..., 0, :] = True      # one query block keeps everything: its linear part must be empty
    return keep


def _mask(keep, Nq, Nk, is_causal):
    num, idx = dense_to_indices(keep)
    return SpargeBlockMask(num, idx, Nq, Nk, BQ, BK, is_causal)


def _sparse(q, k, v, m, is_causal=False):
    return ops.block_sparse_attention_op(q, k, v, m.kv_num_blocks, m.kv_indices, q.shape[-1] ** -0.5,
                                         is_causal, m.block_q, m.block_k)[0]


def _phi(x, kind):
    return torch.softmax(x, -1) if kind == "softmax" else torch.nn.functional.elu(x) + 1


def brute_force_linear(q, k, v, keep, is_causal, kind, eps, BQ=BQ, BK=BK):
    """Token by token: for query t of block i, sum phi(q_t).phi(k_s) v_s over the keys s of every key
    block j that block i drops and that every row of block i sees wholly (causal: s <= first row)."""
    B, Hq, Nq, _ = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(Nq):
                i, first_row = t // BQ, (t // BQ) * BQ
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = torch.zeros((), dtype=torch.float64)
                dropped = 0
                for j in range(keep.shape[-1]):
                    keys = range(j * BK, min((j + 1) * BK, k.shape[2]))
                    if keep[b, h, i, j] or (is_causal and keys[-1] > first_row):
                        continue
                    dropped += 1
                    for s in keys:
                        w = _phi(q[b, h, t], kind) @ _phi(k[b, h // G, s], kind)
                        num += w * v[b, h // G, s]
                        den += w
                if dropped:
                    out[b, h, t] = num / (den + eps)
    return out


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "elu"])
def test_linear_output_matches_brute_force(is_causal, kind):
    q, k, v = _qkv(Nq=56 if is_causal else 40, Nk=56)
    keep = _random_keep(1, 2, q.shape[2], k.shape[2])
    got = lb.linear_attention_dropped(q, k, v, keep, BQ, BK, is_causal, kind, eps=1e-5)
    want = brute_force_linear(q, k, v, keep, is_causal, kind, 1e-5)
    assert want.abs().sum() > 0           # some rows do have dropped blocks
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got[:, :, :BQ] == 0).all()    # query block 0 keeps every block


@pytest.mark.parametrize("Nq,Nk,bq,bk", [(48, 33, 16, 16),    # key 32 alone: last key == first row of block 2
                                         (40, 72, 16, 32), (72, 40, 32, 16)])
def test_linear_causal_domain_at_block_edges(Nq, Nk, bq, bk):
    """Causal, with unequal or partial blocks: a dropped key block joins the linear branch only if
    every row of the query block sees all of its keys (a key equal to the first row included)."""
    q, k, v = _qkv(Nq=Nq, Nk=Nk, seed=9)
    keep = _random_keep(1, 2, Nq, Nk, seed=10, p=0.2, bq=bq, bk=bk)
    got = lb.linear_attention_dropped(q, k, v, keep, bq, bk, True, "softmax", eps=0.0)
    want = brute_force_linear(q, k, v, keep, True, "softmax", 0.0, bq, bk)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
def test_total_minus_kept_equals_direct_sum(is_causal):
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Nq=72, Nk=72, seed=3)
    keep = _random_keep(2, 4, 72, 72, seed=4)
    S, z = lb.block_states(k, v, BK)
    dom = lb.linear_domain(72, 72, BQ, BK, is_causal)
    s1, z1 = lb.dropped_states(S, z, keep, dom, "subtract")
    s2, z2 = lb.dropped_states(S, z, keep, dom, "direct")
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z1, z2, rtol=1e-10, atol=1e-12)
    # the partial last key block (72 = 4 * 16 + 8) counts only its 8 real keys
    torch.testing.assert_close(z[:, :, -1].sum(-1), torch.full_like(z[:, :, -1, 0], 8.0))


def test_every_block_kept_gives_the_sparse_op():
    q, k, v = _qkv(Nq=40, Nk=56)
    keep = torch.ones(1, 2, 3, 4, dtype=torch.bool)
    m = _mask(keep, 40, 56, False)
    assert lb.linear_attention_dropped(q, k, v, keep, BQ, BK).abs().max() == 0
    want = _sparse(q, k, v, m)
    for branch in (lb.LinearBranch(8, combine="sla"), lb.LinearBranch(8, 2, combine="sla2")):
        with torch.no_grad():
            for p in branch.parameters():
                p.uniform_(0.2, 0.9)          # not the init: the linear part itself must be empty
        got = lb.sparse_linear_attention(q, k, v, branch.double(), block_mask=m)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("combine", ["sla", "sla2"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_init_equals_sparse_output(combine, is_causal):
    q, k, v = _qkv(Nq=64, Nk=64, dtype=torch.float32)
    branch = lb.LinearBranch(8, 2, combine=combine, router=combine == "sla2")
    out = lb.sparse_linear_attention(q, k, v, branch, CFG, is_causal)
    m = lb.predict_block_mask(q, k, None, is_causal, CFG)
    assert m.sparsity() > 0                # blocks were dropped, so the linear part is not empty
    want = _sparse(q, k, v, m, is_causal)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_sla2_ratio_is_gate_times_dropped_pooled_mass():
    q, k, v = _qkv(Nq=64, Nk=64)
    keep = _random_keep(1, 2, 64, 64, seed=5)
    m = _mask(keep, 64, 64, False)
    branch = lb.LinearBranch(8, 2, combine="sla2").double()
    with torch.no_grad():
        branch.gate.copy_(torch.tensor([0.5, 1.0]))
    got = lb.sparse_linear_attention(q, k, v, branch, block_mask=m)
    p = lb.block_scores(q, k, 8 ** -0.5, False, BQ, BK)
    a = (branch.gate[None, :, None] * (p * ~keep).sum(-1)).repeat_interleave(BQ, -1)[..., None]
    o_s = _sparse(q, k, v, m)
    o_l = brute_force_linear(q, k, v, keep, False, "softmax", 1e-5)
    torch.testing.assert_close(got, (1 - a) * o_s + a * o_l, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("combine,router", [("sla", False), ("sla2", False), ("sla2", True)])
def test_gradcheck_parameters_and_inputs(combine, router):
    q, k, v = _qkv(Hq=2, Hkv=1, Nq=40, Nk=40, grad=router)   # q, k, v too in one case (fast mode)
    m = _mask(_random_keep(1, 2, 40, 40, seed=7), 40, 40, True)   # fixed mask: a smooth function
    branch = lb.LinearBranch(8, 2, combine=combine, router=router).double()
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.3 * torch.rand_like(p) + 0.1)   # off the init (zero proj / zero gate) and interior
    wrap = _Wrap(branch, m)
    names = [n for n, _ in wrap.named_parameters()]
    ps = [p.detach().clone().requires_grad_(True) for p in wrap.parameters()]

    def f(q, k, v, *ps):
        return torch.func.functional_call(wrap, dict(zip(names, ps)), (q, k, v))

    assert torch.autograd.gradcheck(f, (q, k, v, *ps), eps=1e-6, atol=1e-6, fast_mode=router)
    grads = torch.autograd.grad(f(q, k, v, *ps).square().sum(), ps)
    assert all(gr.abs().sum() > 0 for gr in grads)   # every learnable part does reach the output


class _Wrap(nn.Module):
    def __init__(self, branch, mask):
        super().__init__()
        self.branch, self.mask = branch, mask

    def forward(self, q, k, v):
        return lb.sparse_linear_attention(q, k, v, self.branch, is_causal=True, block_mask=self.mask)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)


def test_enable_linear_branch_registers_parameters():
    model = nn.Sequential(_Attn(), nn.ReLU(), _Attn())
    got = lb.enable_linear_branch(model, ["0", "2"], head_dim=8, num_heads=2, combine="sla2", router=True)
    assert set(got) == {"0", "2"} and got["0"] is model[0].sparge_linear
    keys = set(model.state_dict())
    for site in ("0", "2"):
        assert {f"{site}.sparge_linear.gate", f"{site}.sparge_linear.router_q",
                f"{site}.sparge_linear.router_k"} <= keys
    assert any(p is model[2].sparge_linear.gate for p in model.parameters())
    again = lb.enable_linear_branch(model, ["0"], head_dim=8)
    assert again["0"] is got["0"]          # attaching twice keeps the trained branch
    lb.enable_linear_branch(model, ["2"], head_dim=8, name="other")
    assert "2.other.proj.weight" in model.state_dict()
    assert (model[2].other.proj.weight == 0).all()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="feature_map"):
        lb.LinearBranch(8, feature_map="relu")
    with pytest.raises(ValueError, match="combine"):
        lb.LinearBranch(8, combine="sla3")
    with pytest.raises(ValueError, match="router"):
        lb.LinearBranch(8, combine="sla", router=True)
    with pytest.raises(ValueError, match="sites"):
        lb.enable_linear_branch(nn.Sequential(nn.ReLU()), ["1"], head_dim=8)
    with pytest.raises(TypeError, match="sites"):
        lb.enable_linear_branch(nn.Sequential(nn.ReLU()), "0", head_dim=8)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="head_dim"):
        lb.sparse_linear_attention(q, k, v, lb.LinearBranch(16), CFG)
    with pytest.raises(TypeError, match="branch"):
        lb.sparse_linear_attention(q, k, v, nn.Linear(8, 8), CFG)
    with pytest.raises(ValueError, match="num_heads"):
        lb.sparse_linear_attention(q, k, v, lb.LinearBranch(8, 3, combine="sla2").double(), CFG)


@pytest.mark.parametrize("combine", ["sla", "sla2"])
def test_zero_init_still_learns(combine):
    """The init gives the sparse output, yet the first backward reaches the branch's parameters
    (proj's weight and bias, or the gate), so distillation can move away from it."""
    q, k, v = _qkv(Nq=64, Nk=64)
    branch = lb.LinearBranch(8, 2, combine=combine).double()
    out = lb.sparse_linear_attention(q, k, v, branch, CFG)
    out.square().sum().backward()
    for name, p in branch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["softmax", "elu"])
def test_sla_all_is_slas_released_form(kind):
    """combine='sla-all': O_sparse + proj(linear attention over all keys) on every row, as SLA's
    released code computes it (written out here token by token, GQA by head group)."""
    q, k, v = _qkv(Hq=4, Hkv=2, Nq=40, Nk=56)
    m = _mask(_random_keep(1, 4, 40, 56), 40, 56, False)
    branch = lb.LinearBranch(8, combine="sla-all", feature_map=kind).double()
    with torch.no_grad():
        for p in branch.parameters():
            p.uniform_(-0.5, 0.5)
    got = lb.sparse_linear_attention(q, k, v, branch, block_mask=m)
    lin = torch.zeros_like(q)
    for h in range(4):
        pk, vh = _phi(k[0, h // 2], kind), v[0, h // 2]
        for t in range(40):
            pq = _phi(q[0, h, t], kind)
            lin[0, h, t] = (pq @ pk.T @ vh) / (pq @ pk.sum(0) + 1e-5)
    want = _sparse(q, k, v, m) + branch.proj(lin)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="non-causal only"):
        lb.sparse_linear_attention(q, k, v, branch, config=CFG, is_causal=True)
    with pytest.raises(ValueError, match="combine"):
        lb.LinearBranch(8, combine="sla_all")
