"""The linear branch (SLA / SLA2, issue 19) through the sparge backend (CPU).

``enable_linear_branch`` hooks each site module; the backend pairs the module's attention call
with its branch and computes sparse + linear attention with the branch's parameters as graph
inputs. The references here are eager: the model's own code with every F.scaled_dot_product_attention
call replaced by ``sparse_linear_attention`` with the branch of the module making the call (found
by test-owned pre-hooks, not by the backend's pairing) and the mask the compiled site used.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _backend_util import SDPACalls, allow_broken_torchvision, compile_sparge, masks_of, rel_err

import sparge_compile as sc
from sparge_compile import linear_branch as lb

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = sc.SpargeConfig(topk=0.3, topp=0.5, block_q=16, block_k=16, min_seq_len=0)
N, DIM, HEADS = 64, 64, 2


class Attn(nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        self.qkv, self.o, self.causal = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM), causal
        with torch.no_grad():
            self.qkv.weight.mul_(3.0)   # peaky attention: the mask drops blocks

    def forward(self, x):
        B, n, C = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(B, n, C))


class Block(nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(DIM), Attn(causal), nn.Linear(DIM, DIM)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self, causal: bool = False, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(causal) for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def randomize(branches, seed: int = 0) -> None:
    """Non-zero branch parameters (at init the branch adds nothing), different per branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for br in branches:
            for p in br.params():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                if p.dim() == 2 and p.shape[0] == p.shape[1] and br.has_router and p is not br.params()[0]:
                    p.copy_(torch.eye(p.shape[0], dtype=p.dtype) + 0.3 * noise)   # a router
                else:
                    p.copy_(0.5 * noise if p.dim() == 2 else noise.abs() * 0.5 + 0.2)


def tiny_with_branches(combine="sla", router=False, causal=False, seed=0, blocks=2):
    torch.manual_seed(seed)
    model = Tiny(causal, blocks)
    paths = [f"blocks.{i}.attn" for i in range(blocks)]
    branches = sc.enable_linear_branch(model, paths, head_dim=DIM // HEADS, num_heads=HEADS, combine=combine,
                                       router=router)
    randomize(branches.values(), seed)
    return model, branches


class LinearRef:
    """Context: each eager F.scaled_dot_product_attention call takes the next mask of ``masks``
    (None: it predicts its own with ``config``) and becomes ``sparse_linear_attention`` with the
    branch of the module making the call, or the sparse op alone where the module has none.
    Records the mask predicted from the routed q, k of each branch call."""

    NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __init__(self, model, masks=None, config=CFG):
        self.model, self.masks, self.config, self.used, self.predicted = model, masks, config, 0, []
        self.current = [None]

    def _sdpa(self, *args, **kwargs):
        kw = dict(zip(self.NAMES, args), **kwargs)
        q, k, v = kw["query"], kw["key"], kw["value"]
        causal, scale = kw.get("is_causal", False), kw.get("scale")
        assert kw.get("attn_mask") is None and not kw.get("dropout_p") and not kw.get("enable_gqa")
        mask = None if self.masks is None else self.masks[self.used]
        self.used += 1
        branch = self.current[-1]
        if branch is None:
            return sc.sparse_attention(q, k, v, scale=scale, is_causal=causal, config=self.config,
                                       block_mask=mask)
        rq, rk = branch.route(q, k)
        self.predicted.append(sc.predict_block_mask(rq.detach(), rk.detach(), scale, causal, self.config))
        return lb.sparse_linear_attention(q, k, v, branch, config=self.config, is_causal=causal,
                                          block_mask=mask, scale=scale)

    def __enter__(self):
        self.handles = []
        for m in self.model.modules():
            br = getattr(m, lb.BRANCH_NAME, None)
            if isinstance(br, lb.LinearBranch):
                self.handles += [m.register_forward_pre_hook(lambda mod, a, br=br: self.current.append(br)),
                                 m.register_forward_hook(lambda mod, a, o: self.current.pop() and None)]
        self._orig = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._sdpa
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._orig
        for h in self.handles:
            h.remove()


def grads(model, out, x, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    x.grad = None
    model.zero_grad()
    (out * w).sum().backward()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"x": x.grad.clone(), **params}


def compare(got: dict, ref: dict, tol: float):
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    for name in ref:
        assert rel_err(got[name], ref[name]) < tol, (name, rel_err(got[name], ref[name]))


def x_input(seed=3, dtype=torch.float32):
    return torch.randn(1, N, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


@pytest.mark.parametrize("combine,router,causal", [("sla", False, False), ("sla", False, True),
                                                   ("sla2", True, False), ("sla2", True, True),
                                                   ("sla2", False, False), ("sla-all", False, False)])
def test_compiled_equals_eager_sparse_linear(combine, router, causal):
    """Output and gradients (input, every parameter: the branches' included) of the compiled model
    equal the eager model whose attention calls are sparse_linear_attention with the module's
    branch and the compiled site's mask; that mask is the one predicted from the routed q, k."""
    torch._dynamo.reset()
    model, branches = tiny_with_branches(combine, router, causal)
    compiled, be = compile_sparge(model, CFG)
    x = x_input()
    out = compiled(x)
    got = grads(model, out, x)
    rep = be.report()
    assert [s.linear for s in rep.sites] == [combine + ("+router" if router else "")] * 2
    masks = masks_of(be)
    assert all(0.0 < m.sparsity() < 1.0 for m in masks)   # blocks dropped: the branch is at work
    with LinearRef(model, masks) as ref:
        ref_out = model(x)
    assert ref.used == 2
    for m, p in zip(masks, ref.predicted):
        assert torch.equal(m.to_dense(), p.to_dense())
    assert rel_err(out, ref_out) < 1e-5
    want = grads(model, ref_out, x)
    compare(got, want, 1e-4)
    for br in branches.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in br.params())
    # the branch matters: sparse-only differs (so a site that ignored its branch would fail)
    plain = copy.deepcopy(model)
    for b in plain.blocks:
        del b.attn._modules[lb.BRANCH_NAME]
    torch._dynamo.reset()
    sparse_only, _ = compile_sparge(plain, CFG)
    assert rel_err(sparse_only(x), out) > 1e-3


def test_dynamic_shapes():
    """dynamic=True, two sequence lengths (symbolic N; q, k, v permuted views, whose traced pad
    once broke the linear branch's views): output and gradients equal eager."""
    torch._dynamo.reset()
    model, _ = tiny_with_branches("sla2", True, True, blocks=1)
    compiled, be = compile_sparge(model, CFG, dynamic=True)
    for n in (64, 80):
        x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(n)).requires_grad_()
        out = compiled(x)
        got = grads(model, out, x)
        with LinearRef(model, masks_of(be)[-1:]):
            ref_out = model(x)
        assert rel_err(out, ref_out) < 1e-5
        compare(got, grads(model, ref_out, x), 1e-4)


def test_pairing_uses_each_modules_own_branch():
    """Swapping the two blocks' branches changes the compiled output, and the compiled output
    follows the swap as eager does (a site reading the other block's branch would fail)."""
    torch._dynamo.reset()
    model, branches = tiny_with_branches("sla2", True)
    x = x_input()
    compiled, be = compile_sparge(model, CFG)
    out = compiled(x).detach()
    a, b = model.blocks[0].attn, model.blocks[1].attn
    a._modules[lb.BRANCH_NAME], b._modules[lb.BRANCH_NAME] = b.sparge_linear, a.sparge_linear
    torch._dynamo.reset()
    compiled2, be2 = compile_sparge(model, CFG)
    out2 = compiled2(x).detach()
    assert rel_err(out2, out) > 1e-3
    with LinearRef(model, masks_of(be2)):
        assert rel_err(out2, model(x)) < 1e-5


def test_regional_compile_each_block_its_own_branch():
    """torch.compile on each block (one graph for both, as compile_repeated_blocks does): each
    block's call gets its own branch's parameters as inputs; outputs and gradients equal eager."""
    torch._dynamo.reset()
    model, branches = tiny_with_branches("sla", seed=4)
    be = sc.backend(config=CFG, inner="aot_eager")
    ref_model = copy.deepcopy(model)
    for blk in model.blocks:
        blk.compile(backend=be)
    x = x_input()
    out = model(x)
    assert len(be.graphs) == 1 and len(be.report().sites) == 1 and be.report().sites[0].linear == "sla"
    assert be.report().sites[0].calls == 2
    got = grads(model, out, x)
    with LinearRef(ref_model):
        ref_out = ref_model(x)
    assert rel_err(out, ref_out) < 1e-5
    compare(got, grads(ref_model, ref_out, x), 1e-4)
    # the two branches differ, so a shared one would give another output
    with torch.no_grad():
        ref_model.blocks[1].attn.sparge_linear.load_state_dict(ref_model.blocks[0].attn.sparge_linear.state_dict())
    with LinearRef(ref_model):
        assert rel_err(ref_model(x), ref_out) > 1e-3


def test_two_attention_calls_one_branch_stay_sparse_only():
    """A module whose forward calls SDPA twice with one branch: ambiguous, so both calls run
    sparse-only (as without the branch) and the report says why."""
    class Twice(Attn):
        def forward(self, x):
            return super().forward(x) + super().forward(2 * x)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(Twice())
    plain = copy.deepcopy(model)
    br = sc.enable_linear_branch(model, ["0"], head_dim=DIM // HEADS, num_heads=HEADS, combine="sla")
    randomize(br.values())
    x = x_input()
    compiled, be = compile_sparge(model, CFG)
    out = compiled(x)
    assert all(s.linear.startswith("not applied: 2 attention call(s)") for s in be.report().sites)
    assert "linear" in str(be.report())
    torch._dynamo.reset()
    compiled_plain, _ = compile_sparge(plain, CFG)
    assert torch.equal(out, compiled_plain(x))


def test_branch_on_a_module_called_twice_applies_to_each_call():
    """One module called twice: each call has its own anchor, so both calls get the branch."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

        def forward(self, x):
            return self.attn(self.attn(x))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Twice()
    br = sc.enable_linear_branch(model, ["attn"], head_dim=DIM // HEADS, num_heads=HEADS, combine="sla2")
    randomize(br.values())
    x = x_input()
    compiled, be = compile_sparge(model, CFG)
    out = compiled(x)
    assert [s.linear for s in be.report().sites] == ["sla2", "sla2"]
    with LinearRef(model, masks_of(be)):
        assert rel_err(out, model(x)) < 1e-5


def test_branch_on_the_compiled_root_is_reported_not_applied():
    """torch.compile(attn) with the branch on attn itself: Dynamo compiles the root's hooks as a
    graph of their own, so the branch cannot be paired; the site runs sparse-only and the report
    says so (not silently)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = Attn()
    plain = copy.deepcopy(attn)
    randomize(sc.enable_linear_branch(attn, [""], head_dim=32, num_heads=2, combine="sla").values())
    compiled, be = compile_sparge(attn, CFG)
    x = x_input()
    out = compiled(x)
    assert [s.linear for s in be.report().sites] == [""]
    assert "linear branch of <root>: not applied" in str(be.report())
    torch._dynamo.reset()
    assert torch.equal(out, compile_sparge(plain, CFG)[0](x))


@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"])
def test_hook_is_inert_without_sparge(backend):
    """Eagerly and under other backends, a model with branches attached (non-zero parameters)
    computes exactly what it computes without them; the hook is registered once."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = Tiny()
    model = copy.deepcopy(plain)
    br = sc.enable_linear_branch(model, ["blocks.0.attn", "blocks.1.attn"], head_dim=DIM // HEADS,
                                 num_heads=HEADS, combine="sla2", router=True)
    randomize(br.values())
    x = x_input().detach()
    run = (lambda m: m) if backend is None else (lambda m: torch.compile(m, backend=backend))
    with torch.no_grad():
        want = run(plain)(x)
        torch._dynamo.reset()
        got = run(model)(x)
    assert torch.equal(got, want)


def test_enable_twice_one_hook_and_errors():
    model = Tiny()
    first = sc.enable_linear_branch(model, ["blocks.0.attn"], head_dim=32, num_heads=2)
    again = sc.enable_linear_branch(model, ["blocks.0.attn#0"], head_dim=32, num_heads=2)   # a site id
    assert again["blocks.0.attn#0"] is first["blocks.0.attn"]
    hooks = [h for h in model.blocks[0].attn._forward_pre_hooks.values() if isinstance(h, lb.AnchorHook)]
    assert len(hooks) == 1
    assert not model.blocks[1].attn._forward_pre_hooks
    with pytest.raises(TypeError, match="needs sites"):
        sc.enable_linear_branch(model, head_dim=32)
    with pytest.raises(TypeError, match="head_dim"):
        sc.enable_linear_branch(model, ["blocks.1.attn"])


@pytest.mark.parametrize("kw,named", [
    (dict(head_dim=16, num_heads=HEADS, combine="sla"), "head_dim=32"),
    (dict(head_dim=DIM // HEADS, num_heads=3, combine="sla2"), "num_heads=2"),
    (dict(head_dim=16, combine="sla2", router=True), "head_dim=32")])
def test_branch_made_for_another_shape_fails_naming_the_argument(kw, named):
    """A branch attached with the wrong head_dim / num_heads: a compile-time error saying the value
    to attach it with (it crashed in a fake-tensor matmul before)."""
    torch._dynamo.reset()
    model = Tiny()
    sc.enable_linear_branch(model, ["blocks.0.attn"], **kw)
    compiled, _ = compile_sparge(model)
    with pytest.raises(Exception, match=f"linear branch of 'blocks.0.attn' has .*attach it with {named}"):
        compiled(x_input())


def test_report_marks_sites_without_a_branch():
    """A site with no branch stays as today (no linear entry); one with a branch shows it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tiny()
    br = sc.enable_linear_branch(model, ["blocks.1.attn"], head_dim=32, num_heads=2, combine="sla")
    randomize(br.values())
    compiled, be = compile_sparge(model, CFG)
    x = x_input()
    out = compiled(x)
    rep = be.report()
    assert [s.linear for s in rep.sites] == ["", "sla"]
    assert [d["linear"] for d in rep.as_dicts()] == ["", "sla"]
    with LinearRef(model, masks_of(be)) as ref:   # block 0: the sparse op alone, block 1: + its branch
        want = model(x)
    assert ref.used == 2 and len(ref.predicted) == 1
    assert rel_err(out, want) < 1e-5


def wan_with_branches():
    allow_broken_torchvision()
    pytest.importorskip("diffusers")
    from bench import model_steps as M

    model, kw = M.build("wan", True, "cpu", torch.float32)
    inp = M.inputs("wan", kw, True, "cpu", torch.float32)
    paths = [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    br = sc.enable_linear_branch(model, paths, head_dim=32, num_heads=2, combine="sla2", router=True)
    randomize(br.values())
    return model, inp, br


def test_diffusers_wan_with_branches():
    """diffusers' Wan (bench's tiny config) with branches on the self-attention modules: every SDPA
    call is rewritten (counted by an SDPA hook), the self-attention ones with their branch; output
    and gradients equal eager with the same masks."""
    torch._dynamo.reset()
    model, inp, branches = wan_with_branches()
    x = inp.pop("hidden_states").requires_grad_()
    fwd = lambda m, h: m(hidden_states=h, **inp)[0]   # noqa: E731
    with SDPACalls() as calls, torch.no_grad():
        fwd(model, x)
    compiled, be = compile_sparge(model, CFG)
    out = fwd(compiled, x)
    rep = be.report()
    assert len(rep.rewritten) == len(rep.sites) == calls.calls >= 4
    labels = [s.linear for s in rep.sites]
    assert labels.count("sla2+router") == len(branches) and labels.count("") == calls.calls - len(branches)
    got = grads(model, out, x)
    masks = masks_of(be)
    with LinearRef(model, masks) as ref:
        ref_out = fwd(model, x)
    assert ref.used == calls.calls and len(ref.predicted) == len(branches)
    assert rel_err(out, ref_out) < 1e-5
    compare(got, grads(model, ref_out, x), 1e-4)
    for br in branches.values():
        assert all(p.grad.abs().sum() > 0 for p in br.params())


def test_diffusers_wan_compile_repeated_blocks():
    """diffusers' regional compilation: one graph for Wan's blocks, each block's call with its own
    branch (different parameters); equal to eager sparse + linear attention predicting its masks."""
    torch._dynamo.reset()
    model, inp, branches = wan_with_branches()
    ref_model = copy.deepcopy(model)
    be = sc.backend(config=CFG, inner="aot_eager")
    model.compile_repeated_blocks(backend=be)
    x = inp.pop("hidden_states")
    with torch.no_grad():
        out = model(hidden_states=x, **inp)[0]
        rep = be.report()
        assert [s.linear for s in rep.sites] == ["sla2+router", ""]
        assert rep.sites[0].calls == len(branches) == 2
        with LinearRef(ref_model) as ref:
            want = ref_model(hidden_states=x, **inp)[0]
        assert ref.used == 4 and rel_err(out, want) < 1e-5
        b0, b1 = (ref_model.blocks[i].attn1.sparge_linear for i in (0, 1))
        b1.load_state_dict(b0.state_dict())   # one branch for both: another output
        with LinearRef(ref_model):
            assert rel_err(ref_model(hidden_states=x, **inp)[0], want) > 1e-4


def test_distill_trains_the_branches():
    """One distill step with branches attached moves their parameters (they get gradients
    through the compiled sites and are in the trained set)."""
    torch._dynamo.reset()
    model, branches = tiny_with_branches("sla2", True)
    model.float()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if lb.BRANCH_NAME in n}
    assert len(before) == 6
    x = x_input(dtype=torch.float32).detach()
    sc.distill(model, lambda i: (x,), steps=1, lr=1e-2, config=CFG, progress=False, backend_inner="eager")
    after = dict(model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert moved == list(before), sorted(set(before) - set(moved))


def test_example_inputs_find_the_attention_modules():
    """enable_linear_branch(model, example_inputs=...): a branch on each module whose own forward
    calls attention once, of its head dim, none on a module calling it twice or on the root; the
    same sites and outputs as listing them by hand."""
    class Twice(Attn):
        def forward(self, x):
            return super().forward(x) + super().forward(2 * x)

    class Model(Tiny):
        def __init__(self):
            super().__init__()
            self.twice = Twice()

        def forward(self, x):
            return self.twice(super().forward(x))

    torch.manual_seed(0)
    model, x = Model(), x_input()
    by_hand = copy.deepcopy(model)
    found = sc.enable_linear_branch(model, example_inputs=(x,), combine="sla")
    assert sorted(found) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(b.head_dim == DIM // HEADS for b in found.values())
    assert not hasattr(model.twice, "sparge_linear")
    mine = sc.enable_linear_branch(by_hand, ["blocks.0.attn", "blocks.1.attn"], head_dim=DIM // HEADS,
                                   combine="sla")
    randomize(found.values())
    randomize(mine.values())
    assert torch.equal(model(x), by_hand(x))   # eager: the branches are inert there
    outs = []
    for m in (model, by_hand):
        torch._dynamo.reset()
        compiled, be = compile_sparge(m, CFG)
        outs.append(compiled(x))
        assert [s.linear for s in be.report().sites][:2] == ["sla", "sla"]
    assert torch.equal(*outs)
    with pytest.raises(ValueError, match="head dim 32"):
        sc.enable_linear_branch(Tiny(), ["blocks.0.attn"], head_dim=16, example_inputs=(x,))
    with pytest.raises(ValueError, match="calls no attention"):
        sc.enable_linear_branch(Tiny(), ["blocks.0.mlp"], example_inputs=(x,))


def test_example_inputs_find_diffusers_attention_modules():
    """On diffusers' Wan (keyword inputs): every Attention module that calls SDPA, and as many as an
    independent SDPA count sees."""
    model, inp, _ = wan_with_branches()
    fresh = type(model)(**model.config).eval()
    with SDPACalls() as calls:
        with torch.no_grad():
            fresh(**inp)
    found = sc.enable_linear_branch(fresh, example_inputs=inp, combine="sla")
    assert len(found) == calls.calls and all(p.endswith(("attn1", "attn2")) for p in found)
    assert {b.head_dim for b in found.values()} == set(calls.head_dims)
