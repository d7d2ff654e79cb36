"""Find a model's attention modules by running it once: which module calls
``F.scaled_dot_product_attention``, how often, with which head dim and head count.

What :func:`sparge_compile.enable_linear_branch` uses when it is given ``example_inputs`` instead
of ``sites``: the branches go on exactly the modules whose own forward calls attention (the
innermost module around each call, as the backend pairs them), with each site's head dim. Not a
guess by class name: the model runs (eagerly, without gradients) and the calls are recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass
class FoundSite:
    """One module whose forward calls attention: its calls per forward call, q's head dim and query
    heads (None where its calls disagree)."""

    path: str
    calls_per_forward: int
    head_dim: int | None
    num_heads: int | None


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list):
        super().__init__()
        self.stack, self.calls = stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:   # diffusers passes query=... by keyword
            q = args[0] if args else kwargs["query"]
            where = self.stack[-1] if self.stack else ("", 0)
            self.calls.append((where, q.shape[-1], q.shape[-3] if q.dim() >= 3 else 1))
        return func(*args, **kwargs)


def _hooks(model: nn.Module, stack: list) -> list:
    """Hooks keeping ``stack`` = [(path, index of this call of that module)] of the running modules."""
    count: dict = {}

    def enter(path):
        def pre(module, args):
            count[path] = count.get(path, 0) + 1
            stack.append((path, count[path]))
        return pre

    def leave(module, args, out):
        stack.pop()

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


def find_attention_modules(model: nn.Module, example_inputs) -> list[FoundSite]:
    """Run ``model`` once on ``example_inputs`` (a tuple of positional arguments or a dict of keyword
    arguments; no gradients) and return, in call order, each module whose own forward calls
    ``F.scaled_dot_product_attention`` (path "" is the root)."""
    args, kwargs = (((), dict(example_inputs)) if isinstance(example_inputs, dict)
                    else (tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
                          else (example_inputs,), {}))
    stack: list = []
    handles = _hooks(model, stack)
    rec = _Recorder(stack)
    try:
        with torch.no_grad(), rec:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    per_call: dict = {}
    for (path, call), d, h in rec.calls:
        per_call.setdefault(path, {}).setdefault(call, []).append((d, h))
    found = []
    for path, calls in per_call.items():
        dims = {d for c in calls.values() for d, _ in c}
        heads = {h for c in calls.values() for _, h in c}
        one = lambda xs: xs.pop() if len(xs) == 1 else None  # noqa: E731
        found.append(FoundSite(path, max(len(c) for c in calls.values()), one(dims), one(heads)))
    return found


__all__ = ["FoundSite", "find_attention_modules"]
