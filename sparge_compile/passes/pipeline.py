"""The whole pass: graph -> sites -> decisions (config, plan, min_seq_len) -> rewrite -> report."""
from __future__ import annotations

import logging

import torch
from torch import fx

from .. import site_ops
from ..config import SpargeConfig
from ..plan import SpargePlan, plan_choice
from ..plan_scope import InstanceConfigs, graph_scope, qualified_name, site_owner_path
from .canonical import example_value
from .graph import build_graph
from .linear import pair_branches, remove_anchors
from .matcher import AttentionMatch, find_sites, key_length
from .report import GraphReport, SiteReport
from .rewrite import finish, rewrite_site

log = logging.getLogger("sparge_compile.backend")


def module_path(node: fx.Node) -> str:
    """Dotted path of the module that owns ``node``, relative to the compiled root ("" if none),
    from Dynamo's ``nn_module_stack`` ("L['self'].blocks.0.attn" -> "blocks.0.attn")."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return qualified_name(list(stack.values())[-1][0])


def assign_site_ids(sites: list[AttentionMatch], code=None) -> list[str]:
    """Stable ids: ``"<module path>#<ordinal of the site in that module>"`` in graph order.

    The same model compiled again gets the same ids. A graph that starts after a graph break
    (a Dynamo resume function) gets the resume point as a suffix, so its sites stay distinct.
    """
    suffix = ""
    name = getattr(code, "co_name", "") or ""
    if name.startswith("torch_dynamo_resume_in_"):
        suffix = "@" + name[len("torch_dynamo_resume_in_"):]
    counts: dict = {}
    ids = []
    for site in sites:
        path = module_path(site.anchor)
        i = counts.get(path, 0)
        counts[path] = i + 1
        ids.append(f"{path}#{i}{suffix}")
    return ids


def graph_shapes(site: AttentionMatch) -> dict:
    """A site's q/k sizes as the graph has them, symbolic sizes kept as SymInts (``site.shapes``
    has them as strings), so that the plan's check can compare and guard on them."""
    try:
        if site.kind == "mha":
            evs = {n: example_value(site.mha_args[a]) for n, a in (("q", "query"), ("k", "key"))}
            if all(isinstance(e, torch.Tensor) for e in evs.values()):
                return {n: tuple(e.shape) for n, e in evs.items()}
        elif site.q is not None and site.k is not None:
            return {"q": site.q.shape(), "k": site.k.shape()}
    except (KeyError, TypeError, AttributeError):
        pass
    return site.shapes


def _short(nk, min_len: int) -> bool:
    """nk < min_len; on a symbolic length this installs a guard (crossing it recompiles)."""
    if min_len <= 0:
        return False
    return bool(nk < min_len)


def _plan_scope(plan, sites, ids, owner, owner_param, graph_name, capture):
    """Check the graph against a SpargePlan: per module instance when the graph's root is a
    submodule of the plan's bound model (regional compilation, see plan_scope), else by id."""
    scope = None if capture else graph_scope(plan, owner, owner_param, graph_name)
    if scope is not None:
        shapes = [graph_shapes(s) for s in sites]
        for sid, s, sh in zip(ids, sites, shapes):
            static = all(isinstance(x, int) for n in ("q", "k") for x in sh.get(n, ()))
            scope.sites.append((sid, s.kind, sh if static else None))   # for the other instances
        scope.check(scope.prefix, shapes)   # the instance it is compiled from: sizes may be symbolic
    elif isinstance(plan, SpargePlan):
        plan.check_graph([(sid, s.kind, graph_shapes(s)) for sid, s in zip(ids, sites)], graph_name)
    return scope


def sparsify_graph(gm: fx.GraphModule, config: SpargeConfig, plan=None, graph_name: str = "graph",
                   code=None, capture: bool = False, owner: fx.Node | None = None,
                   owner_param=None) -> GraphReport:
    """Find every attention site in ``gm``, rewrite the ones that qualify; return the report.

    code: the code object Dynamo compiled (names the sites of a graph after a graph break).
    capture: rewrite qualifying sites to the calibration capture op (dense attention that
    reports its q, k, v to :mod:`sparge_compile.calibration`) instead of the sparse op.
    plan: a plan as :func:`sparge_compile.plan.resolve_plan` returns it.
    owner: a placeholder holding a parameter of the compiled model (see ``explain``), and
    owner_param that parameter (locates the graph's root in a plan's bound model).
    Each rewritten site's :class:`~sparge_compile.site_ops.SiteState` is held by its SiteReport.
    """
    g = build_graph(gm)
    sites = find_sites(gm, g)
    ids = assign_site_ids(sites, code)
    scope = _plan_scope(plan, sites, ids, owner, owner_param, graph_name, capture)
    branches, linear_reasons, notes = pair_branches(gm, sites)
    for msg in notes + [f"{sid}: linear branch {why}" for sid, why in zip(ids, linear_reasons) if why]:
        log.warning("sparge: graph %s: %s", graph_name, msg)
    report = GraphReport(graph=graph_name, notes=notes)
    replaced: dict = {}
    for site, sid, branch, why in zip(sites, ids, branches, linear_reasons):
        info = SiteReport(graph_name, site.name, site.kind, site.spelling, site.rewrite, site.reason,
                          site.shapes, site.dtype, site.is_causal, site_id=sid)
        cfg = config
        if site.rewrite:
            cfg = plan_choice(plan, info, config) if scope is None else scope.compile_choice(sid, config)
            if cfg is None:
                site.dense("kept dense by the plan")
        if site.rewrite and capture and site.key_padding is not None:
            site.dense("key-padding mask: calibration does not capture it yet (runs dense)")
        if site.rewrite:
            nk = key_length(site)
            if _short(nk, cfg.min_seq_len):
                site.dense(f"short: key length {nk} < min_seq_len {cfg.min_seq_len}")
        info.rewritten, info.reason = site.rewrite, site.reason
        info.linear = _linear_label(site, branch, why, capture)
        if site.rewrite:
            key, info.state = site_ops.new_site(f"{graph_name}/{site.name}", cfg)
            if scope is not None:
                info.state.per_owner = _per_owner(scope, site, sid, config)
            rewrite_site(gm, site, cfg, key, replaced, capture=capture, owner=owner, state=info.state,
                         linear=None if capture else branch)
            info.key, info.block_q, info.block_k = key, cfg.block_q, cfg.block_k
        report.sites.append(info)
    if remove_anchors(gm) or replaced:
        finish(gm)
    return report


def _linear_label(site: AttentionMatch, branch, why: str, capture: bool) -> str:
    """The report's ``linear`` entry: the paired branch's combine, or why a branch is not applied."""
    if branch is None:
        return why
    if capture:
        return f"{branch.label}: not applied (calibration runs dense)"
    return branch.label if site.rewrite else f"{branch.label}: not applied (dense site)"


def _per_owner(scope, site, sid: str, config: SpargeConfig) -> InstanceConfigs:
    path = site_owner_path(site, scope)
    if path is None:
        from ..plan import PlanMismatchError

        raise PlanMismatchError(f"sparge: site {sid!r} of graph {scope.graph}: no parameter tells which "
                                "module instance runs it, so a per-block plan cannot apply; compile the "
                                "whole model")
    return InstanceConfigs(scope, sid, site.kind, path, config)
