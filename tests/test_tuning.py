"""The launch-settings logic of sparge_compile.kernels.tuning, with stand-in kernels (no GPU)."""
from __future__ import annotations

import types

import pytest
import triton

from sparge_compile.kernels import tuning


class FakeKernel:
    __name__ = "_fake_kernel"

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, args, kw))


class FakeTuner(FakeKernel):
    """Stands in for triton.autotune: 'times' the configs (w8 s3 fastest at 1.0 ms, the
    default w4 s2 at ``default_ms``) and keeps the fastest."""

    def __init__(self, default_ms=2.0):
        super().__init__()
        self.best_config = None
        self.default_ms = default_ms

    def __getitem__(self, grid):
        def run(*args, **kw):
            fast, default = triton.Config({}, num_warps=8, num_stages=3), triton.Config({}, num_warps=4,
                                                                                        num_stages=2)
            self.configs_timings = {fast: [1.0, 0.9, 1.1], default: [self.default_ms, 0.0, 9.0]}
            self.best_config = fast
            self.launches.append((grid, args, kw))
        return run


SMS = 3  # stand-in GPU's SM count: grids of >= 48 programs are tuned
BIG = (tuning.MIN_TUNE_PER_SM * SMS, 1)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_PICKED", {})
    monkeypatch.setattr(tuning, "_sm_count", lambda device: SMS)
    return FakeKernel(), FakeTuner()


def tensor(is_cuda=True, dtype="bf16", device="cuda:0"):
    return types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype, device=device)


def test_first_launch_tunes_later_launches_reuse_the_pick(fresh):
    kernel, tuner = fresh
    meta = dict(BLOCK_M=128, BLOCK_D=64)
    tuning.launch(kernel, tuner, BIG, tensor(), (1, 2), meta)
    assert len(tuner.launches) == 1 and kernel.launches == []
    for grid in ((80, 1), (16, 2)):  # other sequence lengths: same key, no re-tuning
        tuning.launch(kernel, tuner, grid, tensor(), (1, 2), meta)
    assert len(tuner.launches) == 1
    assert [k for _, _, k in kernel.launches] == [dict(meta, num_warps=8, num_stages=3)] * 2
    assert tuning.best_configs() == {"_fake_kernel": {"BLOCK_M=128, BLOCK_D=64, bf16": "w8 s3"}}


def test_new_key_tunes_again(fresh):
    kernel, tuner = fresh
    tuning.launch(kernel, tuner, BIG, tensor(), (), dict(BLOCK_D=64))
    tuning.launch(kernel, tuner, BIG, tensor(), (), dict(BLOCK_D=128))
    tuning.launch(kernel, tuner, BIG, tensor(dtype="fp16"), (), dict(BLOCK_D=128))
    assert len(tuner.launches) == 3 and kernel.launches == []


def test_small_grids_use_the_fixed_settings_and_leave_the_key_untuned(fresh):
    """A launch-bound first call (here 47 programs on 3 SMs) must not decide the large
    shapes' settings: it runs the fixed defaults, and the first large grid tunes."""
    kernel, tuner = fresh
    meta = dict(BLOCK_D=64)
    tuning.launch(kernel, tuner, (BIG[0] - 1, 1), tensor(), (), meta, fixed=(4, 2))
    assert tuner.launches == [] and tuning.best_configs() == {}
    assert kernel.launches[0][2] == dict(meta, num_warps=4, num_stages=2)
    tuning.launch(kernel, tuner, (2, BIG[0] // 2), tensor(), (), meta, fixed=(4, 2))
    assert len(tuner.launches) == 1
    assert tuning.best_configs() == {"_fake_kernel": {"BLOCK_D=64, bf16": "w8 s3"}}
    tuning.launch(kernel, tuner, (1, 1), tensor(), (), meta, fixed=(4, 2))  # small, after the pick
    assert kernel.launches[-1][2] == dict(meta, num_warps=8, num_stages=3)


@pytest.mark.parametrize("case", ["explicit", "cpu", "off"])
def test_fixed_settings_without_autotune(fresh, monkeypatch, case):
    kernel, tuner = fresh
    warps, stages, x = (8, None, tensor()) if case == "explicit" else (None, None,
                                                                       tensor(is_cuda=case != "cpu"))
    if case == "off":
        monkeypatch.setattr(tuning, "AUTOTUNE", False)
    tuning.launch(kernel, tuner, (1,), x, (), dict(BLOCK_D=64), warps, stages, fixed=(4, 2))
    assert tuner.launches == []
    assert kernel.launches[0][2] == dict(BLOCK_D=64, num_warps=warps or 4, num_stages=2)


@pytest.mark.parametrize("default_ms, picked", [(1.04, "w4 s2"), (1.2, "w8 s3")])
def test_near_tie_keeps_the_fixed_default(fresh, default_ms, picked):
    """The tuner times one call's mask; a config only replaces the fixed default when it is
    more than TIE faster."""
    kernel, _ = fresh
    tuner = FakeTuner(default_ms)
    tuning.launch(kernel, tuner, BIG, tensor(), (), dict(BLOCK_D=64), fixed=(4, 2))
    assert tuning.best_configs() == {"_fake_kernel": {"BLOCK_D=64, bf16": picked}}
