"""A plan applied per module instance: how a SpargePlan reaches the blocks under regional compilation.

diffusers' ``transformer.compile_repeated_blocks(backend="sparge")`` compiles each repeated block
on its own, and Dynamo reuses one graph for every block of a class. That graph's sites are named
from the block ("attn1#0"); a plan names them from the model's root ("blocks.3.attn1#0"). A plan
bound to the model (``calibrate`` binds the plan it returns; ``SpargePlan.load(path).bind(model)``)
applies per instance:

* compile time: the graph's root is located in the bound model through the parameter the graph
  was compiled with (its Dynamo source gives its path inside the root, the model its qualified
  name: the difference is the root's path, e.g. ``"blocks.0."``); the plan is checked for that
  instance as a whole-model graph is. A site every instance of which the plan keeps dense stays
  dense; otherwise it is rewritten and the choice is made per call:
* run time: each call of a rewritten site carries one parameter of the module that ran it (the
  ``owner`` of :mod:`sparge_compile.site_ops`); :meth:`SiteState.config_for` asks this module for
  the config of the owner's instance. The owner is found by ``data_ptr`` in a cache whose entries
  keep a weak reference to the parameter and are used only while that parameter is alive and
  still at that address, so a freed or reused address never picks another block.

A site an instance keeps dense (where other instances are sparse) runs the sparse op with every
key block kept (mode "topk", topk 1): the same function as dense attention. Anything that cannot
be resolved raises :class:`PlanMismatchError`: a module not in the bound model, a parameter shared
by instances whose choices differ, an instance with no site in a strict plan, other shapes.

Graphs whose root is the bound model itself (the whole model compiled) keep the plain path: site
ids are the plan's, one state per site, nothing per call.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

from .config import SpargeConfig
from .plan import PlanMismatchError, SpargePlan

_ROOT = re.compile(r"^[LG]\[(['\"])[^'\"]*\1\]\.?")


def qualified_name(path: str) -> str:
    """A Dynamo source or module-stack path as the model's qualified name:
    ``L['self'].__dict__['_modules']['blocks'].0._parameters['w']`` -> ``blocks.0.w`` (the root
    local or global name is dropped, so compiling the model or a function calling it agree)."""
    path = "." + _ROOT.sub("", str(path))
    path = re.sub(r"\.__dict__\[(['\"])_modules\1\]", "", path)   # ModelMixin's module access
    path = re.sub(r"\._(?:modules|parameters|buffers)\[(['\"])([^'\"]*)\1\]", r".\2", path)
    path = re.sub(r"\[(['\"])([^'\"]*)\1\]", r".\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".")


class ParamIndex:
    """A model's parameters by ``data_ptr``: ptr -> (weak reference to the parameter, its
    qualified names). Rebuilt when a lookup misses or finds a dead or moved parameter."""

    def __init__(self, model: torch.nn.Module):
        self.model = weakref.ref(model)
        self._map: dict = {}

    def names(self, t: torch.Tensor) -> list[str]:
        """The qualified names of the bound model's parameter at ``t``'s address ([] if none)."""
        ptr = t.data_ptr()
        hit = self._map.get(ptr)
        if hit is None or not _alive(hit[0], ptr):
            self._rebuild()
            hit = self._map.get(ptr)
        return list(hit[1]) if hit is not None and _alive(hit[0], ptr) else []

    def param(self, t: torch.Tensor):
        hit = self._map.get(t.data_ptr())
        return None if hit is None else hit[0]

    def _rebuild(self) -> None:
        model, self._map = self.model(), {}
        if model is None:
            return
        for name, p in model.named_parameters(remove_duplicate=False):
            self._map.setdefault(p.data_ptr(), (weakref.ref(p), []))[1].append(name)


def _alive(ref, ptr: int) -> bool:
    p = ref()
    return p is not None and p.data_ptr() == ptr


def source_path(node) -> str | None:
    """A graph input's path inside the compiled root (``"attn1.to_q.weight"``), None if unknown."""
    ga = None if node is None else node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    name = getattr(src, "name", None)
    name = name() if callable(name) else name
    return None if not isinstance(name, str) else qualified_name(name)


def full_id(prefix: str, sid: str) -> str:
    """An instance's site id: ``"blocks.3." + "attn1#0"``; a site at the block's root: "blocks.3#0"."""
    return prefix.rstrip(".") + sid if sid[:1] in ("#", "@") else prefix + sid


def _choice(entry):
    return None if entry is None else (entry.topk, entry.topp, entry.dense)


def dense_config(cfg: SpargeConfig) -> SpargeConfig:
    """Every visible key block kept: dense attention through the sparse op."""
    return cfg.replace(topk=1.0, topp=1.0, mode="topk", theta=None)


@dataclass
class Instance:
    """One module instance of a shared site: its config, calls, and its last mask (as SiteState's)."""

    site_id: str
    config: SpargeConfig
    dense: bool = False
    calls: int = 0
    mask: tuple | None = None   # (kv_num_blocks, kv_indices, q_len, kv_len, is_causal)


class GraphScope:
    """The plan's view of one graph compiled from a submodule of the bound model."""

    def __init__(self, plan: SpargePlan, owner_path: str, prefix: str, graph: str):
        self.plan, self.index, self.graph = plan, plan.index, graph
        self.owner_path, self.prefix = owner_path, prefix
        self.sites: list = []    # (local id, kind, static shapes or None)
        self._checked: set = set()

    def prefix_of(self, owner: torch.Tensor, owner_path: str) -> str:
        """The path (``"blocks.3."``) of the instance whose parameter ``owner`` is."""
        names = [n for n in self.index.names(owner) if n == owner_path or n.endswith("." + owner_path)]
        prefixes = sorted({n[:len(n) - len(owner_path)] for n in names})
        if not prefixes:
            raise PlanMismatchError(
                f"sparge plan does not match this model: graph {self.graph} ran with a module that is not "
                f"part of the model the plan is bound to (its parameter {owner_path!r} is not in it); bind "
                "the plan to the model that runs: plan.bind(model)")
        if len(prefixes) > 1:
            choices = {tuple(_choice(self.plan.sites.get(full_id(p, s))) for s, _, _ in self.sites)
                       for p in prefixes}
            if len(choices) > 1:
                raise PlanMismatchError(
                    f"sparge plan cannot be applied per block: parameter {owner_path!r} is shared by "
                    f"{[p.rstrip('.') for p in prefixes]}, whose plan choices differ, so a call cannot tell "
                    "which of them ran; compile the whole model instead of its blocks")
        return prefixes[0]

    def check(self, prefix: str, shapes: list | None = None) -> None:
        """The plan checked for one instance (once): the whole-model rules, on its full ids, with
        ``shapes`` (the graph's own sizes, at compile time) or the static sizes recorded."""
        if prefix in self._checked:
            return
        shapes = shapes or [sh for _, _, sh in self.sites]
        sites = [(full_id(prefix, sid), kind, sh) for (sid, kind, _), sh in zip(self.sites, shapes)
                 if sh is not None]
        self.plan.check_graph(sites, f"{self.graph} (instance {prefix.rstrip('.') or '<root>'})")
        if self.plan.strict and self.plan.sites and not any(
                full_id(prefix, sid) in self.plan.sites for sid, _, _ in self.sites):
            raise PlanMismatchError(
                f"sparge plan does not match this model: graph {self.graph} runs as "
                f"{prefix.rstrip('.')!r}, none of whose sites ({[s for s, _, _ in self.sites][:4]}) is in "
                "the plan; calibrate this model, or set plan.strict = False")
        self._checked.add(prefix)

    def instances(self, sid: str) -> list[str]:
        """Prefixes of the bound model's instances of this graph that the plan names ``sid`` in."""
        model = self.index.model()
        names = [] if model is None else [n for n, _ in model.named_parameters(remove_duplicate=False)]
        found = {n[:len(n) - len(self.owner_path)] for n in names
                 if n == self.owner_path or n.endswith("." + self.owner_path)}
        return sorted(p for p in found | {self.prefix} if full_id(p, sid) in self.plan.sites)

    def compile_choice(self, sid: str, default: SpargeConfig):
        """The config to compile the site with, or None (dense) when the plan keeps every instance dense."""
        cfgs = [self.plan.site_config(full_id(p, sid), default) for p in self.instances(sid)]
        cfgs = cfgs or [self.plan.site_config(full_id(self.prefix, sid), default)]
        return next((c for c in cfgs if c is not None), None)


class InstanceConfigs:
    """``SiteState.per_owner`` of a site in a graph shared by module instances: the config of the
    instance that owns each call's ``owner``, and each instance's calls and last mask.

    The state's last-mask fields, when :meth:`__call__` runs (before the call predicts its mask),
    hold the previous call's mask: it is filed under the previous call's instance here.
    """

    def __init__(self, scope: GraphScope, sid: str, kind: str, owner_path: str, default: SpargeConfig):
        self.scope, self.sid, self.kind, self.owner_path, self.default = scope, sid, kind, owner_path, default
        self.instances: dict[str, Instance] = {}
        self._by_ptr: dict = {}    # data_ptr -> (weakref to the parameter, Instance)
        self._last: Instance | None = None

    def __call__(self, st, owner: torch.Tensor | None) -> SpargeConfig:
        if owner is None:
            raise PlanMismatchError(f"sparge: site {self.sid!r} of graph {self.scope.graph} ran with no "
                                    "parameter to tell its module instance; compile the whole model")
        ptr = owner.data_ptr()
        hit = self._by_ptr.get(ptr)
        inst = hit[1] if hit is not None and _alive(hit[0], ptr) else self._resolve(owner, ptr)
        if self._last is not None and st.kv_num_blocks is not None:
            self._last.mask = (st.kv_num_blocks, st.kv_indices, st.q_len, st.kv_len, st.is_causal)
        inst.calls += 1
        self._last = inst
        return inst.config

    def _resolve(self, owner: torch.Tensor, ptr: int) -> Instance:
        prefix = self.scope.prefix_of(owner, self.owner_path)
        self.scope.check(prefix)
        sid = full_id(prefix, self.sid)
        inst = self.instances.get(sid)
        if inst is None:
            cfg = self.scope.plan.site_config(sid, self.default)
            inst = self.instances[sid] = Instance(sid, dense_config(self.default) if cfg is None else cfg,
                                                  dense=cfg is None)
        self._by_ptr[ptr] = (self.scope.index.param(owner), inst)
        return inst

    def replace(self, **changes) -> None:
        """``SpargeBackend.set_config``: the change for every sparse instance (dense ones stay dense)."""
        self.default = self.default.replace(**changes)
        for inst in self.instances.values():
            if not inst.dense:
                inst.config = inst.config.replace(**changes)

    def views(self, st) -> list[tuple[Instance, tuple | None]]:
        """(instance, its last mask) in id order; the last caller's mask is still in the state."""
        live = None if st.kv_num_blocks is None else (st.kv_num_blocks, st.kv_indices, st.q_len, st.kv_len,
                                                      st.is_causal)
        return [(i, live if i is self._last else i.mask) for _, i in sorted(self.instances.items())]


def graph_scope(plan, owner_node, owner_param, graph: str) -> GraphScope | None:
    """The scope of a graph compiled from a strict submodule of the plan's bound model, else None
    (no bound plan, or the whole model compiled: the plain path)."""
    if not isinstance(plan, SpargePlan) or plan.index is None or owner_param is None:
        return None
    path = source_path(owner_node)
    if path is None:
        return None
    names = [n for n in plan.index.names(owner_param) if n == path or n.endswith("." + path)]
    prefixes = sorted({n[:len(n) - len(path)] for n in names})
    if not prefixes or "" in prefixes:
        return None
    return GraphScope(plan, path, prefixes[0], graph)


def site_owner_path(site, scope: GraphScope) -> str | None:
    """The path, inside the graph's root, of the parameter a site's calls carry as their owner:
    the graph's owner, or an ``nn.MultiheadAttention``'s own projection weight."""
    if site.kind != "mha":
        return scope.owner_path
    a = site.mha_args
    node = a.get("in_proj_weight") if a.get("in_proj_weight") is not None else a.get("q_proj_weight")
    return source_path(node) if hasattr(node, "meta") else None
