"""The report: every attention site the backend found, rewritten or kept dense and why.

One :class:`GraphReport` per graph the backend compiled; :class:`Report` gathers them for
``sc.explain``. Measured sparsity comes from the last mask each rewritten site used at run time.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from tabulate import tabulate

from ..block_mask import SpargeBlockMask

log = logging.getLogger("sparge_compile.backend")


@dataclass
class SiteReport:
    graph: str
    name: str
    kind: str
    spelling: str
    rewritten: bool
    reason: str
    shapes: dict
    dtype: str
    is_causal: bool = False
    block_q: int | None = None
    block_k: int | None = None
    key: str | None = None     # run-time state key (rewritten sites)
    site_id: str = ""          # stable id: "<module path>#<ordinal>" (what a SpargePlan names)
    state: object = field(default=None, repr=False)   # its site_ops.SiteState (rewritten sites)
    linear: str = ""           # its module's linear branch: "sla", "sla2+router", or why not applied

    @property
    def calls(self) -> int:
        st = self.state
        if st is None:
            return 0
        measured = st.measured()
        return st.calls if measured is None else measured[2]

    @property
    def sparsity(self) -> float | None:
        """1 - kept / visible block pairs of the last mask this site used (None before a run); for
        a site on the native path (no mask kept), over all of its calls so far."""
        st = self.state
        measured = None if st is None else st.measured()
        if measured is not None:
            kept, vis, _ = measured
            return None if vis == 0 else 1.0 - kept / vis
        m = self.block_mask()
        return None if m is None else m.sparsity()

    def block_mask(self):
        """The last :class:`SpargeBlockMask` this site used (None before a run)."""
        st = self.state
        if st is None or st.kv_num_blocks is None:
            return None
        return self._mask((st.kv_num_blocks, st.kv_indices, st.q_len, st.kv_len, st.is_causal))

    def _mask(self, m):
        if m is None:
            return None
        kv_num_blocks, kv_indices, q_len, kv_len, is_causal = m
        return SpargeBlockMask(kv_num_blocks, kv_indices, int(q_len), int(kv_len), self.block_q, self.block_k,
                               is_causal)

    @property
    def config(self):
        """The SpargeConfig the site runs with (rewritten sites), None otherwise."""
        return None if self.state is None else self.state.config

    def instances(self) -> list[dict]:
        """A site of a graph that serves several module instances (blocks compiled alone under a
        plan, see :mod:`sparge_compile.plan_scope`): one entry per instance that ran it, with its
        ``site_id`` (the plan's), ``config``, ``dense`` (kept dense by the plan), ``calls`` and
        ``block_mask`` (its last mask). [] for any other site."""
        st = self.state
        per_owner = getattr(st, "per_owner", None)
        if per_owner is None:
            return []
        return [dict(site_id=i.site_id, config=i.config, dense=i.dense, calls=i.calls,
                     block_mask=self._mask(m)) for i, m in per_owner.views(st)]

    def as_dict(self) -> dict:
        sp = self.sparsity
        return dict(graph=self.graph, site=self.name, site_id=self.site_id, kind=self.kind,
                    spelling=self.spelling,
                    rewritten=self.rewritten, reason=self.reason, shapes=self.shapes, dtype=self.dtype,
                    is_causal=self.is_causal, block_q=self.block_q, block_k=self.block_k,
                    calls=self.calls, sparsity=sp, linear=self.linear, instances=[
                        dict(i, block_mask=None, config=dataclasses.asdict(i["config"]),
                             sparsity=None if i["block_mask"] is None else i["block_mask"].sparsity())
                        for i in self.instances()])


@dataclass
class GraphReport:
    graph: str
    code: object = None           # the code object Dynamo compiled (to find reports per model)
    params: list = field(default_factory=list, repr=False)   # weakrefs to its parameter inputs
    sites: list[SiteReport] = field(default_factory=list)
    inner: str = "inductor"
    serial: int = 0               # compile order (explain lists graphs in it)
    notes: list = field(default_factory=list)   # e.g. a linear branch with no attention site in the graph


class Report:
    """Sites of one or more compiled graphs; ``str(report)`` is a table."""

    def __init__(self, graphs: list[GraphReport]):
        self.graphs = list(graphs)

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def __len__(self):
        return len(self.sites)

    def as_dicts(self) -> list[dict]:
        return [s.as_dict() for s in self.sites]

    def table(self) -> str:
        """One row per site; a site shared by module instances (regional compilation) has one row
        per instance, with the instance's id and choice."""
        rows, linear = [], any(s.linear for s in self.sites)
        for s in self.sites:
            shapes = ["x".join(map(str, s.shapes.get(n, ()))) for n in ("q", "k")]
            insts = s.instances()
            for i in insts or [dict(site_id=s.site_id, config=s.config, dense=not s.rewritten,
                                    block_mask=s.block_mask())]:
                sp = None if i["block_mask"] is None else i["block_mask"].sparsity()
                status = ("dense (plan)" if insts else "dense") if i["dense"] else "sparse"
                rows.append([s.graph, s.name, i["site_id"], s.kind, status, _choice(i["config"], i["dense"]),
                             s.reason, *shapes, s.dtype, "-" if sp is None else f"{sp:.1%}"]
                            + ([s.linear or "-"] if linear else []))
        head = ["graph", "site", "id", "kind", "status", "topk / topp", "reason", "q shape", "k shape",
                "dtype", "sparsity"] + (["linear"] if linear else [])
        n_sparse = len(self.rewritten)
        notes = "".join(f"\n{g.graph}: {n}" for g in self.graphs for n in g.notes)
        return (f"sparge: {len(self.sites)} attention site(s), {n_sparse} rewritten, "
                f"{len(self.sites) - n_sparse} dense\n" + tabulate(rows, headers=head) + notes)

    def __str__(self):
        return self.table()

    __repr__ = __str__


def _choice(cfg, dense: bool) -> str:
    if cfg is None or dense:
        return "-"
    both = f"{cfg.topk:g} / {cfg.topp:g}"
    return {"topk": f"{cfg.topk:g} / -", "topp": f"- / {cfg.topp:g}"}.get(cfg.mode, both)


def log_graph_report(gr: GraphReport) -> None:
    rep = Report([gr])
    log.info("%s", rep.table())
