"""sc.calibrate and SpargePlan (issue 7): per-site (topk, topp) from a few batches of the dense
model, applied by the backend.

The model: four parallel attention layers over the same smooth token sequence (neighbouring
tokens alike), two *peaked* (q = 6 * k: local, concentrated attention) and two *flat* (q = 0.3 * k:
nearly uniform attention). Parallel layers see the same input in the dense and the sparse model,
so each site's q, k, v (and its attention error) can be recomputed here without the backend.
The module name starts with test_backend: the op runs its PyTorch path (conftest fixture).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _backend_util import pytorch_path

import sparge_compile as sc
from sparge_compile.plan import PlanMismatchError

PEAKED, FLAT = ("layers.0#0", "layers.2#0"), ("layers.1#0", "layers.3#0")
CFG = sc.SpargeConfig(block_q=16, block_k=16, min_seq_len=0)
TARGET, MAX_ERR = 0.6, 0.05


class Attn(nn.Module):
    def __init__(self, dim, heads, gain):
        super().__init__()
        self.heads, self.gain = heads, gain
        self.qk = nn.Linear(dim, dim, bias=False)   # shared q/k projection: similar tokens attend
        self.v = nn.Linear(dim, dim)

    def qkv(self, x):
        B, N, C = x.shape
        h = self.qk(x).view(B, N, self.heads, -1).transpose(1, 2)
        return h * self.gain, h, self.v(x).view(B, N, self.heads, -1).transpose(1, 2)

    def forward(self, x):
        return F.scaled_dot_product_attention(*self.qkv(x))


class Tiny(nn.Module):
    def __init__(self, gains=(6.0, 0.3, 6.0, 0.3), dim=64, heads=2):
        super().__init__()
        self.layers = nn.ModuleList(Attn(dim, heads, g) for g in gains)

    def forward(self, x):
        return torch.stack([layer(x) for layer in self.layers])


class Other(Tiny):  # same layers, other module names: a different model
    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = self.layers
        del self.layers

    def forward(self, x):
        return torch.stack([b(x) for b in self.blocks])


def make_model(**kw):
    torch.manual_seed(0)
    m = Tiny(**kw).eval()
    for layer in m.layers:
        nn.init.constant_(layer.v.bias, 0.5)   # outputs away from 0, so relative errors are meaningful
    return m


def batch(seed, n=256, dim=64):
    """A smooth random sequence: (2, n, dim), neighbouring tokens alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cumsum(torch.randn(2, n, dim, generator=g), 1) / torch.arange(1, n + 1)[None, :, None] ** 0.5
    x = x - x.mean(1, keepdim=True)
    return (x / x.std(),)


CAL = [batch(i) for i in range(3)]
HELD = [batch(100 + i) for i in range(2)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plans():
    with pytorch_path():
        model = make_model()
        with torch.no_grad():
            target = sc.calibrate(model, CAL, target_sparsity=TARGET, config=CFG)
            bounded = sc.calibrate(model, CAL, max_error=MAX_ERR, config=CFG)
        return model, target, bounded


def site_error(model, sid, plan, x) -> tuple[float, float]:
    """(relative L1 error, sparsity) of a site at the plan's point, recomputed with the op."""
    layer = model.layers[int(sid.split(".")[1].split("#")[0])]
    with torch.no_grad():
        q, k, v = layer.qkv(x)
        dense = F.scaled_dot_product_attention(q, k, v)
        s = plan.sites[sid]
        cfg = CFG.replace(topk=s.topk, topp=s.topp)
        out, mask = sc.sparse_attention(q, k, v, config=cfg, return_mask=True)
    return float((out - dense).abs().sum() / dense.abs().sum()), mask.sparsity()


def sparsity_of(plan, sites) -> float:
    return sum(plan.sites[s].measured_sparsity for s in sites) / len(sites)


def test_target_mode_peaked_sites_sparser_and_target_met(plans):
    model, plan, _ = plans
    assert set(plan.sites) == set(PEAKED + FLAT)
    assert min(sparsity_of(plan, [s]) for s in PEAKED) > max(sparsity_of(plan, [s]) for s in FLAT)
    sm = plan.summary
    assert abs(sm["measured_sparsity"] - TARGET) <= 0.02
    assert abs(sm["predicted_sparsity"] - TARGET) <= 0.02
    # the allocation is no worse than one global (topk, topp) at >= the target (its own baseline)
    assert sm["measured_error"] <= sm["global"]["measured_error"] + 1e-9
    assert sm["global"]["predicted_sparsity"] >= TARGET
    # the report: every site with its choice, predicted and measured sparsity and error
    text = str(plan)
    for sid, s in plan.sites.items():
        assert sid in text and (s.dense or (s.topk is not None and s.topp is not None))
        for f in ("predicted_sparsity", "measured_sparsity", "predicted_error", "measured_error"):
            assert getattr(s, f) is not None, (sid, f)
        # on short sequences every query block is sampled: the prediction is the measurement
        assert abs(s.predicted_sparsity - s.measured_sparsity) < 1e-9
        assert abs(s.predicted_error - s.measured_error) < 1e-4


def test_target_plan_through_the_backend(plans):
    """The backend applies the plan: each site runs its (topk, topp); overall sparsity on the
    calibration batches (real masks of the compiled model) is the target within 2 points."""
    model, plan, _ = plans
    torch._dynamo.reset()
    be = sc.backend(config=CFG.replace(topk=0.5, topp=0.0), inner="eager", plan=plan)
    compiled = torch.compile(model, backend=be)
    kept = vis = 0
    with torch.no_grad():
        for x in CAL:
            compiled(*x)
            for s in be.report().rewritten:
                m = s.block_mask()
                kept += int(m.kv_num_blocks.sum())
                vis += m.visible_pairs()
    dense = [sid for sid, s in plan.sites.items() if s.dense]   # a site the plan keeps whole runs SDPA
    kept += len(dense) * len(CAL) * 2 * 2 * 16 * 16             # batch 2, 2 heads, 16 x 16 blocks
    vis += len(dense) * len(CAL) * 2 * 2 * 16 * 16
    assert abs((1 - kept / vis) - TARGET) <= 0.02
    assert {s.site_id for s in be.report().rewritten} == set(plan.sites) - set(dense)
    for s in be.report().rewritten:
        want = plan.sites[s.site_id]
        assert (s.state.config.topk, s.state.config.topp) == (want.topk, want.topp)
        assert (s.state.config.block_q, s.state.config.block_k) == (16, 16)


def test_max_error_mode_bound_and_held_out(plans):
    model, _, plan = plans
    assert min(sparsity_of(plan, [s]) for s in PEAKED) > max(sparsity_of(plan, [s]) for s in FLAT)
    assert plan.summary["measured_sparsity"] > 0.2
    for sid in PEAKED + FLAT:
        assert not plan.sites[sid].dense
        assert plan.sites[sid].measured_max_error <= MAX_ERR
        for (x,) in CAL:          # recomputed here, per calibration batch
            err, _ = site_error(model, sid, plan, x)
            assert err <= MAX_ERR, (sid, err)
        for (x,) in HELD:         # held-out batches of the same distribution
            err, _ = site_error(model, sid, plan, x)
            assert err <= 1.5 * MAX_ERR, (sid, err)


def test_save_load_round_trip_and_options(plans, tmp_path):
    model, plan, _ = plans
    path = plan.save(tmp_path / "plan.json")
    text = path.read_text()
    assert json.loads(text)["format"] == "sparge-plan"
    loaded = sc.SpargePlan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.table() == plan.table()
    # the backend takes a saved plan through torch.compile options; a site left out of the
    # plan uses the default config
    d = loaded.to_dict()
    del d["sites"]["layers.3#0"]
    torch._dynamo.reset()
    f = torch.compile(model, backend="sparge", options={"plan": d, "inner": "eager", "min_seq_len": 0,
                                                        "topk": 0.5, "topp": 0.0})
    with torch.no_grad():
        f(*CAL[0])
    got = {s.site_id: s.state.config for s in sc.explain(f).rewritten}
    assert set(got) == set(PEAKED + FLAT)
    for sid in ("layers.0#0", "layers.1#0", "layers.2#0"):
        assert (got[sid].topk, got[sid].topp) == (plan.sites[sid].topk, plan.sites[sid].topp)
    assert (got["layers.3#0"].topk, got["layers.3#0"].topp) == (0.5, 0.0)
    bad = dict(plan.to_dict(), version=99)
    with pytest.raises(ValueError, match="version"):
        sc.SpargePlan.from_dict(bad)


@pytest.mark.parametrize("model_fn, match", [
    (lambda: Tiny(gains=(6.0,), heads=1), "layers.0#0.*shapes"),          # same name, other shapes
    (lambda: Other(gains=(6.0,)), "none of which is in the plan"),         # other site names
])
def test_mismatched_plan_raises(plans, model_fn, match):
    _, plan, _ = plans
    torch._dynamo.reset()
    be = sc.backend(config=CFG, inner="eager", plan=plan)
    with pytest.raises(Exception, match=match) as info, torch.no_grad():
        torch.compile(model_fn().eval(), backend=be)(*CAL[0])
    e = info.value   # Dynamo wraps what the backend raised in BackendCompilerFailed
    e = getattr(e, "inner_exception", None) or e
    assert isinstance(e, PlanMismatchError), repr(info.value)


@pytest.mark.parametrize("causal, shape", [(False, (2, 4, 2, 100, 90, 32)), (True, (1, 2, 1, 77, 77, 16))])
def test_site_tables_are_exact(causal, shape):
    """The statistics behind the search: for every grid point, the kept block pairs and the
    relative L1 error (all query blocks sampled) equal the reference mask and masked attention."""
    import itertools

    from sparge_compile import reference as R
    from sparge_compile.calibration import site_tables

    B, Hq, Hkv, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, h, n, D, generator=g) * 2 for h, n in ((Hq, Nq), (Hkv, Nk)))
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    topks, topps, bq, bk, scale = (0.0, 0.1, 0.3, 1.0), (0.0, 0.3, 0.9), 16, 8, D ** -0.5
    kept, vis, num, den = site_tables(q, k, v, scale, causal, bq, bk, topks, topps, sample_blocks=0)
    qd, kd, vd = q.double(), k.double(), v.double()
    full = torch.ones(B, Hq, R.cdiv(Nq, bq), R.cdiv(Nk, bk), dtype=torch.bool)
    dense = R.masked_attention(qd, kd, vd, full, scale, causal, bq, bk)
    assert vis == int(R.visible_blocks(Nq, Nk, bq, bk, causal).sum()) * B * Hq
    for i, (tk, tp) in enumerate(itertools.product(topks, topps)):
        m = R.reference_block_mask(q, k, scale, causal, tk, tp, "hybrid", bq, bk)
        err = float((R.masked_attention(qd, kd, vd, m, scale, causal, bq, bk) - dense).abs().sum()
                    / dense.abs().sum())
        assert kept[i] == int(m.sum()), (tk, tp)
        assert abs(num[i] / den - err) <= 1e-4 * max(1.0, err), (tk, tp)


def test_allocation_meets_budget_with_least_error():
    """The search alone: against brute force on small random frontiers."""
    import itertools

    import numpy as np

    from sparge_compile.calibration import allocate

    rng = np.random.default_rng(0)
    for _ in range(20):
        kepts, errs = [], []
        for _ in range(3):
            k = np.sort(rng.integers(1, 50, size=6)).astype(float)
            e = np.sort(rng.random(6))[::-1].copy()
            kepts.append(k)
            errs.append(e)
        budget = sum(k[0] for k in kepts) + float(rng.integers(0, 80))
        ch = allocate(kepts, errs, budget)
        tot = sum(k[c] for k, c in zip(kepts, ch))
        best = min((sum(e[c] for e, c in zip(errs, cs)), cs) for cs in itertools.product(range(6), repeat=3)
                   if sum(k[c] for k, c in zip(kepts, cs)) <= budget)
        assert tot <= budget
        got = sum(e[c] for e, c in zip(errs, ch))
        assert got <= best[0] * 1.5 + 0.05   # Lagrange + greedy: near the knapsack optimum
