"""DistillConfig / CalibrateConfig: validation naming the field, and distill() / calibrate()
taking either their keyword arguments or one config object, with the same result."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge_compile as sc

CFG = sc.SpargeConfig(topk=0.25, topp=0.5, block_q=16, block_k=16, mode="topk", min_seq_len=0)


class Tiny(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return x + self.o(F.scaled_dot_product_attention(q, k, v).squeeze(1))


def make_model():
    torch.manual_seed(0)
    return Tiny()


def batch(i):
    return (torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(i)),)


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()


@pytest.mark.parametrize("cls, call, arg", [(sc.DistillConfig, sc.distill, "distill_config"),
                                            (sc.CalibrateConfig, sc.calibrate, "calibrate_config")])
def test_signature_defaults_are_the_config_defaults(cls, call, arg):
    """A keyword left at its default is 'not given' beside a config: both must agree."""
    params = inspect.signature(call).parameters
    assert arg in params
    for f in dataclasses.fields(cls):
        want = None if f.default is dataclasses.MISSING else f.default   # (steps: required in the config)
        assert params[f.name].default == want, f.name


@pytest.mark.parametrize("kw, exc, field", [
    ({"steps": -1}, ValueError, "steps"), ({"steps": 2.0}, TypeError, "steps"),
    ({"lr": "x"}, TypeError, "lr"), ({"lr": float("nan")}, ValueError, "lr"), ({"loss": "l2"},
                                                                               ValueError, "loss"),
    ({"grad_accum": 0}, ValueError, "grad_accum"), ({"log_every": True}, TypeError, "log_every"),
    ({"amp_dtype": "bf16"}, TypeError, "amp_dtype"), ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
    ({"checkpoint_dir": 3}, TypeError, "checkpoint_dir"), ({"resume": "no"}, TypeError, "resume"),
    ({"seed": 1.5}, TypeError, "seed"), ({"on_interrupt": "exit"}, ValueError, "on_interrupt"),
    ({"lr_schedule": "linear"}, ValueError, "lr_schedule"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
])
def test_distill_config_names_the_bad_field(kw, exc, field):
    with pytest.raises(exc, match=rf"DistillConfig\.{field}\b"):
        sc.DistillConfig(**{"steps": 1, **kw})
    with pytest.raises(exc, match=field):   # the same check through distill()'s keyword arguments
        sc.distill(make_model(), batch, **{"steps": 1, "progress": False, **kw})


def test_distill_config_gives_the_same_run_as_keywords():
    kw = {"steps": 3, "lr": 1e-2, "progress": False, "backend_inner": "eager", "seed": 3}
    by_kw = sc.distill(make_model(), batch, config=CFG, **kw)
    settings = sc.DistillConfig(**kw)
    by_cfg = sc.distill(make_model(), batch, config=CFG, distill_config=settings)
    assert by_cfg.losses == by_kw.losses and len(by_kw.losses) == 3
    for (k, a), b in zip(by_kw.module.state_dict().items(), by_cfg.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_setting_in_two_places_or_nowhere_is_an_error():
    settings = sc.DistillConfig(steps=2, progress=False)
    with pytest.raises(TypeError, match=r"lr=0\.1 given both .* distill_config"):
        sc.distill(make_model(), batch, lr=0.1, distill_config=settings)
    with pytest.raises(TypeError, match=r"steps=2 given both"):
        sc.distill(make_model(), batch, steps=2, distill_config=settings)
    with pytest.raises(TypeError, match="needs steps"):
        sc.distill(make_model(), batch)
    with pytest.raises(TypeError, match="distill_config must be a DistillConfig"):
        sc.distill(make_model(), batch, distill_config={"steps": 2})
    with pytest.raises(TypeError, match="max_rounds=2 given both"):
        sc.calibrate(make_model(), [batch(0)], max_rounds=2,
                     calibrate_config=sc.CalibrateConfig(max_error=0.1))


def test_config_replace_validates():
    settings = sc.DistillConfig(steps=2)
    assert settings.replace(lr=0.5).lr == 0.5 and settings.lr == 1e-5
    with pytest.raises(ValueError, match="grad_accum"):
        settings.replace(grad_accum=0)
    with pytest.raises(TypeError, match="unknown DistillConfig field"):
        settings.replace(stpes=3)


def test_calibrate_config_normalises_the_grid_and_names_bad_fields():
    c = sc.CalibrateConfig(target_sparsity=0.5, topks=[0.2, 0.1, 0.2], topps=(1, 0))
    assert c.topks == (0.1, 0.2) and c.topps == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"exactly one of CalibrateConfig\.target_sparsity"):
        sc.CalibrateConfig()
    with pytest.raises(TypeError, match=r"CalibrateConfig\.inner"):
        sc.CalibrateConfig(max_error=0.1, inner=3)


def test_calibrate_config_gives_the_same_plan_as_keywords():
    data = [batch(0), batch(1)]
    kw = {"target_sparsity": 0.5, "sample_blocks": 2, "topks": (0.1, 0.25, 0.5), "topps": (0.0, 0.5)}
    with torch.no_grad():
        by_kw = sc.calibrate(make_model(), data, config=CFG, **kw)
        by_cfg = sc.calibrate(make_model(), data, config=CFG, calibrate_config=sc.CalibrateConfig(**kw))
    assert {s: p.to_dict() for s, p in by_cfg.sites.items()} == {s: p.to_dict() for s,
                                                                 p in by_kw.sites.items()}
    assert by_kw.summary["calibrated"] == 1 and by_kw.summary["grid"] == [3, 1]   # mode "topk": no top-p axis


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_distill_amp_and_resume_on_cuda(tmp_path, amp):
    """The CUDA-only paths: autocast, fp16's GradScaler (clipping through unscale_), inductor as the
    inner compiler, and a resumed run continuing the first one's loss history."""
    def model():
        torch.manual_seed(0)
        return Tiny(dim=64).cuda()

    x = (torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(0)),)

    def data(i):   # one batch: the loss falls step by step
        return x

    cfg = CFG.replace(block_q=64, block_k=64)
    kw = {"lr": 1e-3, "amp_dtype": amp, "max_grad_norm": 1.0, "progress": False}
    part = sc.distill(model(), data, steps=2, config=cfg, checkpoint_dir=tmp_path, **kw)
    dc = sc.DistillConfig(steps=4, checkpoint_dir=tmp_path, **kw)
    res = sc.distill(model(), data, config=cfg, distill_config=dc)
    assert res.step == 4 and res.losses[:2] == part.losses
    assert all(torch.isfinite(torch.tensor(res.losses))) and res.losses[-1] < 0.9 * res.losses[0], res.losses
