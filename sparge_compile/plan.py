"""SpargePlan: a per-site (topk, topp) choice for a model, made by :func:`sparge_compile.calibrate`.

A plan is plain data: a versioned JSON document (``plan.save(path)``, ``SpargePlan.load(path)``)
that the backend takes as ``options={"plan": plan}`` or ``sparge_compile.backend(plan=plan)``.

Sites are named by a stable id: the owning module's path in the compiled model plus the site's
ordinal inside that module (``"blocks.3.attn#0"``; ``"#0"`` for attention outside any module), so
the same model compiled again (another process, another compile) has the same ids. Each plan
entry also records the site's shapes (batch dimension left out) as seen during calibration.

Applying a plan: a site named in the plan gets the plan's (topk, topp) with the plan's block
sizes and mode; a site not in the plan uses the backend's config. A plan for a different model
is an error (:class:`PlanMismatchError`), never a silent fallback: a site whose id is in the
plan but whose shapes differ, or (``strict``, the default) a compiled graph with attention
sites of which none is in the plan.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from .config import SpargeConfig

FORMAT = "sparge-plan"
VERSION = 1


class PlanMismatchError(ValueError):
    """The plan was made for a different model (site ids or shapes do not match)."""


def site_signature(kind: str, shapes: dict) -> dict:
    """A site's shapes without the batch dimension: ``{"q": [...], "k": [...]}``.

    Op layout (sdpa, hand-written): q (B, H, N, D) -> [H, N, D]; rank 3 (B*H, N, D) -> [N, D].
    MultiheadAttention: q (L, B, E) -> [L, E]; unbatched (L, E) stays. Symbolic sizes are kept
    as strings and match anything.
    """
    out = {}
    for name in ("q", "k"):
        s = list(shapes.get(name, ()))
        if kind == "mha":
            if len(s) == 3:
                s = [s[0], s[2]]
        elif len(s) >= 3:
            s = s[1:]
        out[name] = [int(x) if isinstance(x, int) else str(x) for x in s]
    return out


def _sig_matches(rec: dict, cur: dict) -> bool:
    for name in ("q", "k"):
        a, b = rec.get(name, []), cur.get(name, [])
        if len(a) != len(b):
            return False
        if any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b)):
            return False
    return True


def _fmt_sig(sig: dict) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, sig.get(n, [])))}" for n in ("q", "k"))


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(x):
    """JSON-safe copy: non-finite floats -> None, tuples -> lists, other objects -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return _num(x)
    try:
        return _num(float(x))
    except (TypeError, ValueError):
        return str(x)


@dataclass
class PlanSite:
    """One site of a plan. ``topk``/``topp`` None: the site uses the backend's config (it was
    not calibrated, e.g. kept dense as too short); ``dense``: the plan keeps it dense."""

    topk: float | None = None
    topp: float | None = None
    dense: bool = False
    kind: str = ""
    shapes: list = field(default_factory=list)      # signatures seen during calibration
    note: str = ""                                  # why it is not calibrated, or a back-off
    predicted_sparsity: float | None = None
    predicted_error: float | None = None
    measured_sparsity: float | None = None
    measured_error: float | None = None             # pooled over the calibration batches
    measured_max_error: float | None = None         # worst calibration batch

    @property
    def calibrated(self) -> bool:
        return self.dense or self.topk is not None

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "PlanSite":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SpargePlan:
    """Per-site (topk, topp) for one model; see the module docstring.

    config:    the calibration's base config (block sizes and mode come from it when applied).
    sites:     site id -> :class:`PlanSite`.
    objective: ``{"target_sparsity": s}`` or ``{"max_error": e}``.
    summary:   overall predicted / measured sparsity and error, timings.
    strict:    a compiled graph with attention sites none of which is in the plan raises.
    """

    config: SpargeConfig = field(default_factory=SpargeConfig)
    sites: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    strict: bool = True

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION,
                "config": dataclasses.asdict(self.config),
                "objective": dict(self.objective), "strict": self.strict,
                "sites": {sid: s.to_dict() for sid, s in self.sites.items()},
                "summary": _clean(self.summary), "meta": _clean(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> "SpargePlan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a sparge plan (expected format {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"sparge plan version {d.get('version')!r} is not supported (this is version "
                             f"{VERSION}); calibrate again")
        return cls(config=SpargeConfig(**d["config"]),
                   sites={sid: PlanSite.from_dict(s) for sid, s in d.get("sites", {}).items()},
                   objective=dict(d.get("objective", {})), summary=dict(d.get("summary", {})),
                   meta=dict(d.get("meta", {})), strict=bool(d.get("strict", True)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpargePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def coerce(cls, plan):
        """A SpargePlan from a plan, a path to a saved one, or its dict; anything else unchanged."""
        if isinstance(plan, (str, os.PathLike)):
            return cls.load(plan)
        if isinstance(plan, dict) and plan.get("format") == FORMAT:
            return cls.from_dict(plan)
        return plan

    # ------------------------------------------------------------------ applying it
    def site_config(self, site_id: str, default: SpargeConfig):
        """The config for a site: the plan's choice, None (dense) or ``default`` (not in the plan)."""
        entry = self.sites.get(site_id)
        if entry is None or (entry.topk is None and not entry.dense):
            return default
        if entry.dense:
            return None
        return default.replace(topk=entry.topk, topp=entry.topp, mode=self.config.mode,
                               block_q=self.config.block_q, block_k=self.config.block_k)

    def check_graph(self, sites: list[tuple[str, str, dict]], graph: str = "") -> None:
        """Check a compiled graph's attention sites ``[(site id, kind, shapes), ...]`` against the
        plan: PlanMismatchError if a site in the plan has other shapes, or (strict) if the graph
        has sites and none of them is in the plan."""
        for sid, kind, shapes in sites:
            entry = self.sites.get(sid)
            if entry is None or not entry.shapes:
                continue
            sig = site_signature(kind, shapes)
            if not any(_sig_matches(r, sig) for r in entry.shapes):
                seen = "; ".join(_fmt_sig(r) for r in entry.shapes)
                raise PlanMismatchError(
                    f"sparge plan does not match this model: site {sid!r} has shapes {_fmt_sig(sig)} "
                    f"(batch left out) but the plan was calibrated with {seen}; calibrate this model "
                    "(or this resolution) again")
        if not self.strict or not sites or not self.sites or any(s[0] in self.sites for s in sites):
            return
        ids = [s[0] for s in sites]
        have = ", ".join(repr(s) for s in ids[:4]) + (" ..." if len(ids) > 4 else "")
        want = ", ".join(repr(s) for s in list(self.sites)[:4]) + (" ..." if len(self.sites) > 4 else "")
        raise PlanMismatchError(
            f"sparge plan does not match this model: graph {graph} has attention sites {have}, none of "
            f"which is in the plan (its sites: {want}). A plan is made for one model, compiled whole "
            "(site ids are module paths from the compiled root); calibrate this model, or set "
            "plan.strict = False to use the default config for unknown graphs")

    # ------------------------------------------------------------------ the report
    def rows(self) -> list[dict]:
        out = []
        for sid, s in self.sites.items():
            out.append(dict(site=sid, kind=s.kind, topk=s.topk, topp=s.topp, dense=s.dense,
                            shape=_fmt_sig(s.shapes[0]) if s.shapes else "",
                            predicted_sparsity=s.predicted_sparsity, measured_sparsity=s.measured_sparsity,
                            predicted_error=s.predicted_error, measured_error=s.measured_error,
                            measured_max_error=s.measured_max_error, note=s.note))
        return out

    def table(self) -> str:
        def f(x, pct=False):
            if x is None:
                return "-"
            return f"{x:.1%}" if pct else f"{x:.4g}"

        body = []
        for r in self.rows():
            choice = "dense" if r["dense"] else ("default" if r["topk"] is None else
                                                 f"{r['topk']:g} / {r['topp']:g}")
            body.append([r["site"], choice, f(r["predicted_sparsity"], True), f(r["measured_sparsity"], True),
                         f(r["predicted_error"]), f(r["measured_error"]), f(r["measured_max_error"]),
                         r["note"]])
        head = ["site", "topk / topp", "pred. sparsity", "meas. sparsity", "pred. error", "meas. error",
                "worst batch", "note"]
        obj = ", ".join(f"{k}={v:g}" for k, v in self.objective.items() if isinstance(v, (int, float)))
        sm = self.summary
        tail = ""
        if sm:
            tail = (f"\noverall: predicted sparsity {f(sm.get('predicted_sparsity'), True)}, measured "
                    f"{f(sm.get('measured_sparsity'), True)}; mean error predicted "
                    f"{f(sm.get('predicted_error'))}, measured {f(sm.get('measured_error'))}")
            if sm.get("seconds") is not None:
                tail += f"; {sm['seconds']:.1f} s"
            gl = sm.get("global")
            if gl:
                tail += (f"\nfor comparison, one global topk / topp = {gl['topk']:g} / {gl['topp']:g} for "
                         f"every site: sparsity predicted {f(gl.get('predicted_sparsity'), True)}, measured "
                         f"{f(gl.get('measured_sparsity'), True)}; mean error predicted "
                         f"{f(gl.get('predicted_error'))}, measured {f(gl.get('measured_error'))}, worst "
                         f"{f(gl.get('measured_max_error'))}")
        cfg = self.config
        return (f"sparge plan ({obj}; block {cfg.block_q}x{cfg.block_k}, mode {cfg.mode}; errors: relative "
                f"L1 of the attention output vs dense): {len(self.sites)} site(s)\n"
                + tabulate(body, headers=head, disable_numparse=True) + tail)

    def __str__(self):
        return self.table()


__all__ = ["SpargePlan", "PlanSite", "PlanMismatchError", "site_signature"]
