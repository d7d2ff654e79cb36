"""sc.distill and the flow-matching helper (CPU).

One test runs the real kernels in Triton's interpreter (TRITON_INTERPRET=1, as CI sets it) with
the default student (sparge backend + aot_eager). The training-loop mechanics (resume,
checkpoints, errors) do not depend on which kernel computes the sparse attention, so those tests
run the ops' chunked PyTorch path (TRITON_INTERPRET=0 for the test) with the backend's "eager"
inner compiler, to stay fast.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge_compile as sc
import sparge_compile.distillation as D

CFG = sc.SpargeConfig(topk=0.25, topp=0.5, block_q=16, block_k=16, mode="topk", min_seq_len=0)
N_TOK = 64


class TinyAttn(nn.Module):
    """One pre-norm attention layer (head dim 32) + an MLP, attention via F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 32, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        with torch.no_grad():
            self.qkv.weight.mul_(3.0)   # peaky enough attention that the block mask matters

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(x)


def batch(i: int, dim: int = 32):
    g = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(1, N_TOK, dim, generator=g),)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyAttn(**kw)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def torch_path(monkeypatch):
    """The ops' PyTorch implementation instead of Triton's interpreter (mechanics tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


FAST = dict(config=CFG, backend_inner="eager", progress=False)


def test_loss_falls_teacher_unchanged():
    """Real path: backend + aot_eager, kernels in the interpreter under CI's TRITON_INTERPRET=1."""
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    x = batch(0)
    res = sc.distill(model, lambda i: x, steps=3, lr=1e-2, config=CFG, progress=False)
    student, losses = res
    assert len(losses) == 3 and all(l > 0 for l in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in res.teacher.state_dict().items():      # the teacher is the untouched original
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in res.teacher.parameters())
    assert not res.teacher.training
    assert res.module is model and not torch.equal(model.qkv.weight, before["qkv.weight"])
    # the student really runs sparse attention: it differs from the teacher, and the backend
    # rewrote the site
    with torch.no_grad():
        assert not torch.allclose(student(*x), res.teacher(*x))


@pytest.mark.parametrize("kind", ["callable", "iterable"])
def test_resume_matches_uninterrupted(tmp_path, torch_path, kind):
    """Ctrl-C after step 2 saves a checkpoint; resuming reproduces the uninterrupted run exactly
    (dropout in train mode exercises the RNG state in the checkpoint)."""
    def inputs():
        return batch if kind == "callable" else [batch(i) for i in range(3)]   # 3 batches: epochs wrap

    kw = dict(FAST, steps=4, lr=1e-2, checkpoint_every=1, train_mode=True)
    full = sc.distill(make_model(dropout=0.3), inputs(), checkpoint_dir=tmp_path / "full", **kw)

    def stop_at_2(info):
        if info.step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sc.distill(make_model(dropout=0.3), inputs(), checkpoint_dir=tmp_path / "cut",
                   callback=stop_at_2, **kw)
    ck = D.load_checkpoint(tmp_path / "cut" / D.CHECKPOINT_NAME)
    assert ck["step"] == 2 and ck["losses"] == full.losses[:2]

    resumed = sc.distill(make_model(dropout=0.3), inputs(), checkpoint_dir=tmp_path / "cut", **kw)
    assert resumed.losses == full.losses
    for (k, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
    # finished: a further resume trains nothing and returns the same history
    again = sc.distill(make_model(dropout=0.3), inputs(), checkpoint_dir=tmp_path / "cut", **kw)
    assert again.step == 4 and again.losses == full.losses


def test_cosine_schedule_with_warmup_and_its_resume(tmp_path, torch_path):
    """lr_schedule="cosine" with warm-up: each step's lr is the base lr times the warm-up ramp,
    then a half cosine to 0 at the last step; a run cut after step 3 and resumed follows the same
    lr curve, losses and weights as the uninterrupted one."""
    import math

    kw = dict(FAST, steps=6, lr=1e-2, lr_schedule="cosine", warmup_steps=2, checkpoint_every=1)
    lrs = []
    full = sc.distill(make_model(), batch, checkpoint_dir=tmp_path / "full",
                      callback=lambda info: lrs.append(info.lr), **kw)
    cos = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert lrs == pytest.approx([1e-2 * f for f in (0.5, 1.0, *cos)])

    cut_lrs = []
    def stop_at_3(info):
        cut_lrs.append(info.lr)
        if info.step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sc.distill(make_model(), batch, checkpoint_dir=tmp_path / "cut", callback=stop_at_3, **kw)
    resumed = sc.distill(make_model(), batch, checkpoint_dir=tmp_path / "cut",
                         callback=lambda info: cut_lrs.append(info.lr), **kw)
    assert cut_lrs == pytest.approx(lrs) and resumed.losses == full.losses
    for (k, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
    const = sc.distill(make_model(), batch, **dict(kw, lr_schedule="constant", warmup_steps=0))
    assert const.losses != full.losses   # the schedule changed the run


def test_interrupted_write_never_corrupts(tmp_path, torch_path, monkeypatch):
    ckdir = tmp_path / "ck"
    sc.distill(make_model(), batch, steps=2, checkpoint_every=1, checkpoint_dir=ckdir, **FAST)
    path = ckdir / D.CHECKPOINT_NAME
    good = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):   # half a file, then the "machine dies"
        f.write(b"PK\x03\x04 torn checkpoint")
        raise OSError("simulated crash during save")
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        sc.distill(make_model(), batch, steps=4, checkpoint_every=1, checkpoint_dir=ckdir, **FAST)
    assert path.read_bytes() == good
    assert D.load_checkpoint(path)["step"] == 2
    assert sorted(os.listdir(ckdir)) == sorted([D.CHECKPOINT_NAME,
                                                "distill_prev.pt"])   # no temp file left behind

    # a process killed mid-write leaves a stale temp file: it is never read, and cleaned up
    monkeypatch.setattr(torch, "save", real_save)
    (ckdir / f".{D.CHECKPOINT_NAME}.dead.tmp").write_bytes(b"garbage")
    res = sc.distill(make_model(), batch, steps=3, checkpoint_every=1, checkpoint_dir=ckdir, **FAST)
    assert res.step == 3 and len(res.losses) == 3
    assert sorted(os.listdir(ckdir)) == sorted([D.CHECKPOINT_NAME, "distill_prev.pt"])


def test_nonfinite_loss_raises_keeps_checkpoint(tmp_path, torch_path):
    def inputs(i):
        x, = batch(i)
        return (x * float("nan"),) if i == 2 else (x,)
    with pytest.raises(D.NonFiniteLossError, match=r"loss is nan at step 3.*step 2"):
        sc.distill(make_model(), inputs, steps=5, checkpoint_every=1, checkpoint_dir=tmp_path, **FAST)
    ck = D.load_checkpoint(tmp_path / D.CHECKPOINT_NAME)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["student"].values())


def test_bad_inputs_fail_at_first_step(torch_path):
    with pytest.raises(D.DistillError, match="rejected the first batch"):
        sc.distill(make_model(), lambda i: (torch.randn(1, N_TOK, 7),), steps=2, **FAST)

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            return self.lin(x)
    with pytest.raises(D.DistillError, match="no attention"):
        sc.distill(NoAttention(), batch, steps=2, **FAST)
    # attention too short for min_seq_len stays dense: the report says why
    with pytest.raises(D.DistillError, match="no attention"):
        sc.distill(make_model(), batch, steps=2, **dict(FAST, config=CFG.replace(min_seq_len=4096)))


def test_flow_matching_inputs():
    lat = torch.randn(8, 3, 8, 8)
    y = torch.arange(8)
    draw = sc.flow_matching_inputs(lat, y, batch_size=4, seed=3)
    x_t, t, c = draw(5)
    assert x_t.shape == (4, 3, 8, 8) and t.shape == (4,) and c.shape == (4,)
    assert ((t > 0) & (t < 1)).all()
    assert all(torch.equal(a, b) for a, b in zip(draw(5), draw(5)))      # deterministic per step
    assert not torch.equal(draw(6)[0], x_t)
    # x_t = (1 - t) x0 + t eps with x0 = lat[c] (cond rows follow the data rows)
    eps = (x_t - (1 - t.view(-1, 1, 1, 1)) * lat[c]) / t.view(-1, 1, 1, 1)
    assert eps.std() > 0.5 and eps.abs().max() < 10
    d = sc.flow_matching_inputs(lat, batch_size=2, keys=("x", "t"), timestep_scale=1000.0)(0)
    assert set(d) == {"x", "t"} and (d["t"] > 1).all()

    # from the teacher's own samples: a model whose velocity is x (so samples shrink to 0 ... e^-1)
    class Vel(nn.Module):
        def forward(self, x, t):
            return x
    draw = sc.flow_matching_inputs(teacher=Vel(), noise_shape=(3, 4, 4), num_samples=5, batch_size=2,
                                   sample_steps=50)
    x_t, t = draw(0)
    assert x_t.shape == (2, 3, 4, 4)
    z = torch.randn(2, 3)
    assert torch.allclose(sc.euler_sample(Vel(), z, steps=200), z * torch.exp(torch.tensor(-1.0)), rtol=1e-2)
    ts = sc.logit_normal_timesteps(10000, generator=torch.Generator().manual_seed(0))
    assert abs(ts.mean().item() - 0.5) < 0.02 and abs(torch.logit(ts).std().item() - 1.0) < 0.05
