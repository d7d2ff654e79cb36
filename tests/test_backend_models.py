"""Real library models (random weights from configs, no downloads) compiled with the sparge
backend: every attention site rewritten, outputs and gradients equal to the eager model with the
same masks, and a training step runs. Skipped when the library is not installed."""
from __future__ import annotations

import pytest
import torch
from _backend_util import (
    SDPACalls,
    allow_broken_torchvision,
    compile_sparge,
    masks_of,
    rel_err,
    run_same_masks,
    tiny_bert,
    tiny_dit,
    tiny_vit,
)


def _check(model, n_sites, *inputs, out_of=lambda o: o):
    """Compile in train mode, compare with same-mask eager (forward and grads), take an SGD step."""
    torch._dynamo.reset()
    model.train()
    compiled, be = compile_sparge(model)
    out = out_of(compiled(*inputs))
    rep = be.report()
    assert len(rep.rewritten) == n_sites and not rep.dense, str(rep)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = out_of(run_same_masks(model, masks_of(be), *inputs))
    ref.square().mean().backward()
    assert rel_err(out, ref) < 1e-4
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # a parameter off the loss's path (BERT's pooler) has grad None eagerly, zeros compiled
    assert ref_grads and set(ref_grads) <= set(grads)
    assert all(not grads[n].any() for n in set(grads) - set(ref_grads))
    # each gradient to 1e-3 of its norm; gradients that are ~0 (e.g. BERT's embedding LayerNorm,
    # ~1e-10) to 1e-3 of a floor of 1% of the largest one, not of their own rounding noise
    floor = 1e-2 * max(float(g.norm()) for g in ref_grads.values())
    for n, r in ref_grads.items():
        g = grads[n]
        assert float((g - r).double().norm()) <= 1e-3 * max(float(r.norm()), floor), n
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.isfinite(out_of(compiled(*inputs))).all()
    return rep


def test_timm_vit():
    model = tiny_vit(64)
    x = torch.randn(1, 3, 64, 64)
    rep = _check(model, 2, x)
    assert rep.sites[0].shapes["q"] == (1, 2, 65, 32)


def test_diffusers_dit():
    model = tiny_dit()
    x = torch.randn(1, 4, 16, 16)
    t, y = torch.tensor([10]), torch.tensor([3])
    rep = _check(model, 2, x, t, y, out_of=lambda o: o.sample if hasattr(o, "sample") else o[0])
    assert rep.sites[0].shapes["q"] == (1, 2, 64, 32)


def test_transformers_bert():
    model = tiny_bert(128)
    ids = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    _check(model, 2, ids, out_of=lambda o: o.last_hidden_state)


class _Positional(torch.nn.Module):
    """A diffusers transformer called as model(hidden_states) with its other inputs fixed."""

    def __init__(self, model, inp: dict):
        super().__init__()
        self.model, self.rest = model, {k: v for k, v in inp.items() if k != "hidden_states"}

    def forward(self, hidden_states):
        return self.model(hidden_states=hidden_states, **self.rest)[0]


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_diffusers_wan_and_flux(name):
    """The two video/image models of `bench models` (their real diffusers classes at tiny widths):
    every attention call rewritten (self, cross and joint; counted by an SDPA hook, not by our
    report), compiled output and gradients equal to eager with the same masks. Their processors
    hand attention (B, N, H, D)-major q/k/v and flatten the heads of the output back."""
    allow_broken_torchvision()
    pytest.importorskip("diffusers")
    from bench import model_steps as M

    model, kw = M.build(name, True, "cpu", torch.float32)
    inp = M.inputs(name, kw, True, "cpu", torch.float32)
    wrapped = _Positional(model, inp)
    with SDPACalls() as calls, torch.no_grad():
        wrapped(inp["hidden_states"])
    assert calls.calls >= 2
    _check(wrapped, calls.calls, inp["hidden_states"])
