"""A training step through ``torch.compile(model, backend="sparge")`` with the default inner
compiler (Inductor) on the CPU PyTorch path (TRITON_INTERPRET=0, set by conftest for the
test_backend* modules) for a timm ViT, a diffusers DiT and a transformers BERT (tiny random
configs, no downloads).

Dense settings (topk=1.0: every block kept): every parameter's gradient equals the eager model's.
That the sites really were rewritten is counted independently of the backend's report: eager
SDPA calls under a TorchFunctionMode, and the sparse kernels the compiled model runs (the
functions ``sparge::block_sparse_attention`` and its backward dispatch to, wrapped). Then, with
the same compiled graph at sparse settings (topk/topp are run-time values), output and gradients
equal the eager model's with the same masks.
"""
from __future__ import annotations

import collections

import pytest
import torch
from _backend_util import SDPACalls, rel_err, run_same_masks, tiny_bert, tiny_dit, tiny_vit

import sparge_compile as sc
from sparge_compile import kernels

DENSE = {"topk": 1.0, "topp": 1.0, "block_q": 16, "block_k": 16, "min_seq_len": 0}
SPARSE = {"topk": 0.3, "topp": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often the sparse forward / backward kernels ran (wraps what the ops call)."""
    calls = collections.Counter()
    for name in ("attention_fwd", "attention_bwd"):
        orig = getattr(kernels, name)

        def wrapped(*args, _orig=orig, _name=name):
            calls[_name] += 1
            return _orig(*args)
        monkeypatch.setattr(kernels, name, wrapped)
    return calls


def _loss(out):
    return sum(t.float().square().mean() for t in out)


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_grads_equal(got, want):
    """Each gradient to 1e-4 of its norm; near-zero ones to 1e-4 of 1% of the largest."""
    assert set(got) == set(want)
    floor = 1e-2 * max(float(g.norm()) for g in want.values() if g is not None)
    for n, r in want.items():
        g = got[n]
        if r is None:  # off the loss's path eagerly: none (or zeros) compiled
            assert g is None or not g.any(), n
            continue
        assert g is not None, f"{n}: no gradient through the compiled model"
        err = float((g - r).double().norm())
        assert err <= 1e-4 * max(float(r.norm()), floor), (n, err, float(r.norm()))


def _train_step_matches_eager(calls, model, n_sites, inputs, outs):
    """Compile with backend="sparge" (default inner: Inductor) at dense settings, take a training
    step, compare with eager; then the same graph at sparse settings vs same-mask eager."""
    torch._dynamo.reset()
    model.train()
    with SDPACalls() as counted:
        ref_out = outs(model(*inputs))
    _loss(ref_out).backward()
    assert counted.calls == n_sites
    ref = _grads(model)
    assert all(g is not None for g in ref.values())   # every parameter is on the loss's path
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="sparge", options=DENSE)
    out = outs(compiled(*inputs))
    assert calls["attention_fwd"] == n_sites          # every SDPA call ran the sparse kernel
    _loss(out).backward()
    assert calls["attention_bwd"] == n_sites
    for a, b in zip(out, ref_out):
        assert rel_err(a, b) < 1e-5
    _assert_grads_equal(_grads(model), ref)
    rep = sc.explain(compiled)
    assert len(rep.rewritten) == n_sites and not rep.dense, str(rep)
    assert all(s.sparsity == 0.0 for s in rep.rewritten)

    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    # the same compiled graph (no recompile: topk/topp are run-time values) at sparse settings:
    # output and gradients equal to the eager model with the same masks
    for site in rep.rewritten:
        site.state.config = site.state.config.replace(**SPARSE)
    model.zero_grad(set_to_none=True)
    out = outs(compiled(*inputs))
    _loss(out).backward()
    got = _grads(model)
    masks = [s.block_mask() for s in sc.explain(compiled).rewritten]
    assert len(masks) == n_sites and all(m.sparsity() > 0 for m in masks)
    model.zero_grad(set_to_none=True)
    ref_out = outs(run_same_masks(model, masks, *inputs))
    _loss(ref_out).backward()
    for a, b in zip(out, ref_out):
        assert rel_err(a, b) < 1e-5
    _assert_grads_equal(got, _grads(model))
    assert calls["attention_fwd"] == calls["attention_bwd"] == 2 * n_sites   # no dense fallback
    return rep


def test_timm_vit_training_step_through_inductor(kernel_calls):
    model = tiny_vit(32)
    rep = _train_step_matches_eager(kernel_calls, model, 2, (torch.randn(2, 3, 32, 32),), lambda o: (o,))
    assert rep.rewritten[0].shapes["q"] == (2, 2, 17, 32)


def test_diffusers_dit_training_step_through_inductor(kernel_calls):
    model = tiny_dit()
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.tensor([3]))
    rep = _train_step_matches_eager(kernel_calls, model, 2, inputs, lambda o: (o.sample,))
    assert rep.rewritten[0].shapes["q"] == (1, 2, 64, 32)


def test_transformers_bert_training_step_through_inductor(kernel_calls):
    model = tiny_bert(64)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    # the pooler output too, so every parameter is on the loss's path
    rep = _train_step_matches_eager(kernel_calls, model, 2, (ids,),
                                    lambda o: (o.last_hidden_state, o.pooler_output))
    assert rep.rewritten[0].shapes["q"] == (1, 2, 40, 32)
