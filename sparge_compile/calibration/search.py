"""The search on the statistics' tables (no model run): one grid point per site, for an overall
sparsity target (least mean error) or an error bound (sparsest point within it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..validate import warn_user


def frontier(kept: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the Pareto points: kept ascending, error strictly decreasing."""
    idx = np.lexsort((np.arange(len(kept)), err, kept))
    out, best = [], math.inf
    for i in idx:
        if not out or err[i] < best - 1e-9 * abs(best):   # (float noise is no improvement)
            out.append(i)
            best = err[i]
    return np.asarray(out, dtype=np.int64)


def _total(fk: list, choice: list) -> float:
    return sum(float(k[j]) for k, j in zip(fk, choice))


def allocate(kepts: list, errs: list, budget: float) -> list[int]:
    """One candidate per site (indices into each site's arrays) with Σ kept <= budget and the
    least Σ err: Lagrange multiplier by bisection on the Pareto frontiers, then a greedy fill of
    the remaining budget by error saved per kept block pair. Sparsest points if infeasible."""
    fronts = [frontier(kp, er) for kp, er in zip(kepts, errs)]
    fk = [kp[f] for kp, f in zip(kepts, fronts)]
    fe = [er[f] for er, f in zip(errs, fronts)]
    if _total(fk, [0] * len(fk)) > budget:
        return [int(f[0]) for f in fronts]
    choice = _multiplier_choice(fk, fe, budget)
    choice = _greedy_fill(fk, fe, choice, budget - _total(fk, choice))
    return [int(f[j]) for f, j in zip(fronts, choice)]


def _multiplier_choice(fk: list, fe: list, budget: float) -> list[int]:
    """Per frontier the point minimising err + λ·kept, for the least λ that meets the budget."""
    scale = max(1.0, float(sum(x[-1] for x in fk)))

    def pick(lam):
        return [int(np.argmin(e + lam * k / scale)) for k, e in zip(fk, fe)]

    lo, hi = 0.0, 1.0
    while _total(fk, pick(hi)) > budget:
        hi *= 4.0
        if hi > 1e30:
            break
    if _total(fk, pick(lo)) <= budget:
        choice = pick(lo)
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if _total(fk, pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        choice = pick(hi)
    if _total(fk, choice) > budget:  # the multiplier search can land on a tie; fall back
        choice = [0] * len(fk)
    return choice


def _greedy_fill(fk: list, fe: list, choice: list[int], left: float) -> list[int]:
    """Spend the budget ``left``: repeatedly the denser point that saves the most error per kept pair."""
    while True:
        best, best_r = None, 0.0
        for s, (k, e) in enumerate(zip(fk, fe)):
            j0 = choice[s]
            for j in range(j0 + 1, len(k)):
                dk = float(k[j] - k[j0])
                if dk > left:
                    break
                r = (float(e[j0] - e[j]) / dk) if dk > 0 else math.inf
                if r > best_r:
                    best, best_r = (s, j), r
        if best is None:
            return choice
        s, j = best
        left -= float(fk[s][j] - fk[s][choice[s]])
        choice[s] = j


@dataclass
class Ladder:
    """Sites that move together on one ladder of grid points (one site, or all of them for a
    global point); the check backs off along it."""

    sites: list
    ladder: list                 # candidate indices, sparsest first (per site the same index)
    pos: int = 0
    exhausted: bool = False

    @property
    def cand(self) -> int:
        return int(self.ladder[self.pos])

    def advance(self) -> bool:
        if self.pos + 1 < len(self.ladder):
            self.pos += 1
            return True
        self.exhausted = True
        return False


def _within_bound(kept: np.ndarray, worst: np.ndarray, max_error: float) -> list[int]:
    """The frontier from its sparsest point within max_error on (the worst) batch onwards."""
    f = frontier(kept, worst)
    ok = np.flatnonzero(worst[f] <= max_error)
    return [int(x) for x in f[int(ok[0]) if ok.size else len(f) - 1:]]


def _global_point(tabs: dict, active: list, target, max_error) -> int:
    """One grid point for every site: the least mean error at overall sparsity >= target, or the
    sparsest point with every site within max_error on every batch (predicted)."""
    tk = np.sum([tabs[s.sid][0] for s in active], axis=0)
    if target is not None:
        budget = (1.0 - float(target)) * sum(tabs[s.sid][1] for s in active)
        te = np.mean([tabs[s.sid][2] for s in active], axis=0)
        ok = np.flatnonzero(tk <= budget)
        return int(ok[np.argmin(te[ok])]) if ok.size else int(np.argmin(tk))
    tw = np.max([tabs[s.sid][3] for s in active], axis=0)
    ok = np.flatnonzero(tw <= max_error)
    return int(ok[np.lexsort((tw[ok], tk[ok]))[0]]) if ok.size else int(np.argmin(tw))


def search(active: list, target, max_error, per_site: bool) -> int | None:
    """Give every site of ``active`` (SiteRecords) its Ladder. Returns the one-point-for-all
    baseline's grid index (measured beside the plan), or None when that is the plan (not per_site)."""
    tabs = {s.sid: s.tables() for s in active}
    gc = _global_point(tabs, active, target, max_error)
    if not per_site:   # the baseline itself: one point (one ladder, with max_error) for all sites
        if target is not None:
            ladder = [gc]
        else:
            tk = np.sum([tabs[s.sid][0] for s in active], axis=0)
            ladder = _within_bound(tk, np.max([tabs[s.sid][3] for s in active], axis=0), max_error)
        g = Ladder(list(active), ladder)
        for s in active:
            s.group = g
        return None
    if target is not None:
        budget = (1.0 - float(target)) * sum(tabs[s.sid][1] for s in active)
        kepts = [tabs[s.sid][0] for s in active]
        choice = allocate(kepts, [tabs[s.sid][2] / len(active) for s in active], budget)
        if sum(k[c] for k, c in zip(kepts, choice)) > budget:
            warn_user(f"calibrate: target sparsity {target} is out of reach at these block sizes; "
                      "using the sparsest points")
        for s, c in zip(active, choice):
            s.group = Ladder([s], [c])
        return gc
    for s in active:   # max_error: the sparsest point within the bound; denser frontier points after it
        kept, _, _, worst = tabs[s.sid]
        s.group = Ladder([s], _within_bound(kept, worst, max_error))
    return gc
