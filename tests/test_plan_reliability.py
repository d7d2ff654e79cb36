"""SpargePlan and calibrate() where they used to fail silently or unclearly: a plan under dynamic
shapes, batches the model rejects, a saved plan round-trips. (Malformed saved plans and bad
calibrate() arguments are rows of tests/test_bad_inputs.py.)

Runs the op's PyTorch path (TRITON_INTERPRET=0), like the backend tests.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge_compile as sc
from sparge_compile.plan import PlanMismatchError, PlanSite

CFG = sc.SpargeConfig(block_q=16, block_k=16, min_seq_len=0)
SID = "layers.0#0"
DIM = 64


class Attn(nn.Module):
    def __init__(self, dim=DIM, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Attn()])

    def forward(self, x):
        return self.layers[0](x)


def make_model():
    torch.manual_seed(0)
    return Tiny().eval()


def batch(n, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, DIM, generator=g),)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _calibrate(lengths):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        torch._dynamo.reset()
        model = make_model()
        with torch.no_grad():
            plan = sc.calibrate(model, [batch(n, seed=i) for i, n in enumerate(lengths)],
                                target_sparsity=0.5, config=CFG)
        return model, plan


@pytest.fixture(scope="module")
def plan128():
    return _calibrate([128])


@pytest.fixture(scope="module")
def plan128_192():
    return _calibrate([128, 192])


def _plan_error(exc):
    """The PlanMismatchError Dynamo wrapped (BackendCompilerFailed and friends), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PlanMismatchError):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def _run(be, f, n, b=1):
    """Run at length n; the (topk, topp) the site ran with."""
    with torch.no_grad():
        f(*batch(n, b))
    site = [s for s in be.report().rewritten if s.site_id == SID][-1]
    return site.state.config.topk, site.state.config.topp


def _expect_mismatch(f, n, match):
    with pytest.raises(Exception) as info, torch.no_grad():
        f(*batch(n))
    err = _plan_error(info.value)
    assert err is not None, repr(info.value)
    assert match in str(err), str(err)
    return err


# ------------------------------------------------------------------ 1. plans under dynamic shapes


def test_plan_under_dynamic_true_raises_at_uncalibrated_length(plan128):
    model, plan = plan128
    want = (plan.sites[SID].topk, plan.sites[SID].topp)
    torch._dynamo.reset()
    be = sc.backend(config=CFG.replace(topk=0.9, topp=0.0), inner="eager", plan=plan)
    f = torch.compile(model, backend=be, dynamic=True)
    assert _run(be, f, 128) == want                   # symbolic graph, guarded to the calibrated length
    err = _expect_mismatch(f, 192, SID)
    assert "dynamic" in str(err) and "128" in str(err)


def test_plan_after_automatic_dynamic_recompile_raises_at_uncalibrated_length(plan128):
    """Two lengths: Dynamo's second compile is dynamic (automatic dynamic shapes)."""
    model, plan = plan128
    torch._dynamo.reset()
    be = sc.backend(config=CFG, inner="eager", plan=plan)
    f = torch.compile(model, backend=be)
    _run(be, f, 128)
    _expect_mismatch(f, 192, SID)


def test_plan_under_dynamic_shapes_applies_at_each_calibrated_length_only(plan128_192):
    model, plan = plan128_192
    assert len(plan.sites[SID].shapes) == 2
    want = (plan.sites[SID].topk, plan.sites[SID].topp)
    torch._dynamo.reset()
    be = sc.backend(config=CFG.replace(topk=0.9, topp=0.0), inner="eager", plan=plan)
    f = torch.compile(model, backend=be)
    assert _run(be, f, 128) == want
    assert _run(be, f, 192) == want                   # the dynamic recompile, guarded to 192
    assert _run(be, f, 128) == want
    _expect_mismatch(f, 256, SID)


def test_plan_under_dynamic_batch_keeps_applying(plan128):
    """Regression guard for the fix: the batch dimension is not part of a plan's shapes, so a
    dynamic batch size does not trip it."""
    model, plan = plan128
    want = (plan.sites[SID].topk, plan.sites[SID].topp)
    torch._dynamo.reset()
    be = sc.backend(config=CFG.replace(topk=0.9, topp=0.0), inner="eager", plan=plan)
    f = torch.compile(model, backend=be, dynamic=True)
    for b in (2, 3, 5):
        assert _run(be, f, 128, b) == want


# ------------------------------------------------------------------ 2. batches the model rejects


def test_calibrate_rejected_batch_names_its_index_and_cause():
    model = make_model()
    torch._dynamo.reset()
    bad = (torch.randn(1, 128, DIM - 16),)
    with pytest.raises(sc.CalibrationError) as info, torch.no_grad():
        sc.calibrate(model, [batch(128), bad], target_sparsity=0.5, config=CFG)
    msg = str(info.value)
    assert "batch 1" in msg and "(1, 128, 48)" in msg, msg
    assert "same reduction dim" in msg, msg            # the model's own error message
    assert info.value.__cause__ is not None


def test_calibrate_rejected_first_batch_from_callable_names_its_index():
    model = make_model()
    torch._dynamo.reset()
    with pytest.raises(sc.CalibrationError, match=r"batch 0 .*same reduction dim") as info, torch.no_grad():
        sc.calibrate(model, lambda i: (torch.randn(1, 128, 8),), batches=2, target_sparsity=0.5, config=CFG)
    assert info.value.__cause__ is not None


# ------------------------------------------------------------------ 3. loading a saved plan


def _plan_dict():
    site = PlanSite(topk=0.1, topp=0.2, kind="sdpa", shapes=[{"q": [2, 128, 32], "k": [2, 128, 32]}])
    return sc.SpargePlan(config=CFG, sites={SID: site}, objective={"target_sparsity": 0.5}).to_dict()


def test_saved_calibrated_plan_round_trips(plan128, tmp_path):
    """Regression guard: validation accepts what calibrate() saves."""
    _, plan = plan128
    loaded = sc.SpargePlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.table() == plan.table()
    assert sc.SpargePlan.from_dict(_plan_dict()).to_dict() == _plan_dict()
