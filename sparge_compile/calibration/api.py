"""calibrate(): the public function, and the passes it makes over the batches."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from ..batches import CALL_CONVENTION, call_args, describe, module_device, take_batches, to_device
from ..config import GRID_TOPK, GRID_TOPP, CalibrateConfig, SpargeConfig, settings_from_arguments
from ..plan import SpargePlan
from .capture import Calibrator, capture_backend
from .result import make_plan
from .search import search

log = logging.getLogger("sparge_compile.calibrate")

_SETTINGS = tuple(f.name for f in dataclasses.fields(CalibrateConfig))


class CalibrationError(RuntimeError):
    """calibrate() cannot go on: bad arguments, no inputs, or no attention site to calibrate."""


def calibrate(model: nn.Module, inputs, *, target_sparsity: float | None = None,
              max_error: float | None = None, config: SpargeConfig | None = None,
              batches: int | None = None, per_site: bool = True,
              inner="eager", sample_blocks: int = 16, topks=GRID_TOPK, topps=GRID_TOPP,
              max_rounds: int = 6, verbose: bool = False,
              calibrate_config: CalibrateConfig | None = None) -> SpargePlan:
    """Choose (topk, topp) per attention site of ``model`` from a few input batches.

    model: an ``nn.Module`` (or a model returned by ``torch.compile``: its original module is
        used); it runs in eval mode under ``torch.no_grad`` (its mode is restored afterwards).
    inputs: a list (or iterable) of batches, or a callable ``inputs(i) -> batch``; a batch is a
        tuple (``model(*batch)``), a dict (``model(**batch)``) or one tensor. Moved to the model's
        device.
    target_sparsity, max_error (exactly one), batches, per_site, inner, sample_blocks, topks,
    topps, max_rounds, verbose: the objective and search settings, documented on
        :class:`CalibrateConfig`; or pass them all as ``calibrate_config=CalibrateConfig(...)``
        (then leave these at their defaults).
    config: block sizes, mode and min_seq_len (sites with fewer keys stay dense and are not
        calibrated); default ``SpargeConfig()``.

    Bad arguments raise TypeError (a wrong type) or ValueError (out of range) naming the argument;
    a batch the model rejects raises :class:`CalibrationError` naming the batch and the model's error.

    Returns a :class:`SpargePlan` (``print(plan)`` is the report: each site's choice, predicted
    and measured sparsity and error), bound to ``model`` (:meth:`SpargePlan.bind`: it also applies
    when the model's blocks are compiled alone, ``compile_repeated_blocks``). Raises
    :class:`CalibrationError` when no site qualifies.
    """
    given = {name: value for name, value in locals().items() if name in _SETTINGS}
    s = settings_from_arguments(CalibrateConfig, given=given, base=calibrate_config, arg="calibrate_config")
    config = SpargeConfig() if config is None else config
    if not isinstance(config, SpargeConfig):
        raise TypeError(f"calibrate: config must be a SpargeConfig, got {type(config).__name__}")
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: model must be an nn.Module, got {type(model).__name__}")
    device = module_device(model)
    data = [to_device(b, device) for b in take_batches(inputs, s.batches, "calibrate", CalibrationError)]
    t0 = time.perf_counter()
    topks = s.topks if config.mode != "topp" else (0.0,)
    topps = s.topps if config.mode != "topk" else (0.0,)
    cal = Calibrator(capture_backend(model, config, s.inner), config, topks, topps, s.sample_blocks,
                     None if s.max_error is None else float(s.max_error))
    active, times = _in_eval_mode(model, lambda: _passes(model, cal, data, s, device))
    plan = make_plan(cal, active, config, s.target_sparsity, s.max_error, s.per_site, len(data)).bind(model)
    t_first, t_stats, t_search, t_check = (t - t0 for t in times)
    plan.summary.update(seconds=t_check, seconds_first_batch=t_first, seconds_capture_and_stats=t_stats,
                        seconds_search=t_search - t_stats, seconds_check=t_check - t_search)
    if s.verbose:
        print(plan.table())
    log.info("%s", plan.table())
    return plan


def _in_eval_mode(model: nn.Module, fn):
    """fn() with every submodule in eval mode, under no_grad; the modes are restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        for m, training in modes:
            m.training = training


def _passes(model: nn.Module, cal: Calibrator, data: list, s: CalibrateConfig, device):
    """Statistics over all batches, the search, then check passes until every site's point is
    measured on every batch (at most max_rounds). Returns the calibrated sites and the times
    (first batch done, statistics done, search done, checks done)."""
    compiled = torch.compile(model, backend=cal.be, dynamic=False)
    with cal.hook():
        _run_batches(compiled, data[:1], cal, "stats")   # compiles the capture graph(s)
        t_first = _synced_time(device)
        _run_batches(compiled, data[1:], cal, "stats", start=1)
        t_stats = _synced_time(device)
        cal.sync_sites()
        active = [st for st in cal.sites.values() if st.rewritten and st.ran]
        if not active:
            raise CalibrationError("calibrate: no attention site to calibrate (the backend rewrote none "
                                   "that ran; see the sites' reasons: " + "; ".join(
                                       f"{st.sid}: {st.reason}" for st in cal.sites.values()) + ")")
        cal.global_cand = search(active, s.target_sparsity, s.max_error, s.per_site)
        t_search = time.perf_counter()
        for r in range(s.max_rounds):
            cal.round = r
            pending = [st for st in active if any(
                (c, b) not in st.meas for c in (st.group.cand, cal.global_cand) if c is not None
                for b in range(len(data)))]
            if not pending:
                break
            _run_batches(compiled, data, cal, "check")
        return active, (t_first, t_stats, t_search, _synced_time(device))


def _synced_time(device) -> float:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _run_batches(compiled, batches, cal: Calibrator, phase: str, start: int = 0):
    cal.phase = phase
    for i, batch in enumerate(batches, start):
        cal.batch = i
        args, kwargs = call_args(batch)
        try:
            compiled(*args, **kwargs)
        except CalibrationError:
            raise
        except Exception as e:
            raise _rejected(batch, i, e) from e


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain: what the model raised, under Dynamo's wrappers
    (a fake-tensor error during tracing carries the model's own error as its cause)."""
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or e.__context__
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _rejected(batch, i: int, e: Exception) -> CalibrationError:
    from torch._dynamo.exc import BackendCompilerFailed

    root = _root_cause(e)
    text = str(root).strip()
    why = f"{type(root).__name__}: {text.splitlines()[0] if text else ''}"
    if root is not e:
        why += f" (raised through {type(e).__name__})"
    who = ("the sparge capture backend failed on" if isinstance(e, BackendCompilerFailed)
           else "the model rejected")
    return CalibrationError(f"calibrate: {who} batch {i} = {describe(batch)} ({CALL_CONVENTION}): {why}")
