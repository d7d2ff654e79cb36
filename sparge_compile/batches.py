"""Input batches for distill() and calibrate(): where they come from, moving them to the model's
device, calling the model on one, and describing one in an error message.

A batch is called as ``model(*batch)`` for a tuple or list (a namedtuple too), ``model(**batch)``
for a dict, ``model(batch)`` otherwise.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

CALL_CONVENTION = ("called as model(*batch) for a tuple/list, model(**batch) for a dict, "
                   "model(batch) otherwise")


def module_device(m: nn.Module) -> torch.device | None:
    """The device of the module's first parameter (or buffer); None for a module with neither."""
    for p in m.parameters():
        return p.device
    for b in m.buffers():
        return b.device
    return None


def map_tensors(x: Any, fn: Callable[[Tensor], Any], leaf: Callable[[Any], Any] = lambda v: v) -> Any:
    """``fn`` applied to every tensor in ``x`` (nested tuples, namedtuples, lists, dicts), ``leaf``
    to anything else; the containers keep their type."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):   # a namedtuple takes its fields positionally
        return type(x)(*(map_tensors(v, fn, leaf) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)([map_tensors(v, fn, leaf) for v in x])
    if isinstance(x, dict):   # a copy keeps the dict's type and state (an OrderedDict, a defaultdict)
        out = copy.copy(x)
        for k, v in x.items():
            out[k] = map_tensors(v, fn, leaf)
        return out
    return leaf(x)


def to_device(x: Any, device: torch.device | None, non_blocking: bool = False) -> Any:
    """``x`` with every tensor in it on ``device`` (see map_tensors); None: ``x`` as it is."""
    if device is None:
        return x
    return map_tensors(x, lambda t: t if t.device == device else t.to(device, non_blocking=non_blocking))


def call_args(batch: Any) -> tuple[tuple, dict]:
    """A batch -> (args, kwargs) to call the model with (see the module docstring)."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def describe(batch: Any) -> str:
    """A batch's structure for an error message: tensors by shape, dtype and device."""
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)} {str(batch.dtype).replace('torch.', '')} on {batch.device}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    return type(batch).__name__


def is_batch_function(inputs, who: str, error: type[Exception] = TypeError) -> bool:
    """True for a callable ``inputs(i) -> batch``, False for an iterable of batches; anything
    else (a module, one tensor or dict, a non-iterable) raises ``error``."""
    if isinstance(inputs, nn.Module):
        raise error(f"{who}: inputs must be a callable(i) -> batch or an iterable of batches, not a module")
    if callable(inputs) and not isinstance(inputs, Tensor):
        return True
    if isinstance(inputs, (Tensor, dict)) or not isinstance(inputs, Iterable):
        raise error(f"{who}: inputs must be a callable(i) -> batch or an iterable of batches; got "
                    f"{type(inputs).__name__} (wrap a single batch as [batch])")
    return False


def take_batches(inputs, n: int | None, who: str, error: type[Exception], default_n: int = 4) -> list:
    """The first ``n`` batches of ``inputs`` as a list (all of an iterable, or ``default_n`` calls
    of a callable, when ``n`` is None). A callable that raises, or no batch at all, raise ``error``."""
    if is_batch_function(inputs, who, error):
        out = []
        for i in range(default_n if n is None else n):
            try:
                out.append(inputs(i))
            except Exception as e:
                raise error(f"{who}: inputs({i}) raised {type(e).__name__}: {e}") from e
    else:
        out = []
        for b in inputs:
            if n is not None and len(out) >= n:
                break
            out.append(b)
    if not out:
        raise error(f"{who}: no input batches")
    return out


class BatchStream:
    """Batch ``i`` (counting from 0) from a callable ``inputs(i)``, or the next item of an iterable.

    An iterable is read in order; when it runs out it is iterated again (epochs) if it can be (a
    list, a DataLoader), else ``error`` is raised. ``start`` skips the batches a resumed run used.
    """

    def __init__(self, inputs, start: int, who: str, error: type[Exception]):
        self.inputs, self.who, self.error = inputs, who, error
        self.is_function = is_batch_function(inputs, who)
        if not self.is_function:
            self.reiterable = iter(inputs) is not inputs
            self.it = iter(inputs)
            self.pos = 0
            for _ in range(start):
                self._next()

    def _next(self):
        try:
            item = next(self.it)
        except StopIteration:
            if not self.reiterable or self.pos == 0:
                raise self.error(f"{self.who}: inputs ran out after {self.pos} batches; pass a re-iterable "
                                 "(a list, a DataLoader) or a callable(i) -> batch") from None
            self.it = iter(self.inputs)
            item = next(self.it)
        self.pos += 1
        return item

    def get(self, i: int):
        return self.inputs(i) if self.is_function else self._next()
