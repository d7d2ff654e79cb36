"""sc.distill reliability: compiled models as input, non-finite gradients, damaged checkpoints,
changed settings on resume (CPU, the ops' PyTorch path, the backend's "eager" inner compiler)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparge_compile as sc
import sparge_compile.distillation as D

OPTS = {"topk": 0.25, "topp": 0.0, "block_q": 16, "block_k": 16, "min_seq_len": 0}
CFG = sc.SpargeConfig(**OPTS)
FAST = {"config": CFG, "backend_inner": "eager", "progress": False}
PREV = "distill_prev.pt"


class M(nn.Module):
    """Two heads of dim 32 over 64 tokens, attention via F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 192)
        self.o = nn.Linear(64, 64)
        with torch.no_grad():
            self.qkv.weight.mul_(3.0)   # peaky enough attention that the block mask matters

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 64, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 64, 64))


def batch(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(1, 64, 64, generator=g),)


def make_model(seed=0):
    torch.manual_seed(seed)
    return M()


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the ops' PyTorch path: fast, same function
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 1. A model already compiled with backend="sparge"


@pytest.mark.parametrize("inplace", [True, False])
def test_compiled_model_gets_dense_teacher_and_learns(inplace):
    dense = make_model()
    original = copy.deepcopy(dense)
    compiled = torch.compile(dense, backend="sparge", options={**OPTS, "inner": "eager"})
    res = sc.distill(compiled, batch, steps=3, lr=1e-2, inplace=inplace, **FAST)
    assert res.losses[0] > 0, res.losses
    assert not isinstance(res.teacher, torch._dynamo.eval_frame.OptimizedModule)
    x, = batch(7)
    with torch.no_grad():
        assert torch.equal(res.teacher(x), original(x))   # the dense original, untrained
        assert not torch.allclose(res.student(x), res.teacher(x))
    trained = not torch.equal(dense.qkv.weight, original.qkv.weight)
    if inplace:
        # the user's module (under their compiled wrapper) holds the trained weights
        assert res.module is dense and trained
        assert compiled._orig_mod.qkv.weight is dense.qkv.weight
    else:
        assert res.module is not dense and not trained
        assert not torch.equal(res.module.qkv.weight, original.qkv.weight)


# --------------------------------------------------------------------------------------------
# 2. Finite loss, non-finite gradients


def _nan_grad_on_backward(param: nn.Parameter, when: int):
    """A hook that turns param's gradient into NaN on its when-th backward (1-based)."""
    calls = [0]

    def hook(g):
        calls[0] += 1
        return g * float("nan") if calls[0] == when else g
    param.register_hook(hook)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_nonfinite_gradients_never_step_or_checkpoint(tmp_path, max_grad_norm):
    model = make_model()
    _nan_grad_on_backward(model.o.bias, when=3)
    with pytest.raises(D.NonFiniteLossError, match=r"gradients are non-finite.*step 3.*o\.bias.*step 2"):
        sc.distill(model, batch, steps=6, checkpoint_every=1, checkpoint_dir=tmp_path,
                   max_grad_norm=max_grad_norm, **FAST)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ck = D.load_checkpoint(tmp_path / D.CHECKPOINT_NAME)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["student"].values())
    assert all(torch.isfinite(torch.tensor(ck["losses"])))


# --------------------------------------------------------------------------------------------
# 3. Damaged checkpoints


def _damage(path, how: str) -> None:
    good = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2],
                      "garbage": b"not a checkpoint at all \x00\xff" * 7}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_error_names_file_and_way_out(tmp_path, how):
    sc.distill(make_model(), batch, steps=2, checkpoint_every=1, checkpoint_dir=tmp_path, **FAST)
    latest = tmp_path / D.CHECKPOINT_NAME
    assert D.load_checkpoint(tmp_path / PREV)["step"] == 1   # the previous checkpoint is kept
    _damage(latest, how)
    with pytest.raises(D.DistillError) as info:
        D.load_checkpoint(latest)
    assert str(latest) in str(info.value) and "weights_only" not in str(info.value)
    with pytest.raises(D.DistillError) as info:
        sc.distill(make_model(), batch, steps=4, checkpoint_every=1, checkpoint_dir=tmp_path, **FAST)
    msg = str(info.value)
    assert str(latest) in msg and "resume=False" in msg and "delete" in msg
    assert str(tmp_path / PREV) in msg and "step 1" in msg
    assert "weights_only" not in msg
    # the way out the message names: put the previous checkpoint back, resume from step 1
    (tmp_path / PREV).replace(latest)
    res = sc.distill(make_model(), batch, steps=3, checkpoint_every=1, checkpoint_dir=tmp_path, **FAST)
    assert res.step == 3 and len(res.losses) == 3


def test_damaged_checkpoint_without_previous(tmp_path):
    sc.distill(make_model(), batch, steps=1, checkpoint_dir=tmp_path, **FAST)
    latest = tmp_path / D.CHECKPOINT_NAME
    assert not (tmp_path / PREV).exists()
    _damage(latest, "truncated")
    with pytest.raises(D.DistillError, match="no previous checkpoint") as info:
        sc.distill(make_model(), batch, steps=2, checkpoint_dir=tmp_path, **FAST)
    assert str(latest) in str(info.value)
    res = sc.distill(make_model(), batch, steps=2, checkpoint_dir=tmp_path, resume=False, **FAST)
    assert res.step == 2 and D.load_checkpoint(latest)["step"] == 2


def test_checkpoint_keeps_previous(tmp_path):
    sc.distill(make_model(), batch, steps=3, checkpoint_every=1, checkpoint_dir=tmp_path, **FAST)
    assert D.load_checkpoint(tmp_path / D.CHECKPOINT_NAME)["step"] == 3
    assert D.load_checkpoint(tmp_path / PREV)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [D.CHECKPOINT_NAME, PREV]   # no temp files


# --------------------------------------------------------------------------------------------
# 4. Changed settings on resume


@pytest.mark.parametrize("changed", [{"grad_accum": 2}, {"seed": 1}, {"lr_schedule": "cosine"},
                                     {"warmup_steps": 3}])
def test_resume_with_changed_grad_accum_or_seed_warns(tmp_path, changed):
    sc.distill(make_model(), batch, steps=1, checkpoint_dir=tmp_path, **FAST)
    (name, value), = changed.items()
    with pytest.warns(UserWarning, match=rf"written with {name}=\S+, now {name}={value}\b"):
        res = sc.distill(make_model(), batch, steps=2, checkpoint_dir=tmp_path, **changed, **FAST)
    assert res.step == 2


def test_resume_with_same_settings_is_quiet(tmp_path, recwarn):
    sc.distill(make_model(), batch, steps=1, checkpoint_dir=tmp_path, **FAST)
    sc.distill(make_model(), batch, steps=2, checkpoint_dir=tmp_path, **FAST)
    assert not [w for w in recwarn if "resuming from" in str(w.message)]


def test_trainable_as_one_name_prefix():
    """trainable="qkv" is one prefix (a str is iterable: it was split into the letters q, k, v)."""
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sc.distill(model, batch, steps=2, lr=1e-2, trainable="qkv", **FAST)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"qkv.weight", "qkv.bias"}
