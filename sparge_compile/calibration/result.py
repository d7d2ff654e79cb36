"""The SpargePlan calibrate() returns: per site its chosen point with the predicted and measured
sparsity and error, and a summary (with the one-point-for-all baseline beside it)."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import SpargeConfig
from ..plan import PlanSite, SpargePlan
from .capture import Calibrator
from .statistics import SiteRecord


def _measured(st: SiteRecord, c: int, n_batches: int):
    """Pooled [num, den, kept, visible] of candidate c over the batches, and the worst batch error."""
    ms = [st.meas[(c, b)] for b in range(n_batches) if (c, b) in st.meas]
    if not ms:
        return None, None
    return np.sum(ms, axis=0), max(float(x[0] / max(x[1], 1e-30)) for x in ms)


def _site_entry(cal: Calibrator, st: SiteRecord, max_error, n_batches: int) -> PlanSite:
    """The plan's entry for one calibrated site: its point (or dense) with predicted and measured values."""
    c = st.group.cand
    topk, topp = cal.candidate(c)
    kept, vis, err, _ = st.tables()
    m, m_max = _measured(st, c, n_batches)
    m_err = float(m[0] / max(m[1], 1e-30)) if m is not None else None
    m_sp = float(1.0 - m[2] / max(m[3], 1e-30)) if m is not None else None
    note = ""
    if st.group.pos > 0:
        note = f"backed off {st.group.pos} step(s) after the measured error exceeded the bound"
    dense = False
    if max_error is not None and m_max is not None and m_max > max_error:
        dense = True
        note = f"kept dense: measured error {m_max:.3g} > max_error even at the densest point"
    elif kept[c] >= vis:
        dense, note = True, "keeps every block: runs dense"
    return PlanSite(topk=None if dense else topk, topp=None if dense else topp, dense=dense,
                    kind=st.kind, shapes=st.shapes, note=note,
                    predicted_sparsity=float(1.0 - kept[c] / max(vis, 1e-30)),
                    predicted_error=float(err[c]), measured_sparsity=0.0 if dense else m_sp,
                    measured_error=0.0 if dense else m_err, measured_max_error=0.0 if dense else m_max)


def _totals(active: list, sites: dict, n_batches: int) -> dict:
    """Overall predicted / measured sparsity and mean errors over the calibrated sites."""
    sum_pk = sum_mk = sum_v = sum_mv = 0.0
    perr, merr = [], []
    for st in active:
        e = sites[st.sid]
        kept, vis, err, _ = st.tables()
        c = st.group.cand
        m, _ = _measured(st, c, n_batches)
        sum_pk += float(kept[c])
        sum_v += vis
        perr.append(float(err[c]))
        if m is not None:
            sum_mk += vis if e.dense else float(m[2])
            sum_mv += vis if e.dense else float(m[3])
            merr.append(0.0 if e.dense else e.measured_error)
    return {"predicted_sparsity": 1.0 - sum_pk / max(sum_v, 1e-30),
            "measured_sparsity": (1.0 - sum_mk / sum_mv) if sum_mv else None,
            "predicted_error": float(np.mean(perr)) if perr else None,
            "measured_error": float(np.mean(merr)) if merr else None}


def _global_summary(cal: Calibrator, active: list, n_batches: int) -> dict:
    """The one (topk, topp) for all sites, predicted and (when measured) measured."""
    gc = cal.global_cand
    tk, tp = cal.candidate(gc)
    tabs = [st.tables() for st in active]
    ms = [_measured(st, gc, n_batches) for st in active]
    have = all(m is not None for m, _ in ms)
    return {
        "topk": tk, "topp": tp,
        "predicted_sparsity": 1.0 - sum(t[0][gc] for t in tabs) / max(sum(t[1] for t in tabs), 1e-30),
        "predicted_error": float(np.mean([t[2][gc] for t in tabs])),
        "measured_sparsity": (1.0 - sum(m[2] for m, _ in ms) / sum(m[3] for m, _ in ms)) if have else None,
        "measured_error": float(np.mean([m[0] / max(m[1], 1e-30) for m, _ in ms])) if have else None,
        "measured_max_error": max(w for _, w in ms) if have else None}


def make_plan(cal: Calibrator, active: list, config: SpargeConfig, target, max_error, per_site: bool,
              n_batches: int) -> SpargePlan:
    sites = {}
    for sid, st in cal.sites.items():
        if st in active:
            sites[sid] = _site_entry(cal, st, max_error, n_batches)
        else:
            note = st.reason if not st.rewritten else "not run during calibration"
            sites[sid] = PlanSite(kind=st.kind, shapes=st.shapes, note=note)
    objective = {"target_sparsity": float(target)} if target is not None else {"max_error": float(max_error)}
    if not per_site:
        objective["per_site"] = False
    summary = _totals(active, sites, n_batches)
    summary.update(measured_max_error=max((s.measured_max_error or 0.0) for s in sites.values()),
                   sites=len(sites), calibrated=len(active), batches=n_batches,
                   grid=[len(cal.topks), len(cal.topps)], sample_blocks=cal.sample_blocks)
    if cal.global_cand is not None:
        summary["global"] = _global_summary(cal, active, n_batches)
    meta = {"torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return SpargePlan(config=config, sites=sites, objective=objective, summary=summary, meta=meta)
