"""distill(): fine-tune the sparse student against the frozen dense teacher (DESIGN.md section 1).

    import sparge_compile as sc
    inputs = sc.flow_matching_inputs(latents, cond, batch_size=4)    # or any callable / iterable
    result = sc.distill(dit, inputs, steps=500, lr=1e-5, config=cfg, checkpoint_dir="ckpt")
    student, losses = result                                          # or result.student, result.losses

The teacher is a frozen deep copy of ``model`` taken before training (eval mode, no gradients,
never compiled with sparge; a ``torch.compile``-d model is unwrapped to its original module
first). The student is ``model`` itself (``inplace=True``, the default) or
a deep copy of it, compiled with the sparge backend so every attention runs block-sparse. Each
step runs both on the same batch and minimises the mean squared difference of their outputs
(paper: AdamW, lr 1e-5, 500 steps, full-parameter).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SpargeConfig
from .validate import check_distill_args

__all__ = ["CHECKPOINT_NAME", "DistillError", "DistillResult", "DistillStep", "NonFiniteLossError",
           "distill", "load_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "distill_latest.pt"
_PREV_CHECKPOINT_NAME = "distill_prev.pt"   # the checkpoint before the latest, kept on every save
_CHECKPOINT_VERSION = 1
_SPARSE_OP_PREFIX = "sparge::block_sparse_attention"


class DistillError(RuntimeError):
    """distill() cannot go on: bad model, bad inputs, or nothing for the sparse backend to rewrite."""


class NonFiniteLossError(DistillError, FloatingPointError):
    """The distillation loss or its gradients became NaN or infinite; no update was applied for that
    step and no checkpoint was written after it."""


@dataclass
class DistillStep:
    """What ``callback`` receives after every optimizer step. Return True from it to stop early."""

    step: int                 # optimizer steps done so far (1 after the first)
    steps: int                # the requested total
    loss: float               # this step's loss (mean over the grad_accum micro-batches)
    lr: float
    student: Callable
    teacher: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class DistillResult:
    """What :func:`distill` returns. Unpacks as ``student, losses = result``.

    student: the trained student, compiled with the sparge backend (call it like the model).
    module: the plain ``nn.Module`` holding the trained weights (``model`` itself when inplace).
    teacher: the frozen dense teacher.
    losses: one float per optimizer step, from step 1 (resumed runs include the earlier steps).
    step: optimizer steps done. checkpoint_path: the last checkpoint written (or None).
    interrupted: Ctrl-C stopped the run (only with ``on_interrupt="return"``).
    stopped_early: the callback asked to stop.
    """

    student: Callable
    module: nn.Module
    teacher: nn.Module
    losses: list[float]
    step: int
    checkpoint_path: str | None = None
    interrupted: bool = False
    stopped_early: bool = False
    config: SpargeConfig | None = field(default=None, repr=False)

    def __iter__(self):
        yield self.student
        yield self.losses


# --------------------------------------------------------------------------------------------
# Building the student


def _default_inner(module: nn.Module) -> str:
    dev = _module_device(module)
    return "inductor" if dev is not None and dev.type == "cuda" else "aot_eager"


def make_student(module: nn.Module, config: SpargeConfig, inner: str | None = None):
    """``torch.compile(module, backend=sparge_compile.backend(config=config, inner=inner))``.

    inner: what compiles the rewritten graph: "inductor" (default on CUDA), "aot_eager"
    (default on the CPU) or "eager". Returns ``(student, backend)``; ``backend.report()``
    lists every attention site, rewritten or kept dense and why.
    """
    from .compiler import backend as make_backend

    be = make_backend(config=config, inner=inner or _default_inner(module))
    return torch.compile(module, backend=be), be


# --------------------------------------------------------------------------------------------
# Small helpers


def _module_device(m: nn.Module) -> torch.device | None:
    for p in m.parameters():
        return p.device
    for b in m.buffers():
        return b.device
    return None


def _to_device(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True) if x.device != device else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_to_device(v, device) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _to_device(v, device)) for k, v in x.items())
    return x


def _call_args(batch: Any) -> tuple[tuple, dict]:
    """A batch -> (args, kwargs): tuple/list -> model(*batch), dict -> model(**batch), else model(batch)."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _describe(batch: Any) -> str:
    def one(x):
        if isinstance(x, Tensor):
            return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"
        if isinstance(x, (tuple, list)):
            return "(" + ", ".join(one(v) for v in x) + ")"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in x.items()) + "}"
        return type(x).__name__
    return one(batch)


def _tensor_leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # diffusers / transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensor_leaves(v)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensor_leaves(v)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _tensor_leaves(getattr(out, f.name))]
    return []


def _loss_fn(loss: str | Callable) -> Callable[[Any, Any], Tensor]:
    if callable(loss):
        return loss
    fns = {"mse": F.mse_loss, "l1": F.l1_loss}
    if loss not in fns:
        raise ValueError(f"loss must be 'mse', 'l1' or a callable(student_out, teacher_out), got {loss!r}")
    elem = fns[loss]

    def fn(s_out, t_out):
        s, t = _tensor_leaves(s_out), _tensor_leaves(t_out)
        if not s or len(s) != len(t):
            raise DistillError(f"the model's outputs must be tensors (or tuples/dicts of them) with the same "
                               f"structure for student and teacher; got {len(s)} vs {len(t)} tensors")
        terms = [elem(a.float(), b.float()) for a, b in zip(s, t) if a.is_floating_point()]
        return sum(terms) / len(terms)
    return fn


def _select_params(module: nn.Module, trainable) -> list[nn.Parameter]:
    named = list(module.named_parameters())
    if trainable is None:
        chosen = [p for _, p in named if p.requires_grad]
    elif callable(trainable):
        chosen = [p for n, p in named if trainable(n, p)]
    else:
        items = list(trainable)
        if items and all(isinstance(x, str) for x in items):
            chosen = [p for n, p in named if any(n == s or n.startswith(s + ".") for s in items)]
        elif all(isinstance(x, nn.Parameter) for x in items):
            ids = {id(p) for p in items}
            chosen = [p for _, p in named if id(p) in ids]
        else:
            raise TypeError("trainable must be None, a callable(name, param) -> bool, parameter-name "
                            "prefixes, or parameters of the model")
    if not chosen:
        raise DistillError("distill: no trainable parameters selected (check `trainable` and requires_grad)")
    keep = {id(p) for p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    return chosen


def _make_optimizer(optimizer, params, lr) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.AdamW(params, lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("optimizer factory must return a torch.optim.Optimizer")
        return opt
    raise TypeError("optimizer must be None, a torch.optim.Optimizer or a callable(params) -> Optimizer")


# --------------------------------------------------------------------------------------------
# RNG state and checkpoints


def _get_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    return state


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % 2**32)


def save_checkpoint_atomic(state: dict, path: str | os.PathLike,
                           keep_previous: str | os.PathLike | None = None) -> Path:
    """torch.save ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then
    os.replace. A crash at any point leaves either the old file or the new one, never a torn one.

    keep_previous: a path in the same folder; once the new file is written, the old ``path``
    (if any) becomes this file (a hard link, so no copy and no moment without ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            _keep_copy(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def _keep_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically: a hard link (free), or a real copy where the file
    system has none, made under a temp name and renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _clean_stale_temps(directory: Path) -> None:
    """Temp files left by a process killed mid-save (never read; removed on the next run)."""
    for name in (CHECKPOINT_NAME, _PREV_CHECKPOINT_NAME):
        for p in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a distill checkpoint (a dict: version, step, student, optimizer, rng, losses, ...).

    Raises :class:`DistillError` naming the file when it is empty, truncated or corrupt (a
    checkpoint distill() wrote always loads with ``weights_only=True``); OSError (a missing or
    unreadable file) passes through."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:
        size = os.path.getsize(path)
        what = "is empty" if size == 0 else f"is truncated or corrupt ({size} bytes)"
        raise DistillError(f"checkpoint {path} {what}: torch.load failed with {type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
        raise DistillError(f"{path} is not a sparge_compile.distill checkpoint (version {_CHECKPOINT_VERSION})")
    return state


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until the block ends (optimizer step + bookkeeping + checkpoint stay whole)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: got.append(sig))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------
# Inputs


class _Batches:
    """Batch i (micro-batch index) from a callable(i), or the i-th item of an iterable.

    An iterable is read in order; when it runs out it is iterated again (epochs) if it can be
    (a list, a DataLoader), else it is an error. Resuming skips the batches already used.
    """

    def __init__(self, inputs, start: int):
        self.callable = callable(inputs) and not isinstance(inputs, (Tensor, nn.Module))
        if isinstance(inputs, nn.Module):
            raise TypeError("inputs must be a callable(step) -> batch or an iterable of batches, not a module")
        if not self.callable:
            if isinstance(inputs, (Tensor, dict)) or not isinstance(inputs, Iterable):
                raise TypeError("inputs must be a callable(step) -> batch or an iterable of batches; "
                                f"got {type(inputs).__name__} (wrap a single batch as [batch])")
            self.source = inputs
            self.reiterable = iter(inputs) is not inputs
            self.it = iter(inputs)
            self.pos = 0
            for _ in range(start):
                self._next()
        self.inputs = inputs

    def _next(self):
        try:
            item = next(self.it)
        except StopIteration:
            if not self.reiterable or self.pos == 0:
                raise DistillError(f"inputs ran out after {self.pos} batches; pass a re-iterable (a list, a "
                                   "DataLoader) or a callable(step) -> batch") from None
            self.it = iter(self.source)
            item = next(self.it)
        self.pos += 1
        return item

    def get(self, i: int):
        if self.callable:
            return self.inputs(i)
        return self._next()


# --------------------------------------------------------------------------------------------
# The check that the backend rewrote something


def _sparse_ops_ran(fn: Callable[[], Any]) -> tuple[Any, bool]:
    """Run fn under the profiler; True when a sparge sparse-attention op executed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(_SPARSE_OP_PREFIX in e.name for e in prof.events())


# --------------------------------------------------------------------------------------------
# The model, resuming, the update


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module under ``torch.compile``'s wrapper(s): a model compiled with the sparge
    backend is sparse, and would make a sparse teacher (and compile the student twice)."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        logger.info("distill: model is a torch.compile wrapper; distilling its original module")
        model = model._orig_mod
    return model


def _resume(ckpt_path: Path, module: nn.Module, opt, scaler, config: SpargeConfig, settings: dict):
    """Load ``ckpt_path`` into module/opt/scaler; returns (step, losses, rng state). Warns when the
    checkpoint was written with another config or other ``settings`` (grad_accum, seed)."""
    try:
        state = load_checkpoint(ckpt_path, map_location="cpu")
    except DistillError as e:
        raise _damaged_checkpoint_error(ckpt_path, e) from e
    module.load_state_dict(state["student"])
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    start = int(state["step"])
    if state.get("config") not in (None, dataclasses.asdict(config)):
        warnings.warn(f"resuming from {ckpt_path} written with config {state['config']}, "
                      f"now {dataclasses.asdict(config)}", stacklevel=3)
    for name, now in settings.items():
        if name in state and state[name] != now:
            old = state[name]
            why = (f"this run skips {start} x {now} micro-batches of `inputs` (the checkpoint used {start} x "
                   f"{old}) and accumulates {now} per step, so it matches an uninterrupted run with neither "
                   "setting" if name == "grad_accum" else
                   "the checkpoint's RNG state is restored, so the run continues the old seed's random stream; "
                   "the new seed reaches only what draws before that (a shuffled DataLoader's order), "
                   "which breaks an exact resume")
            warnings.warn(f"resuming from {ckpt_path} written with {name}={old}, now {name}={now}: {why}",
                          stacklevel=3)
    logger.info("distill: resumed from %s at step %d", ckpt_path, start)
    return start, list(state["losses"]), state["rng"]


def _damaged_checkpoint_error(ckpt_path: Path, err: DistillError) -> DistillError:
    """The error for an unreadable latest checkpoint: which file, and the ways out (never a silent
    fall-back to the previous checkpoint, which would quietly drop the steps after it)."""
    prev = ckpt_path.parent / _PREV_CHECKPOINT_NAME
    if not prev.exists():
        keep = f"There is no previous checkpoint ({prev})."
    else:
        try:
            prev_step = load_checkpoint(prev, map_location="cpu")["step"]
            keep = (f"The previous checkpoint {prev} (step {prev_step}) is intact: move it over {ckpt_path} "
                    f"(mv {prev} {ckpt_path}) to resume from step {prev_step}.")
        except (DistillError, OSError) as e2:
            keep = f"The previous checkpoint {prev} cannot be read either ({e2})."
    return DistillError(f"distill: cannot resume: {err}. {keep} To start over instead, delete {ckpt_path} "
                        "or pass resume=False (the next checkpoint overwrites it).")


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The total 2-norm of the parameters' gradients (what clip_grad_norm_ computes)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _nonfinite_grads_error(module: nn.Module, params, norm: float, step: int, last_saved, last_saved_step):
    ids = {id(p) for p in params}
    bad = [n for n, p in module.named_parameters()
           if id(p) in ids and p.grad is not None and not torch.isfinite(p.grad).all()]
    names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    where = (f"the last good checkpoint is {last_saved} (step {last_saved_step})" if last_saved
             else "no checkpoint was written")
    return NonFiniteLossError(
        f"distill: the gradients are non-finite (total grad norm {norm}) at step {step + 1} although the loss "
        f"is finite, in {names or 'no parameter found'}; stopped before updating the weights; {where}. "
        "Look for an op whose backward overflows (try amp_dtype=torch.bfloat16 instead of float16, or a "
        "lower lr).")


def _apply_update(opt, scaler, params, max_grad_norm: float | None, norm: Tensor | None) -> None:
    """Clip (to max_grad_norm, using the total norm already computed) and step the optimizer."""
    if scaler is not None:   # fp16: the GradScaler itself skips steps with inf/NaN gradients
        if max_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(opt)
        scaler.update()
        return
    if max_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    opt.step()


# --------------------------------------------------------------------------------------------
# distill


def distill(model: nn.Module, inputs, *, steps: int, lr: float = 1e-5, config: SpargeConfig | None = None,
            optimizer=None, loss: str | Callable = "mse", trainable=None, grad_accum: int = 1,
            amp_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
            checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100,
            resume: bool = True, log_every: int = 10, progress: bool = True,
            callback: Callable[[DistillStep], Any] | None = None, seed: int | None = 0,
            backend_inner: str | None = None, compile_fn: Callable[[nn.Module, SpargeConfig], Callable] | None = None,
            teacher: nn.Module | None = None, inplace: bool = True, train_mode: bool = False,
            check_rewrite: bool = True, on_interrupt: str = "raise") -> DistillResult:
    """Distil the sparse student (``model`` compiled with the sparge backend) against the dense teacher.

    model: the dense model; it becomes the student and is trained in place (``inplace=False``
        trains a deep copy and leaves ``model`` alone). A ``torch.compile``-d model (with
        ``backend="sparge"`` or any other) is unwrapped first: the teacher copies its original
        dense module, and ``inplace=True`` trains that module, so the compiled wrapper sees the
        trained weights too.
    inputs: where batches come from, either a callable ``inputs(i) -> batch`` (``i`` counts
        micro-batches, ``i = step * grad_accum + micro``; deterministic per ``i`` gives exact
        resumes, e.g. :func:`flow_matching_inputs`) or an iterable of batches (re-iterated
        for more epochs; on resume the used batches are skipped, so it must yield the same
        sequence each time). A batch is called as ``model(*batch)`` for a tuple/list,
        ``model(**batch)`` for a dict, ``model(batch)`` otherwise; its tensors are moved to the
        model's device.
    steps: optimizer steps in all (a resumed run counts the checkpoint's steps).
    lr: AdamW learning rate (the paper: 1e-5), used when ``optimizer`` is None.
    config: the SpargeConfig of the sparse attention (default SpargeConfig()).
    optimizer: None (AdamW), a torch.optim.Optimizer over the model's parameters, or a
        callable(params) -> Optimizer.
    loss: "mse" (default: mean squared difference of every output tensor), "l1", or a
        callable(student_out, teacher_out) -> scalar tensor.
    trainable: None (every parameter with requires_grad), a callable(name, param) -> bool,
        names / name prefixes ("blocks.0.attn"), or the parameters themselves; the rest frozen.
    grad_accum: micro-batches per optimizer step (the loss is their mean).
    amp_dtype: run both models under torch.autocast with this dtype (bf16; fp16 adds a GradScaler).
    max_grad_norm: clip the gradient norm to this before each step (None: no clipping). Either
        way, non-finite gradients (a NaN/inf total norm) stop the run before the step (see Raises);
        with fp16's GradScaler, which skips such steps itself, they do not.
    checkpoint_dir: where ``distill_latest.pt`` goes, written atomically every
        ``checkpoint_every`` steps, at the end, on Ctrl-C; it holds the student's weights, the
        optimizer (and GradScaler) state, the step, the RNG states and the loss history. Each
        save keeps the checkpoint before it as ``distill_prev.pt`` (a hard link where the file
        system allows, else a copy; room for two checkpoints plus the one being written).
    resume: continue from ``checkpoint_dir``'s checkpoint when there is one; with the same
        seed, inputs and settings the loss curve and final weights equal an uninterrupted run's
        (a changed config, ``grad_accum`` or ``seed`` warns). An empty, truncated or corrupt
        ``distill_latest.pt`` raises :class:`DistillError` naming it and the ways out (delete it,
        ``resume=False``, or move ``distill_prev.pt`` over it, whose step the message gives);
        distill() never falls back to the previous checkpoint by itself.
    log_every: log the loss every this many steps (logger ``sparge_compile.distill``).
    progress: show a tqdm bar with the loss.
    callback: called after every step with a :class:`DistillStep`; return True to stop early.
    seed: seeds torch, python and numpy RNGs at the start (None: leave them alone).
    backend_inner: what compiles the rewritten graph: "inductor" (default on CUDA) or "aot_eager".
    compile_fn: build the student yourself: compile_fn(module, config) -> callable, or ->
        ``(student, backend)`` like :func:`make_student` (e.g. to reuse a student compiled
        before); without the backend, ``check_rewrite`` watches the sparse op run instead.
    teacher: use this frozen model as the teacher instead of a deep copy of ``model`` (saves a
        copy when distilling several students from one model); it is set to eval, no grad.
    train_mode: run the student in train() mode (dropout active). Default eval(), so the
        student matches the teacher's deterministic function and attention dropout does not
        keep attention dense.
    check_rewrite: fail at the first step when no sparse attention ran in the student.
    on_interrupt: on Ctrl-C, after saving a checkpoint: "raise" (default) re-raises
        KeyboardInterrupt so the program stops; "return" returns the result with
        ``interrupted=True``.

    Returns a :class:`DistillResult` (``student, losses = result`` unpacks it).
    Raises :class:`DistillError` for bad inputs or a model with no attention to sparsify,
    :class:`NonFiniteLossError` when the loss or the gradients are NaN/inf: no optimizer step and no
    checkpoint for that step, so the weights and the last checkpoint stay finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap_compiled(model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    check_distill_args(lr=lr, grad_accum=grad_accum, checkpoint_every=checkpoint_every, log_every=log_every,
                       max_grad_norm=max_grad_norm, amp_dtype=amp_dtype, seed=seed, trainable=trainable,
                       teacher=teacher, checkpoint_dir=checkpoint_dir, callback=callback,
                       compile_fn=compile_fn,
                       flags={"resume": resume, "progress": progress, "inplace": inplace,
                              "train_mode": train_mode, "check_rewrite": check_rewrite})
    if on_interrupt not in ("raise", "return"):
        raise ValueError(f"on_interrupt must be 'raise' or 'return', got {on_interrupt!r}")
    if config is None:
        config = SpargeConfig()
    elif not isinstance(config, SpargeConfig):
        raise TypeError(f"config must be a SpargeConfig, got {type(config).__name__}")
    loss_fn = _loss_fn(loss)

    if seed is not None:
        _seed_all(seed)

    # Teacher: frozen dense copy, taken before any training.
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    module = model if inplace else copy.deepcopy(model)
    module.train(train_mode)
    device = _module_device(module)
    params = _select_params(module, trainable)
    opt = _make_optimizer(optimizer, params, lr)
    scaler = None
    if amp_dtype == torch.float16 and device is not None and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) \
        if amp_dtype is not None and device is not None else contextlib.nullcontext

    # Resume.
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, losses, rng_state = 0, [], None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(ckpt_path.parent)
        if resume and ckpt_path.exists():
            start, losses, rng_state = _resume(ckpt_path, module, opt, scaler, config,
                                               {"grad_accum": grad_accum, "seed": seed})
    last_saved: str | None = str(ckpt_path) if ckpt_path is not None and ckpt_path.exists() else None
    last_saved_step = start if last_saved else None

    batches = _Batches(inputs, start * grad_accum)
    if rng_state is not None:  # after skipping used batches, so they cannot disturb it
        _set_rng(rng_state)

    if compile_fn is not None:
        student, backend_obj = compile_fn(module, config), None
        if isinstance(student, tuple) and len(student) == 2 and hasattr(student[1], "report"):
            student, backend_obj = student   # (student, its SpargeBackend), as make_student returns
    else:
        student, backend_obj = make_student(module, config, backend_inner)
    result = DistillResult(student=student, module=module, teacher=teacher, losses=losses, step=start,
                           checkpoint_path=last_saved, config=config)

    def save(step: int, rng: dict) -> None:
        nonlocal last_saved, last_saved_step
        if ckpt_path is None:
            return
        state = {"version": _CHECKPOINT_VERSION, "step": step, "student": module.state_dict(),
                 "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                 "rng": rng, "losses": list(losses), "config": dataclasses.asdict(config),
                 "seed": seed, "grad_accum": grad_accum}
        save_checkpoint_atomic(state, ckpt_path, keep_previous=ckpt_path.parent / _PREV_CHECKPOINT_NAME)
        last_saved, last_saved_step = str(ckpt_path), step
        result.checkpoint_path = last_saved
        logger.debug("distill: checkpoint at step %d -> %s", step, ckpt_path)

    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=steps, initial=min(start, steps), desc="distill", dynamic_ncols=True,
                    disable=None)
    step = start
    first = True
    t0 = time.perf_counter()
    rng_at_step = _get_rng()
    try:
        while step < steps:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(grad_accum):
                i = step * grad_accum + micro
                batch = batches.get(i)
                value = _micro_step(batch, i, step, micro, first, teacher, student, loss_fn, autocast,
                                    scaler, device, grad_accum, check_rewrite and first, backend_obj,
                                    last_saved, last_saved_step)
                first = False
                step_loss += value / grad_accum
            norm = _grad_norm(params) if scaler is None else None
            if norm is not None and not math.isfinite(float(norm)):
                err = _nonfinite_grads_error(module, params, float(norm), step, last_saved, last_saved_step)
                opt.zero_grad(set_to_none=True)
                raise err
            with _sigint_deferred():
                _apply_update(opt, scaler, params, max_grad_norm, norm)
                step += 1
                losses.append(step_loss)
                result.step = step
                rng_at_step = _get_rng()  # what a resume from this step must restore
                if step % checkpoint_every == 0 or step == steps:
                    save(step, rng_at_step)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{step_loss:.3e}")
            if step % log_every == 0 or step == steps:
                dt = (time.perf_counter() - t0) / max(step - start, 1)
                logger.info("distill: step %d/%d loss %.4e (%.3f s/step)", step, steps, step_loss, dt)
            if callback is not None:
                info = DistillStep(step=step, steps=steps, loss=step_loss, lr=opt.param_groups[0]["lr"],
                                   student=student, teacher=teacher, optimizer=opt)
                if callback(info) is True:
                    result.stopped_early = True
                    if last_saved_step != step:
                        save(step, _get_rng())
                    logger.info("distill: callback stopped the run at step %d", step)
                    break
    except KeyboardInterrupt:
        # An interrupted step applied no update: save the state after the last whole step.
        opt.zero_grad(set_to_none=True)
        with _sigint_deferred():
            if last_saved_step != step:
                save(step, rng_at_step)
        result.interrupted = True
        msg = (f"distill: interrupted at step {step}/{steps}"
               + (f"; checkpoint {last_saved} (step {last_saved_step}); run again with resume=True "
                  "to continue" if last_saved else "; no checkpoint_dir, nothing saved"))
        logger.warning(msg)
        if on_interrupt == "raise":
            raise
        return result
    finally:
        if pbar is not None:
            pbar.close()
    if start >= steps and ckpt_path is not None and last_saved is None:
        save(step, _get_rng())
    return result


def _micro_step(batch, i, step, micro, first, teacher, student, loss_fn, autocast, scaler, device,
                grad_accum, check_rewrite, backend_obj, last_saved, last_saved_step) -> float:
    args, kwargs = _call_args(_to_device(batch, device))
    with torch.no_grad(), autocast():
        try:
            t_out = teacher(*args, **kwargs)
        except Exception as e:
            if not first:
                raise
            raise DistillError(f"distill: the model rejected the first batch from `inputs` (batch {i}: "
                               f"{_describe(batch)}; called as model(*batch) for a tuple/list, "
                               f"model(**batch) for a dict, model(batch) otherwise): "
                               f"{type(e).__name__}: {e}") from e

    def run():
        with autocast():
            s_out = student(*args, **kwargs)
            return loss_fn(s_out, t_out) / grad_accum

    if first:
        try:
            if check_rewrite and backend_obj is None:   # a custom compile_fn: watch the ops run
                loss, ran = _sparse_ops_ran(run)
            else:
                loss = run()
        except DistillError:
            raise
        except Exception as e:
            raise DistillError(f"distill: the sparse student failed on the first batch ({_describe(batch)}) "
                               f"although the dense teacher ran it: {type(e).__name__}: {e}") from e
        if check_rewrite:
            report = backend_obj.report() if backend_obj is not None else None
            if report is not None:
                ran = bool(report.rewritten)
            if not ran:
                why = (f"\n{report}" if report is not None and len(report)
                       else " The backend found no attention site at all." if report is not None else "")
                raise DistillError(
                    "distill: no attention in the student was rewritten to sparse attention, so there is "
                    "nothing to distil. The sparge backend rewrites plain softmax(QK^T)V and "
                    "F.scaled_dot_product_attention without attn_mask or dropout, with at least "
                    f"config.min_seq_len keys.{why}\nPass check_rewrite=False to train anyway.")
    else:
        loss = run()
    value = float(loss.detach()) * grad_accum
    if not math.isfinite(value):
        where = (f"the last good checkpoint is {last_saved} (step {last_saved_step})" if last_saved
                 else "no checkpoint was written")
        raise NonFiniteLossError(
            f"distill: the loss is {value} at step {step + 1} (micro-batch {micro}, input batch {i}); stopped "
            f"before updating the weights; {where}. Try a lower lr, max_grad_norm=1.0, or amp_dtype=torch.bfloat16 "
            "instead of float16.")
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    return value
