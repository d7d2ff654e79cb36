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

A plan holds the fixed lengths it was calibrated at. Under dynamic shapes (Dynamo recompiling
with symbolic sizes, or ``dynamic=True``) the check compares each symbolic size with the
recorded ones, which installs a guard: the compiled graph is specialised to a calibrated length
and any other length recompiles and raises :class:`PlanMismatchError`, as a static graph does.
The batch dimension is not part of a plan's shapes and stays dynamic.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

from .config import SpargeConfig
from .validate import is_real

FORMAT = "sparge-plan"
VERSION = 1


class PlanMismatchError(ValueError):
    """The plan was made for a different model (site ids or shapes do not match)."""


class PlanFormatError(ValueError):
    """A saved plan is not valid: not JSON, a missing field, or a field of the wrong type or range."""


class _Undecidable(Exception):
    """A graph size that cannot be compared with the plan's (symbolic with no value to guard on)."""


def site_signature(kind: str, shapes: dict) -> dict:
    """A site's shapes without the batch dimension: ``{"q": [...], "k": [...]}``.

    Op layout (sdpa, hand-written): q (B, H, N, D) -> [H, N, D]; rank 3 (B*H, N, D) -> [N, D].
    MultiheadAttention: q (L, B, E) -> [L, E]; unbatched (L, E) stays. A symbolic size
    (``torch.SymInt``) is kept as it is, so that :meth:`SpargePlan.check_graph` can guard on it;
    other non-int sizes become strings.
    """
    out = {}
    for name in ("q", "k"):
        s = list(shapes.get(name, ()))
        if kind == "mha":
            if len(s) == 3:
                s = [s[0], s[2]]
        elif len(s) >= 3:
            s = s[1:]
        out[name] = [int(x) if isinstance(x, int) else x if isinstance(x, torch.SymInt) else str(x)
                     for x in s]
    return out


def _dim_matches(rec, cur) -> bool:
    """One size against the recorded one. A recorded string (a symbolic size at calibration)
    matches anything. A SymInt is compared with the recorded int, which guards on it (the graph
    is specialised to that size when it matches); a size with no value to compare raises
    :class:`_Undecidable`, never a silent match."""
    if isinstance(rec, str):
        return True
    if isinstance(cur, int):
        return cur == rec
    if isinstance(cur, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        try:
            return bool(cur == rec)
        except GuardOnDataDependentSymNode as e:
            raise _Undecidable(str(cur)) from e
    raise _Undecidable(str(cur))


def _sig_matches(rec: dict, cur: dict) -> bool:
    for name in ("q", "k"):
        a, b = rec.get(name, []), cur.get(name, [])
        if len(a) != len(b):
            return False
        if not all(_dim_matches(x, y) for x, y in zip(a, b)):
            return False
    return True


def _is_symbolic(sig: dict) -> bool:
    return any(not isinstance(x, int) for n in ("q", "k") for x in sig.get(n, []))


def _fmt_dim(x) -> str:
    """A size for a message; a symbolic one with its value in this compile (``s27=192``)."""
    hint = getattr(getattr(x, "node", None), "hint", None) if isinstance(x, torch.SymInt) else None
    return f"({x}={hint})" if hint is not None else str(x)


def _fmt_sig(sig: dict) -> str:
    return ", ".join(f"{n}={'x'.join(map(_fmt_dim, sig.get(n, [])))}" for n in ("q", "k"))


def _shape_mismatch(sid: str, sig: dict, recorded: list, undecidable: bool = False) -> PlanMismatchError:
    seen = "; ".join(_fmt_sig(r) for r in recorded)
    msg = (f"sparge plan does not match this model: site {sid!r} has shapes {_fmt_sig(sig)} (batch left "
           f"out) but the plan was calibrated with {seen}")
    if not _is_symbolic(sig):
        return PlanMismatchError(msg + "; calibrate this model (or this resolution) again")
    why = ("sizes that cannot be compared with the plan's (data-dependent)" if undecidable else
           "symbolic sizes (Dynamo recompiled it dynamic after seeing another length, dynamic=True, "
           "or mark_dynamic)")
    return PlanMismatchError(
        f"{msg}. This graph is dynamic, with {why}, and a plan applies only at the fixed lengths it was "
        "calibrated at: calibrate with batches of this length too, or compile with dynamic=False "
        "(or torch._dynamo.mark_static on the sequence dimension) and call at the calibrated lengths")


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


# ------------------------------------------------------------------ validating a loaded plan
_SITE_STATS = ("predicted_sparsity", "predicted_error", "measured_sparsity", "measured_error",
               "measured_max_error")


def _bad(where: str, name: str, what: str, got) -> PlanFormatError:
    return PlanFormatError(f"{where}: field {name!r} must be {what}, got {got!r}")


def _check_plan_dict(d, where: str) -> None:
    """The top level of a plan's dict form; then every site (:func:`_check_site`)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PlanFormatError(f"{where}: not a sparge plan (expected format {FORMAT!r})")
    if d.get("version") != VERSION:
        raise PlanFormatError(f"{where}: sparge plan version {d.get('version')!r} is not supported (this is "
                              f"version {VERSION}); calibrate again")
    if "config" not in d:
        raise PlanFormatError(f"{where}: field 'config' is missing (the calibration's SpargeConfig)")
    for name in ("config", "sites", "objective", "summary", "meta"):
        if name in d and not isinstance(d[name], dict):
            raise _bad(where, name, "an object", d[name])
    if not isinstance(d.get("strict", True), bool):
        raise _bad(where, "strict", "a bool (true/false)", d["strict"])
    for sid, site in d.get("sites", {}).items():
        _check_site(f"{where}: site {sid!r}", site)


def _check_site(where: str, d) -> None:
    if not isinstance(d, dict):
        raise PlanFormatError(f"{where} must be an object, got {d!r}")
    for name in ("topk", "topp"):
        x = d.get(name)
        if x is not None and not (is_real(x) and 0.0 <= x <= 1.0):
            raise _bad(where, name, "a number in [0, 1] or null", x)
    if (d.get("topk") is None) != (d.get("topp") is None):
        raise _bad(where, "topp" if d.get("topp") is None else "topk",
                   "given together with the other of topk / topp (or both null)", None)
    if not isinstance(d.get("dense", False), bool):
        raise _bad(where, "dense", "a bool (true/false)", d["dense"])
    for name in ("kind", "note"):
        if not isinstance(d.get(name, ""), str):
            raise _bad(where, name, "a string", d[name])
    for name in _SITE_STATS:
        if d.get(name) is not None and not is_real(d[name]):
            raise _bad(where, name, "a number or null", d[name])
    _check_shapes(where, d.get("shapes", []))


def _is_dim(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or isinstance(x, str)


def _check_shapes(where: str, shapes) -> None:
    what = 'a list of {"q": [sizes], "k": [sizes]} with sizes non-negative ints'
    if not isinstance(shapes, list):
        raise _bad(where, "shapes", what, shapes)
    for sig in shapes:
        if not isinstance(sig, dict):
            raise _bad(where, "shapes", what, sig)
        for n in ("q", "k"):
            dims = sig.get(n, [])
            if not isinstance(dims, list) or not all(_is_dim(x) for x in dims):
                raise _bad(where, "shapes", what, sig)


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
        """A plan from its :meth:`to_dict` form, validated (:class:`PlanFormatError`, a ValueError)."""
        return cls._parse(d, "sparge plan")

    @classmethod
    def _parse(cls, d, where: str) -> SpargePlan:
        _check_plan_dict(d, where)
        try:
            config = SpargeConfig(**d["config"])
        except (TypeError, ValueError) as e:
            raise PlanFormatError(f"{where}: field 'config': {e}") from e
        return cls(config=config,
                   sites={sid: PlanSite.from_dict(s) for sid, s in d.get("sites", {}).items()},
                   objective=dict(d.get("objective", {})), summary=dict(d.get("summary", {})),
                   meta=dict(d.get("meta", {})), strict=d.get("strict", True))

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
        """Read a saved plan; a file that is not a valid plan raises :class:`PlanFormatError` (a
        ValueError) naming the file and, where it is one, the site and the field."""
        try:
            d = json.loads(Path(path).read_text())
        except UnicodeDecodeError as e:
            raise PlanFormatError(f"{path}: not a sparge plan (not a text file: {e})") from e
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"{path}: not a sparge plan (invalid JSON at line {e.lineno} column "
                                  f"{e.colno}: {e.msg})") from e
        return cls._parse(d, str(path))

    # ------------------------------------------------------------------ applying it
    def bind(self, model) -> "SpargePlan":
        """Tie the plan to the model it names (weakly; ``calibrate`` binds the plan it returns), so
        that it applies per module instance when blocks are compiled alone, one graph serving
        every block (diffusers' ``compile_repeated_blocks``; see :mod:`sparge_compile.plan_scope`).
        Returns the plan."""
        from .plan_scope import ParamIndex

        self._index = ParamIndex(getattr(model, "_orig_mod", model))
        return self

    @property
    def index(self):
        """The :class:`~sparge_compile.plan_scope.ParamIndex` of the bound model, or None."""
        return getattr(self, "_index", None)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_index", None)   # the binding is to a live model: not saved
        return state

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
        has sites and none of them is in the plan. Give the graph's own sizes (SymInts kept):
        a symbolic size is compared with the plan's, which guards the graph on it."""
        for sid, kind, shapes in sites:
            entry = self.sites.get(sid)
            if entry is None or not entry.shapes:
                continue
            sig = site_signature(kind, shapes)
            try:
                ok = any(_sig_matches(r, sig) for r in entry.shapes)
            except _Undecidable:
                raise _shape_mismatch(sid, sig, entry.shapes, undecidable=True) from None
            if not ok:
                raise _shape_mismatch(sid, sig, entry.shapes)
        if not self.strict or not sites or not self.sites or any(s[0] in self.sites for s in sites):
            return
        ids = [s[0] for s in sites]
        have = ", ".join(repr(s) for s in ids[:4]) + (" ..." if len(ids) > 4 else "")
        want = ", ".join(repr(s) for s in list(self.sites)[:4]) + (" ..." if len(self.sites) > 4 else "")
        raise PlanMismatchError(
            f"sparge plan does not match this model: graph {graph} has attention sites {have}, none of "
            f"which is in the plan (its sites: {want}). A plan is made for one model, compiled whole "
            "(site ids are module paths from the compiled root); calibrate this model, or set "
            "plan.strict = False to use the default config for unknown graphs. Blocks compiled alone "
            "(compile_repeated_blocks) need the plan bound to the whole model: plan.bind(model)")

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


__all__ = ["PlanFormatError", "PlanMismatchError", "PlanSite", "SpargePlan", "site_signature"]


# ---------------------------------------------------------------------- resolving a plan option
def resolve_plan(plan):
    """The one place a ``plan`` option is read: None, a :class:`SpargePlan` (or the path of a saved
    one, or its dict), a dict ``{site id: choice}`` (key ``"*"`` for the rest) or a callable
    ``plan(site_report) -> choice``. Returns None, a SpargePlan, a dict or the callable."""
    if isinstance(plan, (str, os.PathLike)):
        return SpargePlan.load(plan)
    if isinstance(plan, dict) and plan.get("format") == FORMAT:
        return SpargePlan.from_dict(plan)
    if plan is None or isinstance(plan, SpargePlan) or callable(plan):
        return plan
    if not isinstance(plan, dict):
        raise TypeError(f"sparge: plan must be a SpargePlan, a path to a saved one, a dict or a callable, "
                        f"got {type(plan).__name__}")
    bad = [key for key in plan if not (isinstance(key, str) and (key == "*" or "#" in key))]
    if bad:
        raise ValueError(f"sparge: plan keys are site ids such as 'blocks.0.attn#0' (the 'id' column of "
                         f"sc.explain(model)) or '*', got {bad}")
    return plan


def plan_choice(plan, info, config: SpargeConfig):
    """A site's config under a resolved plan (``info``: its SiteReport): a SpargeConfig, or None
    to keep it dense."""
    if plan is None:
        return config
    sid = info.site_id
    if isinstance(plan, SpargePlan):
        return plan.site_config(sid, config)
    choice = plan(info) if callable(plan) else plan.get(sid, plan.get("*", config))
    if choice is None or choice is False or choice == "dense":
        return None
    if choice is True or choice == "sparse":
        return config
    if isinstance(choice, dict):
        return config.replace(**choice)
    if isinstance(choice, SpargeConfig):
        return choice
    raise TypeError(f"sparge: plan for site {sid!r} must be a SpargeConfig, a dict of its fields, a bool, "
                    f"'dense' or None, got {type(choice).__name__}")
