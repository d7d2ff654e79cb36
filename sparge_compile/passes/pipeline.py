"""The whole pass: graph -> sites -> decisions (config, plan, min_seq_len) -> rewrite -> report."""
from __future__ import annotations

from torch import fx

from ..config import SpargeConfig
from . import runtime
from .graph import build_graph
from .matcher import Site, find_sites, key_length
from .report import GraphReport, SiteReport
from .rewrite import finish, rewrite_site


def _plan_config(plan, site: Site, info: SiteReport, config: SpargeConfig):
    """A site's config from the plan: a SpargeConfig, or None to keep it dense."""
    if plan is None:
        return config
    choice = plan(info) if callable(plan) else plan.get(site.name, plan.get("*", config))
    if choice is None or choice is False or choice == "dense":
        return None
    if choice is True or choice == "sparse":
        return config
    if isinstance(choice, dict):
        return config.replace(**choice)
    if isinstance(choice, SpargeConfig):
        return choice
    raise TypeError(f"plan for site {site.name!r} must be a SpargeConfig, dict, bool, 'dense' or None, "
                    f"got {type(choice).__name__}")


def _short(nk, min_len: int) -> bool:
    """nk < min_len; on a symbolic length this installs a guard (crossing it recompiles)."""
    if min_len <= 0:
        return False
    return bool(nk < min_len)


def sparsify_graph(gm: fx.GraphModule, config: SpargeConfig, plan=None, graph_name: str = "graph",
                   ) -> GraphReport:
    """Find every attention site in ``gm``, rewrite the ones that qualify; return the report."""
    g = build_graph(gm)
    sites = find_sites(gm, g)
    report = GraphReport(graph=graph_name, config=config)
    replaced: dict = {}
    for site in sites:
        info = SiteReport(graph_name, site.name, site.kind, site.spelling, site.rewrite, site.reason,
                          site.shapes, site.dtype, site.is_causal)
        cfg = config
        if site.rewrite:
            cfg = _plan_config(plan, site, info, config)
            if cfg is None:
                site.dense("kept dense by the plan")
        if site.rewrite:
            nk = key_length(site)
            if _short(nk, cfg.min_seq_len):
                site.dense(f"short: key length {nk} < min_seq_len {cfg.min_seq_len}")
        info.rewritten, info.reason = site.rewrite, site.reason
        if site.rewrite:
            key = runtime.new_site_key(f"{graph_name}/{site.name}")
            runtime.register_site(key, cfg)
            rewrite_site(gm, site, cfg, key, replaced)
            info.key, info.block_q, info.block_k = key, cfg.block_q, cfg.block_k
        report.sites.append(info)
    if replaced:
        finish(gm)
    return report
