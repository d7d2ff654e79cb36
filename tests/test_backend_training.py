"""The sparge backend's contract beyond matching: options, training, dropout switch, dynamic
shapes without recompiles, run-time topk/topp, the report, the entry point."""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _backend_util import CFG, compile_sparge, masks_of, rel_err, run_same_masks
from torch._dynamo.utils import counters

import sparge_compile as sc


class Block(nn.Module):
    """A tiny transformer block: qkv projection, SDPA with training dropout, out projection."""

    def __init__(self, dim=64, heads=2, p=0.1):
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def _x(n=64, seed=0):
    return torch.randn(1, n, 64, generator=torch.Generator().manual_seed(seed))


def test_training_step_gradients_match_same_mask_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block(p=0.0).train()
    compiled, be = compile_sparge(model)
    x = _x()
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(be.report().rewritten) == 1
    model.zero_grad()
    run_same_masks(model, masks_of(be), x).square().mean().backward()
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad) < 1e-4, n
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # a full step: parameters change, the compiled model still runs
    assert torch.isfinite(compiled(x)).all()


def test_train_eval_dropout_switch():
    torch._dynamo.reset()
    model = Block(p=0.1)
    compiled, be = compile_sparge(model)
    x = _x()
    model.train()
    compiled(x)
    model.eval()
    with torch.no_grad():
        compiled(x)
    train_site, eval_site = be.report().sites
    assert not train_site.rewritten and "dropout" in train_site.reason
    assert eval_site.rewritten


def test_no_recompile_when_sequence_length_changes():
    torch._dynamo.reset()
    counters.clear()
    model = Block(p=0.0).eval()
    compiled, be = compile_sparge(model, dynamic=True)
    with torch.no_grad():
        for n in (72, 80, 128, 96):  # not 64: duck sizing would tie it to the 64 channels
            out = compiled(_x(n))
            assert out.shape == (1, n, 64)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    (site,) = be.report().sites
    assert site.rewritten and site.calls == 4


def test_min_seq_len_is_a_guard_on_dynamic_length():
    torch._dynamo.reset()
    counters.clear()
    model = Block(p=0.0).eval()
    compiled, be = compile_sparge(model, config=CFG.replace(min_seq_len=100), dynamic=True)
    with torch.no_grad():
        for n in (72, 80, 128, 112):  # not 64 (duck sizing with the 64 channels)
            compiled(_x(n))
    short, long_ = be.report().sites
    assert not short.rewritten and short.reason.startswith("short") and long_.rewritten
    assert counters["stats"]["unique_graphs"] == 2  # one recompile, when the length crossed 100


def test_topk_topp_change_at_run_time_without_recompile():
    torch._dynamo.reset()
    counters.clear()
    model = Block(p=0.0).eval()
    compiled, be = compile_sparge(model, config=CFG.replace(topk=0.0, topp=0.0))
    x = _x(128)
    with torch.no_grad():
        compiled(x)
        sparse = be.report().sites[0].sparsity
        be.set_config(topk=1.0)
        out = compiled(x)
    assert be.report().sites[0].sparsity == 0.0 < sparse
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)  # all blocks kept: dense attention
    with pytest.raises(ValueError, match="run time"):
        be.set_config(block_q=32)


def test_options_and_entry_point():
    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "sparge"]
    assert ep.load() is sc.backend.__globals__["sparge_backend"]
    torch._dynamo.reset()
    f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend="sparge",
                      options={"block_q": 16, "block_k": 16, "min_seq_len": 0, "inner": "aot_eager"})
    q = torch.randn(1, 2, 64, 32)
    f(q)
    rep = sc.explain(f)
    assert len(rep.rewritten) == 1 and rep.sites[0].sparsity is not None
    torch._dynamo.reset()
    bad = torch.compile(lambda q: q * 2, backend="sparge", options={"topq": 0.1})
    with pytest.raises(Exception, match="unknown option.*topq"):
        bad(q)
    with pytest.raises(ValueError, match="inner"):
        sc.backend(inner="tvm")


def test_record_masks_off_keeps_no_mask_same_output():
    """record_masks=False (for CUDA graphs): same output, no mask kept, no measured sparsity; also
    settable through torch.compile options."""
    model = Block(p=0.0).eval()
    x = _x(128)
    outs = []
    for record in (True, False):
        torch._dynamo.reset()
        be = sc.backend(CFG, inner="aot_eager", record_masks=record)
        with torch.no_grad():
            outs.append(torch.compile(model, backend=be)(x))
        site = be.report().sites[0]
        assert site.calls == 1 and (site.sparsity is not None) == record
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch._dynamo.reset()
    f = torch.compile(model, backend="sparge", options={"block_q": 16, "block_k": 16, "min_seq_len": 0,
                                                        "inner": "aot_eager", "record_masks": False})
    with torch.no_grad():
        f(x)
    site = sc.explain(f).sites[-1]  # explain() also lists the earlier compiles of Block.forward
    assert site.calls == 1 and site.sparsity is None


def test_explain_runs_the_model_and_logs(caplog):
    torch._dynamo.reset()
    model = Block(p=0.0).eval()
    compiled = torch.compile(model, backend=sc.backend(CFG, inner="aot_eager"))
    with caplog.at_level(logging.INFO, logger="sparge_compile.backend"), torch.no_grad():
        rep = sc.explain(compiled, _x())
    assert len(rep.rewritten) == 1 and 0.0 <= rep.sites[0].sparsity < 1.0
    assert "1 rewritten" in caplog.text
    assert "sparse" in str(rep) and rep.as_dicts()[0]["shapes"]["q"] == (1, 2, 64, 32)


def test_plan_keeps_a_site_dense():
    torch._dynamo.reset()
    be = sc.backend(CFG, inner="aot_eager", plan=lambda site: None)
    model = Block(p=0.0).eval()
    with torch.no_grad():
        torch.compile(model, backend=be)(_x())
    (site,) = be.report().sites
    assert not site.rewritten and "plan" in site.reason


def test_inductor_end_to_end():
    torch._dynamo.reset()
    model = Block(p=0.0).eval()
    compiled, be = compile_sparge(model, inner="inductor")
    x = _x()
    with torch.no_grad():
        out = compiled(x)
        ref = run_same_masks(model, masks_of(be), x)
    assert len(be.report().rewritten) == 1 and rel_err(out, ref) < 1e-4
