"""What distill() hands back: its result, the record a callback gets after every step, its errors."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SpargeConfig


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
