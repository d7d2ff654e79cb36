"""Pair attention sites with the linear branches of their modules (SLA / SLA2, issue 19).

:func:`sparge_compile.enable_linear_branch` gives each chosen module a forward pre-hook that, under
torch.compile, calls ``sparge::linear_anchor`` on the branch's parameters. In Dynamo's graph that
node's inputs are the parameters (graph inputs: under regional compilation, those of the block
that runs) and its ``nn_module_stack`` names the module call it belongs to. A site is paired with
the anchors of the innermost module call on its own stack that has any (a branch on the attention
module, or on a block above it). The pairing holds only for one anchor and one attention call in
that module call; anything else (two attention calls for one branch, an ``nn.MultiheadAttention``
site, a key-padding mask) keeps its sites sparse-only, with the reason in the report's ``linear``
column. An anchor with no attention call in its graph is noted on the graph's report (and logged):
a graph break between the module's start and its attention, or a branch on the module that is
itself the compiled root (``torch.compile(attn)``): Dynamo compiles the root's hooks as a graph
of their own, so that branch is not applied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..linear_branch import check_fits
from ..plan_scope import qualified_name
from .canonical import example_value
from .matcher import AttentionMatch


@dataclass
class Branch:
    """A paired site's branch: its parameters' graph nodes and its spec (LinearBranch.spec())."""

    params: list
    combine: str
    feature_map: str
    eps: float
    router: bool
    num_heads: int
    module: str

    @property
    def label(self) -> str:
        return self.combine + ("+router" if self.router else "")

    def args(self) -> tuple:
        return (list(self.params), self.combine, self.feature_map, self.eps, self.router, self.num_heads)


def _anchor_op():
    from .. import ops_linear  # noqa: F401  (registers the op)

    return torch.ops.sparge.linear_anchor.default


def anchors(gm: fx.GraphModule) -> list[fx.Node]:
    target = _anchor_op()
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _stack(node: fx.Node) -> list:
    """The node's module calls, outermost first: (key, qualified path); a module called twice
    has a key per call ("<id>", "<id>@1")."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, qualified_name(val[0])) for key, val in stack.items()]


def pair_branches(gm: fx.GraphModule, sites: list[AttentionMatch]):
    """([Branch | None per site], [reason per site: why a branch of its module is not applied, or ""],
    [notes on the graph: anchors with no site]). Sites of modules without a branch get (None, "")."""
    by_call: dict = {}
    for a in anchors(gm):
        st = _stack(a)
        by_call.setdefault(st[-1] if st else ("", ""), []).append(a)
    groups: dict = {}
    for i, site in enumerate(sites):
        call = next((c for c in reversed(_stack(site.anchor)) if c in by_call), None)
        if call is not None:
            groups.setdefault(call, []).append(i)
    branches, reasons = [None] * len(sites), [""] * len(sites)
    for call, members in groups.items():
        found, path = by_call[call], call[1] or "<root>"
        if len(found) != 1 or len(members) != 1:
            for i in members:
                reasons[i] = (f"not applied: {len(members)} attention call(s) and {len(found)} branch(es) in "
                              f"one call of {path}")
            continue
        i, site = members[0], sites[members[0]]
        if site.kind == "mha":
            reasons[i] = "not applied: nn.MultiheadAttention sites have no linear branch yet"
        elif site.key_padding is not None:
            reasons[i] = "not applied: key-padding mask (the linear branch does not support it)"
        else:
            params, *spec = found[0].args
            branches[i] = Branch(list(params), *spec, module=path)
            _check_shapes(site, branches[i])
    notes = [f"linear branch of {call[1] or '<root>'}: not applied, no attention call in its graph (a "
             "graph break, or its module is the compiled root, whose hooks Dynamo compiles apart: compile a "
             "module above it)" for call in by_call if call not in groups]
    return branches, reasons, notes


def _check_shapes(site: AttentionMatch, branch: Branch) -> None:
    """The branch was made for this site's head dim and head count (else a ValueError naming the
    value to attach it with), checked on the graph's example values."""
    q = example_value(site.q.node)
    params = [example_value(p) for p in branch.params]
    if not isinstance(q, torch.Tensor) or not all(isinstance(p, torch.Tensor) for p in params):
        return
    if site.q.perm is not None:
        q = q.permute(*site.q.perm)
    check_fits(q, params, branch.combine, branch.router, branch.num_heads,
               f"the linear branch of {branch.module!r}")


def remove_anchors(gm: fx.GraphModule) -> bool:
    """Erase the anchors (they compute nothing); True if there were any."""
    found = [a for a in anchors(gm) if not a.users]
    for a in found:
        gm.graph.erase_node(a)
    return bool(found)
