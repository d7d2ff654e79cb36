"""The configs: SpargeConfig (the sparse attention), DistillConfig (distill()'s training
settings) and CalibrateConfig (calibrate()'s objective and search). Frozen dataclasses, validated
on construction; every error names the field."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .validate import (
    HEAD_DIMS_SUPPORTED,
    PRECISIONS,
    _is_pow2,
    check_flag,
    check_int,
    check_precision,
    head_dim_ok,
    is_int,
    is_real,
)

__all__ = ["GRID_TOPK", "GRID_TOPP", "HEAD_DIMS_SUPPORTED", "MODES", "PRECISIONS", "CalibrateConfig",
           "DistillConfig", "SpargeConfig", "head_dim_ok",
           "settings_from_arguments"]   # head dims and precisions: from validate

MODES = ("hybrid", "topk", "topp")


class _Replace:
    def replace(self, **changes):
        """A copy with some fields changed (validated); unknown names raise TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s) {unknown}; "
                            f"valid fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)


def _type_error(field: str, what: str, got) -> TypeError:
    return TypeError(f"{field} must be {what}, got {type(got).__name__} {got!r}")


def _check_number(field: str, x, *, optional: bool = False, low: float = 0.0, low_open: bool = False):
    """A finite real >= low (> low with low_open); None passes when optional."""
    if x is None and optional:
        return None
    if not is_real(x):
        raise _type_error(field, "a number" + (" (or None)" if optional else ""), x)
    if not math.isfinite(x) or x < low or (low_open and x == low):
        raise ValueError(f"{field} must be a finite number {'>' if low_open else '>='} {low:g}, got {x}")
    return float(x)


@dataclass(frozen=True)
class SpargeConfig(_Replace):
    """Configuration of the sparse attention (frozen, validated on construction).

    topk:  fraction of the visible key blocks every query block keeps (Top-k rule), in [0, 1].
    topp:  cumulative block-probability mass every query block keeps (Top-p rule), in [0, 1].
    mode:  "hybrid" (union of both rules, the default), "topk" or "topp" (one rule alone).
    block_q, block_k: tokens per query block / key block (powers of two in [16, 256]).
    min_seq_len: attention with fewer keys than this stays dense in the compiler backend.
    theta: SpargeAttn's self-similarity judge, None (off) or a threshold in [-1, 1]: a query or
           key block whose tokens' mean pairwise cosine similarity is below theta is badly
           summarised by its mean, so it is never dropped (its row / column is kept whole).
    precision: the forward's arithmetic: "bf16" (q's own dtype, the default), "fp8" (FP8 e4m3
           Q·Kᵀ and P·V) or "int8" (INT8 Q·Kᵀ, P·V in q's dtype); K smoothed, per-block scales
           (kernels/quant.py). The backward is the bf16 gradient of the same masked attention
           either way (quantization-aware training).
    pv_threshold: SpargeAttn's in-kernel P·V filter, None (off) or λ > 0: walking a query
           block's kept key blocks, one is skipped (no exp, no P·V) when every row's largest
           scaled score in it is more than λ below the row's running max, so each skipped
           weight is below e^-λ of the row's largest (reference.pv_filter_blocks). The backward
           is the gradient of attention on the predicted mask (skipped blocks' P < e^-λ
           included). Fixed when a graph is compiled; bf16 forward only.
    """

    topk: float = 0.03
    topp: float = 0.2
    block_q: int = 128
    block_k: int = 64
    mode: str = "hybrid"
    min_seq_len: int = 1024
    theta: float | None = None
    precision: str = "bf16"
    pv_threshold: float | None = None

    def __post_init__(self):
        check_precision("SpargeConfig.precision", self.precision)
        for name in ("topk", "topp"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"SpargeConfig.{name} must be a float, got {type(val).__name__}")
            if not (0.0 <= float(val) <= 1.0):
                raise ValueError(f"SpargeConfig.{name} must be in [0, 1], got {val}")
            object.__setattr__(self, name, float(val))
        if self.mode not in MODES:
            raise ValueError(f"SpargeConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"SpargeConfig.{name} must be an int, got {type(val).__name__}")
            if not (_is_pow2(val) and 16 <= val <= 256):
                raise ValueError(f"SpargeConfig.{name} must be a power of two in [16, 256], got {val}")
        if not is_int(self.min_seq_len) or self.min_seq_len < 0:
            raise ValueError(f"SpargeConfig.min_seq_len must be a non-negative int, got {self.min_seq_len!r}")
        if self.theta is not None:
            object.__setattr__(self, "theta", _check_theta(self.theta))
        lam = _check_number("SpargeConfig.pv_threshold", self.pv_threshold, optional=True, low_open=True)
        if lam is not None and self.precision != "bf16":
            raise ValueError("SpargeConfig.pv_threshold (the P·V filter) runs in the bf16 forward only, "
                             f"not with precision={self.precision!r}")
        object.__setattr__(self, "pv_threshold", lam)


def _check_theta(theta) -> float:
    if not is_real(theta):
        raise TypeError(f"SpargeConfig.theta must be None or a float, got {type(theta).__name__}")
    if not (-1.0 <= float(theta) <= 1.0):
        raise ValueError(f"SpargeConfig.theta must be None or in [-1, 1], got {theta}")
    return float(theta)


DEFAULT_CONFIG = SpargeConfig()


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DistillConfig(_Replace):
    """The training settings of :func:`sparge_compile.distill` (frozen, validated on construction).

    steps: optimizer steps in all (a resumed run counts the checkpoint's steps).
    lr: AdamW learning rate (the paper: 1e-5), used when distill() builds the optimizer.
    lr_schedule: "constant" (default) or "cosine": each param group's lr (its own, also for an
        optimizer you pass) times a factor of the step alone, from 1 down to 0 at ``steps``
        (so a resumed run follows the same curve).
    warmup_steps: steps of linear warm-up from lr/warmup_steps to lr before the schedule (0: none).
    loss: "mse" (mean squared difference of every output tensor), "l1", or a
        callable(student_out, teacher_out) -> scalar tensor.
    grad_accum: micro-batches per optimizer step (the loss is their mean).
    amp_dtype: run both models under torch.autocast with this dtype (bf16; fp16 adds a GradScaler).
    max_grad_norm: clip the gradient norm to this before each step (None: no clipping). Either
        way, non-finite gradients (a NaN/inf total norm) stop the run before the step; with
        fp16's GradScaler, which skips such steps itself, they do not.
    checkpoint_dir: where ``distill_latest.pt`` goes, written atomically every
        ``checkpoint_every`` steps, at the end and on Ctrl-C: the student's weights, the optimizer
        (and GradScaler) state, the step, the RNG states and the loss history. Each save keeps the
        checkpoint before it as ``distill_prev.pt`` (a hard link where the file system allows,
        else a copy).
    resume: continue from ``checkpoint_dir``'s checkpoint when there is one; with the same seed,
        inputs and settings the loss curve and final weights equal an uninterrupted run's (a
        changed config, ``grad_accum`` or ``seed`` warns). An unreadable ``distill_latest.pt``
        raises DistillError naming it and the ways out; distill() never falls back to
        ``distill_prev.pt`` by itself.
    log_every: log the loss every this many steps (logger ``sparge_compile.distill``).
    progress: show a tqdm bar with the loss.
    seed: seeds torch, python and numpy RNGs at the start (None: leave them alone).
    backend_inner: what compiles the rewritten graph: "inductor" (default on CUDA), "aot_eager"
        (default on the CPU), "eager" or a backend callable.
    inplace: train ``model`` itself (False: a deep copy, ``model`` left alone).
    train_mode: run the student in train() mode (dropout active). Default eval(), so the student
        matches the teacher's deterministic function and attention dropout does not keep
        attention dense.
    check_rewrite: fail at the first step when no sparse attention ran in the student.
    on_interrupt: on Ctrl-C, after saving a checkpoint: "raise" re-raises KeyboardInterrupt;
        "return" returns the result with ``interrupted=True``.
    """

    steps: int
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    loss: str | Callable = "mse"
    grad_accum: int = 1
    amp_dtype: torch.dtype | None = None
    max_grad_norm: float | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 100
    resume: bool = True
    log_every: int = 10
    progress: bool = True
    seed: int | None = 0
    backend_inner: str | Callable | None = None
    inplace: bool = True
    train_mode: bool = False
    check_rewrite: bool = True
    on_interrupt: str = "raise"

    def __post_init__(self):
        own = "DistillConfig."
        check_int(own + "steps", self.steps, 0)
        object.__setattr__(self, "lr", _check_number(own + "lr", self.lr))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{own}lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        check_int(own + "warmup_steps", self.warmup_steps, 0)
        if not (callable(self.loss) or self.loss in ("mse", "l1")):
            raise ValueError(f"{own}loss must be 'mse', 'l1' or a callable(student_out, teacher_out), "
                             f"got {self.loss!r}")
        for name in ("grad_accum", "checkpoint_every", "log_every"):
            check_int(own + name, getattr(self, name), 1)
        if self.amp_dtype is not None and not (isinstance(self.amp_dtype, torch.dtype)
                                               and self.amp_dtype.is_floating_point):
            raise _type_error(own + "amp_dtype", "a floating torch.dtype (or None)", self.amp_dtype)
        _check_number(own + "max_grad_norm", self.max_grad_norm, optional=True, low_open=True)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise _type_error(own + "checkpoint_dir", "a path (or None)", self.checkpoint_dir)
        for name in ("resume", "progress", "inplace", "train_mode", "check_rewrite"):
            check_flag(own + name, getattr(self, name))
        if self.seed is not None and not is_int(self.seed):
            raise _type_error(own + "seed", "an int (or None)", self.seed)
        inner = self.backend_inner
        if inner is not None and not (isinstance(inner, str) or callable(inner)):
            raise _type_error(own + "backend_inner", "a backend name, a backend callable or None", inner)
        if self.on_interrupt not in ("raise", "return"):
            raise ValueError(f"{own}on_interrupt must be 'raise' or 'return', got {self.on_interrupt!r}")


# calibrate()'s default search grid. Top-k in steps of 0.25% up to 10% (where 90-99% sparsity
# lives), coarser above.
GRID_TOPK = tuple(sorted({0.0, *(round(0.0025 * i, 4) for i in range(1, 41)),
                          *(round(0.01 * i, 2) for i in range(11, 21)),
                          *(round(0.05 * i, 2) for i in range(5, 21))}))
GRID_TOPP = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def _grid(field: str, values) -> tuple:
    """A search axis: a non-empty iterable of numbers in [0, 1], sorted, duplicates dropped."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise _type_error(field, "an iterable of numbers in [0, 1]", values)
    values = list(values)
    bad = [x for x in values if not is_real(x)]
    if bad:
        raise TypeError(f"{field} must hold numbers in [0, 1], got an item of type "
                        f"{type(bad[0]).__name__}: {bad[0]!r}")
    if not values:
        raise ValueError(f"{field} must not be empty")
    out = [x for x in values if not (0.0 <= float(x) <= 1.0)]
    if out:
        raise ValueError(f"{field} must be numbers in [0, 1], got {out[0]}")
    return tuple(sorted({float(x) for x in values}))


@dataclass(frozen=True)
class CalibrateConfig(_Replace):
    """The objective and search settings of :func:`sparge_compile.calibrate` (frozen, validated).

    target_sparsity: reach this overall sparsity (kept block pairs over all calibrated sites)
        with the least mean attention-output error, in [0, 1); or
    max_error: the sparsest point per site whose relative L1 attention-output error (against
        dense, SpargeAttn's measure) stays within this bound on every calibration batch.
        Exactly one of the two.
    batches: how many input batches to use (default: all of a list; 4 from a callable).
    per_site: False gives one global (topk, topp) for all sites (the baseline).
    inner: what runs the capture graph ("eager": compiling it would only cost time).
    sample_blocks: query blocks per head whose rows give the predicted error (all if fewer; 0: all).
    topks, topps: the search grid (numbers in [0, 1]; stored sorted, without duplicates).
    max_rounds: at most this many check passes over the batches (0: no measurement).
    verbose: print the plan's table at the end.
    """

    target_sparsity: float | None = None
    max_error: float | None = None
    batches: int | None = None
    per_site: bool = True
    inner: str | Callable = "eager"
    sample_blocks: int = 16
    topks: tuple = GRID_TOPK
    topps: tuple = GRID_TOPP
    max_rounds: int = 6
    verbose: bool = False

    def __post_init__(self):
        own = "CalibrateConfig."
        for name in ("target_sparsity", "max_error"):
            x = getattr(self, name)
            if x is not None and not is_real(x):
                raise _type_error(own + name, "a number (or None)", x)
        if (self.target_sparsity is None) == (self.max_error is None):
            raise ValueError(f"give exactly one of {own}target_sparsity and {own}max_error")
        if self.target_sparsity is not None and not (0.0 <= float(self.target_sparsity) < 1.0):
            raise ValueError(f"{own}target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.max_error is not None and not (0.0 < float(self.max_error) < math.inf):
            raise ValueError(f"{own}max_error must be a finite number > 0, got {self.max_error}")
        if self.batches is not None:
            check_int(own + "batches", self.batches, 1)
        check_int(own + "sample_blocks", self.sample_blocks, 0)
        check_int(own + "max_rounds", self.max_rounds, 0)
        check_flag(own + "per_site", self.per_site)
        check_flag(own + "verbose", self.verbose)
        if not (isinstance(self.inner, str) or callable(self.inner)):
            raise _type_error(own + "inner", "a backend name or a compiler callable", self.inner)
        object.__setattr__(self, "topks", _grid(own + "topks", self.topks))
        object.__setattr__(self, "topps", _grid(own + "topps", self.topps))


def settings_from_arguments(cls, base, given: dict, arg: str):
    """The settings a call runs with: ``base`` (a ``cls`` passed as ``arg=``), or ``cls(**given)``
    built from the call's keyword arguments. With ``base``, every argument in ``given`` must be
    left at its default (a setting given in two places is a TypeError naming it)."""
    if base is None:
        return cls(**given)
    if not isinstance(base, cls):
        raise TypeError(f"{arg} must be a {cls.__name__}, got {type(base).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in given.items():
        default = defaults[name]
        if not (value is default or (type(value) is type(default) and value == default)):
            raise TypeError(f"{name}={value!r} given both as an argument and in {arg}; set it in one place "
                            f"({arg}.replace({name}=...))")
    return base
