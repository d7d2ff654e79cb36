"""A calibrated SpargePlan under diffusers' regional compilation (issue 22):
``transformer.compile_repeated_blocks(backend=...)`` compiles one graph that serves every block, and
the plan's per-block choices still reach each block (sparge_compile.plan_scope).

The masks each call used are recorded independently of our report, by a wrapper of the kernel
the sparse op calls (q, k and the mask it was given), and each is recomputed from q and k with the reference
rule (sparge_compile.reference) at the plan's choice for that block. Outputs are compared with the
same plan applied to the whole model compiled at once.
"""
from __future__ import annotations

import copy

import pytest
import torch
from _backend_util import allow_broken_torchvision, pytorch_path, rel_err
from torch._dynamo.exc import BackendCompilerFailed

import sparge_compile as sc
from sparge_compile import ops
from sparge_compile.plan import PlanMismatchError, SpargePlan
from sparge_compile.plan_scope import ParamIndex
from sparge_compile.reference import reference_block_mask

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = sc.SpargeConfig(block_q=16, block_k=16, min_seq_len=64)   # cross-attention (8 keys) stays dense
LAYERS = 3


def tiny_wan():
    """diffusers' WanTransformer3DModel: 3 blocks, 2 heads of 32, 128 video tokens, 8 text tokens."""
    allow_broken_torchvision()
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=LAYERS, rope_max_seq_len=32).eval()


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)


class SparseCalls:
    """Every call of the sparse attention kernel (what the op hands it): (q, k, scale, dense
    kept-block mask), in order."""

    def __enter__(self):
        self.calls, self._orig = [], ops.kernels.attention_fwd

        def attention_fwd(q, k, v, num, idx, scale, is_causal, block_q, block_k, *rest):
            sm = sc.SpargeBlockMask(num, idx, q.shape[2], k.shape[2], block_q, block_k, is_causal)
            self.calls.append((q.clone(), k.clone(), scale, sm.to_dense()))
            return self._orig(q, k, v, num, idx, scale, is_causal, block_q, block_k, *rest)

        ops.kernels.attention_fwd = attention_fwd
        return self

    def __exit__(self, *exc):
        ops.kernels.attention_fwd = self._orig


def run(model, x, compile_fn):
    torch._dynamo.reset()
    be = sc.backend(config=CFG, plan=PLAN["plan"], inner="aot_eager")
    compiled = compile_fn(model, be)
    with torch.no_grad(), SparseCalls() as seen:
        out = compiled(**x)[0]
    return out, seen.calls, be


def whole(model, be):
    return torch.compile(model, backend=be)


def regional(model, be):
    model.compile_repeated_blocks(backend=be)
    return model


PLAN: dict = {}


@pytest.fixture(scope="module")
def calibrated():
    with pytorch_path():
        model = tiny_wan()
        plan = sc.calibrate(model, [batch(0), batch(1)], target_sparsity=0.5, config=CFG)
        return model, plan


def block_choice(plan, i):
    return plan.sites[f"blocks.{i}.attn1#0"]


def expected_mask(plan, i, q, k, scale):
    s = block_choice(plan, i)
    if s.dense:
        return torch.ones(reference_block_mask(q, k, scale, block_q=16, block_k=16).shape, dtype=torch.bool)
    return reference_block_mask(q, k, scale, topk=s.topk, topp=s.topp, mode=plan.config.mode, block_q=16,
                                block_k=16)


def test_calibrated_plan_applies_per_block_under_regional_compile(calibrated):
    model, plan = calibrated
    choices = [(block_choice(plan, i).topk, block_choice(plan, i).topp) for i in range(LAYERS)]
    assert len(set(choices)) > 1, f"calibration gave every block the same choice {choices}: nothing to test"
    PLAN["plan"] = plan
    x = batch(5)
    ref, ref_calls, _ = run(model, x, whole)
    out, calls, be = run(model, x, regional)
    assert len(calls) == len(ref_calls) == LAYERS     # one sparse call per block (attn1), attn2 dense
    kept = []
    for i, ((q, k, scale, mask), (_, _, _, ref_mask)) in enumerate(zip(calls, ref_calls)):
        assert torch.equal(mask, expected_mask(plan, i, q, k, scale)), f"block {i}"
        assert torch.equal(mask, ref_mask)
        kept.append(int(mask.sum()))
    assert len(set(kept)) > 1, kept                    # blocks really kept different numbers of blocks
    assert rel_err(out, ref) < 1e-6
    # the report (of the backend and of explain(model)) has one row per block, with its choice
    rep = sc.explain(model)
    rows = {i["site_id"]: i for s in rep.sites for i in s.instances()}
    assert sorted(rows) == [f"blocks.{i}.attn1#0" for i in range(LAYERS)]
    table = str(be.report())
    for i, (topk, topp) in enumerate(choices):
        inst = rows[f"blocks.{i}.attn1#0"]
        assert (inst["config"].topk, inst["config"].topp, inst["calls"]) == (topk, topp, 1)
        assert int(inst["block_mask"].kv_num_blocks.sum()) == kept[i]
        line = next(ln for ln in table.splitlines() if f"blocks.{i}.attn1#0" in ln)
        assert f"{topk:g} / {topp:g}" in line and f"{inst['block_mask'].sparsity():.1%}" in line


def test_hand_edited_plan_dense_block_and_set_config(calibrated):
    model, plan = calibrated
    plan = SpargePlan.from_dict(plan.to_dict()).bind(model)
    for i, (topk, topp) in enumerate([(0.25, 0.0), (None, None), (0.75, 0.0)]):
        s = block_choice(plan, i)
        s.topk, s.topp, s.dense = topk, topp, topk is None
    PLAN["plan"] = plan
    x = batch(6)
    ref, ref_calls, _ = run(model, x, whole)
    out, calls, be = run(model, x, regional)
    assert len(ref_calls) == 2 and len(calls) == 3    # whole model: block 1 is not rewritten at all
    for i, (q, k, scale, mask) in enumerate(calls):
        assert torch.equal(mask, expected_mask(plan, i, q, k, scale)), f"block {i}"
    assert [int(c[3].sum()) for c in calls] == [2 * 8 * 2, 2 * 8 * 8, 2 * 8 * 6]   # ceil(topk * 8) per row
    assert rel_err(out, ref) < 1e-5                   # block 1: every key block kept = dense attention
    assert "dense (plan)" in next(ln for ln in str(be.report()).splitlines() if "blocks.1.attn1#0" in ln)
    be.set_config(topk=0.5)                           # run-time change reaches the sparse instances only
    with torch.no_grad(), SparseCalls() as seen:
        model(**x)
    assert [int(c[3].sum()) for c in seen.calls] == [2 * 8 * 4, 2 * 8 * 8, 2 * 8 * 4]


def test_regional_plan_that_cannot_apply_raises(calibrated):
    model, plan = calibrated
    PLAN["plan"] = SpargePlan.from_dict(plan.to_dict())   # loaded: not bound to a model
    with pytest.raises((PlanMismatchError, BackendCompilerFailed), match=r"plan\.bind\(model\)"):
        run(model, batch(0), regional)
    PLAN["plan"] = plan
    _, _, be = run(model, batch(0), regional)
    other = copy.deepcopy(model)      # same code and backend: Dynamo reuses the graph, the run finds it
    other.compile_repeated_blocks(backend=be)
    with torch.no_grad(), pytest.raises(PlanMismatchError, match="not part of the model the plan is bound"):
        other(**batch(0))


def test_param_index_never_names_a_freed_or_moved_address():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    index = ParamIndex(model)
    w = model[1].weight
    assert index.names(w) == ["1.weight"]
    old = w.data
    w.data = torch.randn(4, 4)            # the parameter moved: its old address names nothing
    assert index.names(old) == [] and index.names(w) == ["1.weight"]
    del model, w
    assert index.names(old) == []         # model freed
