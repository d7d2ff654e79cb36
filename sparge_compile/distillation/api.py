"""distill(): the public function; it gathers the settings and sets one run up for the loop."""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..batches import BatchStream, module_device
from ..config import DistillConfig, SpargeConfig, settings_from_arguments
from ..validate import check_distill_objects
from .checkpoint import open_checkpoint, seed_all, set_rng
from .loop import Run, train
from .results import DistillError, DistillResult, DistillStep
from .student import build_student, frozen_teacher, make_loss, make_optimizer, select_params, unwrap_compiled

_SETTINGS = tuple(f.name for f in dataclasses.fields(DistillConfig))


def distill(model: nn.Module, inputs, *, steps: int | None = None, lr: float = 1e-5,
            lr_schedule: str = "constant", warmup_steps: int = 0, config: SpargeConfig | None = None,
            optimizer=None, loss: str | Callable = "mse", trainable=None,
            grad_accum: int = 1, amp_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
            checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100,
            resume: bool = True, log_every: int = 10, progress: bool = True,
            callback: Callable[[DistillStep], Any] | None = None, seed: int | None = 0,
            backend_inner: str | None = None,
            compile_fn: Callable[[nn.Module, SpargeConfig], Callable] | None = None,
            teacher: nn.Module | None = None, inplace: bool = True, train_mode: bool = False,
            check_rewrite: bool = True, on_interrupt: str = "raise",
            distill_config: DistillConfig | None = None) -> DistillResult:
    """Distil the sparse student (``model`` compiled with the sparge backend) against the dense teacher.

    model: the dense model; it becomes the student and is trained in place (``inplace=False``
        trains a deep copy). A ``torch.compile``-d model (any backend) is unwrapped first: the
        teacher copies its original dense module, and ``inplace=True`` trains that module, so the
        compiled wrapper sees the trained weights too.
    inputs: a callable ``inputs(i) -> batch`` (``i`` counts micro-batches, ``i = step * grad_accum
        + micro``; deterministic per ``i`` gives exact resumes, e.g. :func:`flow_matching_inputs`)
        or an iterable of batches (re-iterated for more epochs; on resume the used batches are
        skipped, so it must yield the same sequence each time). A batch is called as
        ``model(*batch)`` for a tuple/list, ``model(**batch)`` for a dict, ``model(batch)``
        otherwise; its tensors are moved to the model's device.
    steps, lr, lr_schedule, warmup_steps, loss, grad_accum, amp_dtype, max_grad_norm, checkpoint_dir,
    checkpoint_every, resume, log_every, progress, seed, backend_inner, inplace, train_mode, check_rewrite,
    on_interrupt: the training settings, documented on :class:`DistillConfig`; or pass them all
        as ``distill_config=DistillConfig(steps=..., ...)`` (then leave these at their defaults).
    config: the SpargeConfig of the sparse attention (default SpargeConfig()).
    optimizer: None (AdamW with ``lr``), a torch.optim.Optimizer over the model's parameters, or
        a callable(params) -> Optimizer.
    trainable: None (every parameter with requires_grad), a callable(name, param) -> bool,
        names / name prefixes ("blocks.0.attn"), or the parameters themselves; the rest frozen.
    callback: called after every step with a :class:`DistillStep`; return True to stop early.
    compile_fn: build the student yourself: compile_fn(module, config) -> callable, or ->
        ``(student, backend)`` like :func:`make_student`; without the backend, ``check_rewrite``
        watches the sparse op run instead.
    teacher: use this frozen model as the teacher instead of a deep copy of ``model``.

    Returns a :class:`DistillResult` (``student, losses = result`` unpacks it).
    Raises :class:`DistillError` for bad inputs or a model with no attention to sparsify,
    :class:`NonFiniteLossError` when the loss or the gradients are NaN/inf: no optimizer step and
    no checkpoint for that step, so the weights and the last checkpoint stay finite.
    """
    given = {name: value for name, value in locals().items() if name in _SETTINGS}
    if steps is None:
        if distill_config is None:
            raise TypeError("distill() needs steps=... (or distill_config=DistillConfig(steps=...))")
        del given["steps"]
    settings = settings_from_arguments(DistillConfig, distill_config, given, "distill_config")
    check_distill_objects(trainable=trainable, teacher=teacher, callback=callback, compile_fn=compile_fn)
    run = _setup(model, inputs, settings, config, optimizer=optimizer, trainable=trainable,
                 callback=callback, compile_fn=compile_fn, teacher=teacher)
    return train(run)


def _setup(model, inputs, s: DistillConfig, config, *, optimizer, trainable, callback, compile_fn,
           teacher) -> Run:
    """Teacher, student, optimizer, checkpoint (resumed when there is one) and batches of one run."""
    model = unwrap_compiled(model)
    if config is None:
        config = SpargeConfig()
    elif not isinstance(config, SpargeConfig):
        raise TypeError(f"config must be a SpargeConfig, got {type(config).__name__}")
    loss_fn = make_loss(s.loss)
    if s.seed is not None:
        seed_all(s.seed)
    teacher = frozen_teacher(model, teacher)
    module = model if s.inplace else copy.deepcopy(model)
    module.train(s.train_mode)
    device = module_device(module)
    params = select_params(module, trainable)
    opt = make_optimizer(optimizer, params, s.lr)
    scaler = None
    if s.amp_dtype == torch.float16 and device is not None and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    start = open_checkpoint(s, module, opt, scaler, config)
    batches = BatchStream(inputs, start.step * s.grad_accum, "distill", DistillError)
    if start.rng is not None:   # after skipping used batches, so they cannot disturb it
        set_rng(start.rng)
    student, backend = build_student(module, config, compile_fn, s.backend_inner)
    result = DistillResult(student=student, module=module, teacher=teacher, losses=start.losses,
                           step=start.step, checkpoint_path=start.saved, config=config)
    return Run(settings=s, config=config, module=module, student=student, backend=backend, teacher=teacher,
               params=params, optimizer=opt, scaler=scaler, loss_fn=loss_fn, batches=batches, device=device,
               result=result, callback=callback, ckpt_path=start.path, start=start.step,
               last_saved_step=start.step if start.saved else None)
