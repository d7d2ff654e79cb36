"""The two models of distill(): the frozen dense teacher and the sparse student, the parameters
it trains, its optimizer and loss, and the check that the backend made the student sparse."""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import module_device
from ..config import SpargeConfig
from .results import DistillError

logger = logging.getLogger("sparge_compile.distill")

_SPARSE_OP_PREFIX = "sparge::block_sparse_attention"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module under ``torch.compile``'s wrapper(s): a model compiled with the sparge
    backend is sparse, and would make a sparse teacher (and compile the student twice)."""
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, OptimizedModule):
        logger.info("distill: model is a torch.compile wrapper; distilling its original module")
        model = model._orig_mod
    return model


def frozen_teacher(model: nn.Module, teacher: nn.Module | None) -> nn.Module:
    """``teacher`` (or a deep copy of ``model``, taken before any training) in eval mode, no grad."""
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _default_inner(module: nn.Module) -> str:
    dev = module_device(module)
    return "inductor" if dev is not None and dev.type == "cuda" else "aot_eager"


def make_student(module: nn.Module, config: SpargeConfig, inner: str | None = None):
    """``torch.compile(module, backend=sparge_compile.backend(config=config, inner=inner))``.

    inner: what compiles the rewritten graph: "inductor" (default on CUDA), "aot_eager"
    (default on the CPU) or "eager". Returns ``(student, backend)``; ``backend.report()``
    lists every attention site, rewritten or kept dense and why.
    """
    from ..compiler import backend as make_backend

    be = make_backend(config=config, inner=inner or _default_inner(module))
    return torch.compile(module, backend=be), be


def build_student(module: nn.Module, config: SpargeConfig, compile_fn, inner):
    """``(student, backend)``: from ``compile_fn(module, config)`` (backend None unless it returns
    the pair, as make_student does), else make_student."""
    if compile_fn is None:
        return make_student(module, config, inner)
    student = compile_fn(module, config)
    if isinstance(student, tuple) and len(student) == 2 and hasattr(student[1], "report"):
        return student
    return student, None


def select_params(module: nn.Module, trainable) -> list[nn.Parameter]:
    """The parameters ``trainable`` names (see distill()); the rest get requires_grad=False."""
    named = list(module.named_parameters())
    if trainable is None:
        chosen = [p for _, p in named if p.requires_grad]
    elif callable(trainable):
        chosen = [p for n, p in named if trainable(n, p)]
    else:
        items = [trainable] if isinstance(trainable, str) else list(trainable)   # one prefix
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


def make_optimizer(optimizer, params, lr: float) -> torch.optim.Optimizer:
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


def make_loss(loss: str | Callable) -> Callable[[Any, Any], Tensor]:
    """``loss`` itself when callable; "mse" / "l1": the mean over the outputs' floating tensors."""
    if callable(loss):
        return loss
    elem = {"mse": F.mse_loss, "l1": F.l1_loss}[loss]   # (DistillConfig checked the name)

    def fn(s_out, t_out):
        s, t = _tensor_leaves(s_out), _tensor_leaves(t_out)
        if not s or len(s) != len(t):
            raise DistillError(f"the model's outputs must be tensors (or tuples/dicts of them) with the same "
                               f"structure for student and teacher; got {len(s)} vs {len(t)} tensors")
        terms = [elem(a.float(), b.float()) for a, b in zip(s, t) if a.is_floating_point()]
        return sum(terms) / len(terms)
    return fn


def sparse_ops_ran(fn: Callable[[], Any]) -> tuple[Any, bool]:
    """Run fn under the profiler; True when a sparge sparse-attention op executed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(_SPARSE_OP_PREFIX in e.name for e in prof.events())


def check_rewritten(backend, ran: bool | None) -> None:
    """Raise when no attention of the student ran sparse: the backend's report says so, or (a
    custom compile_fn, no backend) the profiler saw no sparse op (``ran``)."""
    report = backend.report() if backend is not None else None
    if report is not None:
        ran = bool(report.rewritten)
    if ran:
        return
    why = (f"\n{report}" if report is not None and len(report)
           else " The backend found no attention site at all." if report is not None else "")
    raise DistillError(
        "distill: no attention in the student was rewritten to sparse attention, so there is "
        "nothing to distil. The sparge backend rewrites plain softmax(QK^T)V and "
        "F.scaled_dot_product_attention without attn_mask or dropout, with at least "
        f"config.min_seq_len keys.{why}\nPass check_rewrite=False to train anyway.")
