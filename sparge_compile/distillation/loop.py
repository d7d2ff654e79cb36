"""distill()'s training loop: the state of one run, one optimizer step, logging and callbacks,
saving, and Ctrl-C."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batches import CALL_CONVENTION, BatchStream, call_args, describe, to_device
from ..config import DistillConfig, SpargeConfig
from .checkpoint import CHECKPOINT_VERSION, PREV_CHECKPOINT_NAME, get_rng, save_checkpoint_atomic
from .results import DistillError, DistillResult, DistillStep, NonFiniteLossError
from .student import check_rewritten, sparse_ops_ran

logger = logging.getLogger("sparge_compile.distill")


@dataclass
class Run:
    """One distill() run: what every step reads (settings, models, optimizer, batches) and the
    progress it updates (step, the last checkpoint written; the losses live in ``result``)."""

    settings: DistillConfig
    config: SpargeConfig
    module: nn.Module                 # holds the trained weights; ``student`` is it, compiled
    student: Callable
    backend: Any                      # the student's SpargeBackend, or None (a custom compile_fn)
    teacher: nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scaler: Any                       # a GradScaler (fp16 on CUDA) or None
    loss_fn: Callable
    batches: BatchStream
    device: torch.device | None
    result: DistillResult
    callback: Callable[[DistillStep], Any] | None = None
    ckpt_path: Path | None = None
    start: int = 0
    step: int = 0
    first: bool = True                # no micro-batch has run yet
    last_saved_step: int | None = None
    rng_at_step: dict | None = None   # the RNG state after the last whole step (what a resume restores)
    t0: float = 0.0
    pbar: Any = None

    def autocast(self):
        dtype = self.settings.amp_dtype
        if dtype is None or self.device is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def where_saved(self) -> str:
        saved = self.result.checkpoint_path
        return (f"the last good checkpoint is {saved} (step {self.last_saved_step})" if saved
                else "no checkpoint was written")


def train(run: Run) -> DistillResult:
    """Steps until ``settings.steps`` (or the callback stops it, or Ctrl-C)."""
    s = run.settings
    run.pbar = _progress_bar(run)
    run.step, run.t0, run.rng_at_step = run.start, time.perf_counter(), get_rng()
    try:
        while run.step < s.steps:
            if _after_step(run, _one_step(run)):
                break
    except KeyboardInterrupt:
        _interrupted(run)
        if s.on_interrupt == "raise":
            raise
        return run.result
    finally:
        if run.pbar is not None:
            run.pbar.close()
    if run.start >= s.steps and run.ckpt_path is not None and run.result.checkpoint_path is None:
        save(run, run.step, get_rng())
    return run.result


def _one_step(run: Run) -> float:
    """grad_accum micro-batches, then the optimizer step; returns the step's loss."""
    s, opt = run.settings, run.optimizer
    opt.zero_grad(set_to_none=True)
    step_loss = 0.0
    for micro in range(s.grad_accum):
        step_loss += _micro_step(run, micro) / s.grad_accum
    norm = _grad_norm(run.params) if run.scaler is None else None
    if norm is not None and not math.isfinite(float(norm)):
        err = _nonfinite_grads_error(run, float(norm))
        opt.zero_grad(set_to_none=True)
        raise err
    with _sigint_deferred():
        set_lr(opt, s, run.step)
        _apply_update(opt, run.scaler, run.params, s.max_grad_norm, norm)
        run.step += 1
        run.result.losses.append(step_loss)
        run.result.step = run.step
        run.rng_at_step = get_rng()
        if run.step % s.checkpoint_every == 0 or run.step == s.steps:
            save(run, run.step, run.rng_at_step)
    return step_loss


def _micro_step(run: Run, micro: int) -> float:
    """Teacher and student on one batch, backward of the loss; returns the loss (not divided)."""
    ga = run.settings.grad_accum
    i = run.step * ga + micro
    batch = run.batches.get(i)
    args, kwargs = call_args(to_device(batch, run.device, non_blocking=True))
    t_out = _teacher_output(run, batch, i, args, kwargs)
    loss = _student_loss(run, batch, t_out, args, kwargs)
    run.first = False
    value = float(loss.detach()) * ga
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"distill: the loss is {value} at step {run.step + 1} (micro-batch {micro}, input batch {i}); "
            f"stopped before updating the weights; {run.where_saved()}. Try a lower lr, max_grad_norm=1.0, "
            "or amp_dtype=torch.bfloat16 instead of float16.")
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()
    return value


def _teacher_output(run: Run, batch, i: int, args, kwargs):
    with torch.no_grad(), run.autocast():
        try:
            return run.teacher(*args, **kwargs)
        except Exception as e:
            if not run.first:
                raise
            raise DistillError(f"distill: the model rejected the first batch from `inputs` (batch {i}: "
                               f"{describe(batch)}; {CALL_CONVENTION}): {type(e).__name__}: {e}") from e


def _student_loss(run: Run, batch, t_out, args, kwargs):
    """The student's loss against the teacher's output, divided by grad_accum. On the first
    batch a failure names the batch and (check_rewrite) an all-dense student is an error."""
    def forward():
        with run.autocast():
            return run.loss_fn(run.student(*args, **kwargs), t_out) / run.settings.grad_accum

    if not run.first:
        return forward()
    check = run.settings.check_rewrite
    try:
        if check and run.backend is None:   # a custom compile_fn: watch the ops run
            loss, ran = sparse_ops_ran(forward)
        else:
            loss, ran = forward(), None
    except DistillError:
        raise
    except Exception as e:
        raise DistillError(f"distill: the sparse student failed on the first batch ({describe(batch)}) "
                           f"although the dense teacher ran it: {type(e).__name__}: {e}") from e
    if check:
        check_rewritten(run.backend, ran)
    return loss


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The total 2-norm of the parameters' gradients (what clip_grad_norm_ computes)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _nonfinite_grads_error(run: Run, norm: float) -> NonFiniteLossError:
    ids = {id(p) for p in run.params}
    bad = [n for n, p in run.module.named_parameters()
           if id(p) in ids and p.grad is not None and not torch.isfinite(p.grad).all()]
    names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return NonFiniteLossError(
        f"distill: the gradients are non-finite (total grad norm {norm}) at step {run.step + 1} although the "
        f"loss is finite, in {names or 'no parameter found'}; stopped before updating the weights; "
        f"{run.where_saved()}. Look for an op whose backward overflows (try amp_dtype=torch.bfloat16 "
        "instead of float16, or a lower lr).")


def lr_factor(s: DistillConfig, step: int) -> float:
    """The factor on each param group's own lr at optimizer step ``step`` (0-based): linear
    warm-up over ``warmup_steps``, then 1 ("constant") or a half cosine down to 0 at ``steps``."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.lr_schedule == "constant":
        return 1.0
    t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(opt, s: DistillConfig, step: int) -> None:
    """Each group's lr = its own (``initial_lr``, kept in the optimizer's state as torch's
    schedulers keep it, so a resumed run sees it) times :func:`lr_factor`. Nothing for a
    constant schedule without warm-up: the optimizer's lr is left as given."""
    if s.lr_schedule == "constant" and not s.warmup_steps:
        return
    factor = lr_factor(s, step)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def _apply_update(opt, scaler, params, max_grad_norm: float | None, norm: torch.Tensor | None) -> None:
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
# After a step: progress bar, log, callback


def _progress_bar(run: Run):
    if not run.settings.progress:
        return None
    from tqdm.auto import tqdm

    steps = run.settings.steps
    return tqdm(total=steps, initial=min(run.start, steps), desc="distill", dynamic_ncols=True, disable=None)


def _after_step(run: Run, step_loss: float) -> bool:
    """Progress, log and callback after a step; True when the callback stops the run."""
    s, step = run.settings, run.step
    if run.pbar is not None:
        run.pbar.update(1)
        run.pbar.set_postfix(loss=f"{step_loss:.3e}")
    if step % s.log_every == 0 or step == s.steps:
        dt = (time.perf_counter() - run.t0) / max(step - run.start, 1)
        logger.info("distill: step %d/%d loss %.4e (%.3f s/step)", step, s.steps, step_loss, dt)
    if run.callback is None:
        return False
    info = DistillStep(step=step, steps=s.steps, loss=step_loss, lr=run.optimizer.param_groups[0]["lr"],
                       student=run.student, teacher=run.teacher, optimizer=run.optimizer)
    if run.callback(info) is not True:
        return False
    run.result.stopped_early = True
    if run.last_saved_step != step:
        save(run, step, get_rng())
    logger.info("distill: callback stopped the run at step %d", step)
    return True


# --------------------------------------------------------------------------------------------
# Saving and Ctrl-C


def save(run: Run, step: int, rng: dict) -> None:
    """Write the checkpoint of ``step`` (nothing without checkpoint_dir)."""
    if run.ckpt_path is None:
        return
    s = run.settings
    state = {"version": CHECKPOINT_VERSION, "step": step, "student": run.module.state_dict(),
             "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict() if run.scaler else None, "rng": rng,
             "losses": list(run.result.losses), "config": dataclasses.asdict(run.config),
             "seed": s.seed, "grad_accum": s.grad_accum, "lr_schedule": s.lr_schedule,
             "warmup_steps": s.warmup_steps}
    save_checkpoint_atomic(state, run.ckpt_path, keep_previous=run.ckpt_path.parent / PREV_CHECKPOINT_NAME)
    run.last_saved_step = step
    run.result.checkpoint_path = str(run.ckpt_path)
    logger.debug("distill: checkpoint at step %d -> %s", step, run.ckpt_path)


def _interrupted(run: Run) -> None:
    """Ctrl-C: an interrupted step applied no update, so save the state after the last whole step."""
    run.optimizer.zero_grad(set_to_none=True)
    with _sigint_deferred():
        if run.last_saved_step != run.step:
            save(run, run.step, run.rng_at_step)
    run.result.interrupted = True
    saved = run.result.checkpoint_path
    logger.warning(f"distill: interrupted at step {run.step}/{run.settings.steps}"
                   + (f"; checkpoint {saved} (step {run.last_saved_step}); run again with resume=True "
                      "to continue" if saved else "; no checkpoint_dir, nothing saved"))


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
