"""Keep Inductor's attention fusion away from softmaxes over a non-last axis.

Inductor's scaled-dot-product pattern matcher (``torch/_inductor/fx_passes/fuse_attention.py``)
rewrites ``softmax(q @ kᵀ * s, dim=-2) @ v`` as attention over the *last* axis
(pytorch/pytorch#196468): a wrong answer for a site the sparge matcher rightly keeps dense. The
backend owns the call into Inductor, so before handing a graph over it spells every softmax
over axis ``d != -1`` as ``softmax(x.transpose(d, -1), -1).transpose(d, -1)``: the same
function, which no attention pattern matches.
"""
from __future__ import annotations

import torch
from torch import fx

from .canonical import canonicalize


def _off_last_axis(node: fx.Node, gm: fx.GraphModule):
    """The canonical view of a softmax over a non-last axis, else None."""
    c = canonicalize(node, gm)
    if c.kind != "softmax" or c.args.get("rank") is None or c.args.get("dim") is None:
        return None
    return c if c.args["rank"] >= 2 and c.args["dim"] != c.args["rank"] - 1 else None


def shield_softmax_axes(gm: fx.GraphModule) -> int:
    """Rewrite each softmax over a non-last axis in ``gm`` as transpose-softmax(-1)-transpose.

    Returns how many were rewritten (the graph is recompiled when any was).
    """
    count = 0
    for node in list(gm.graph.nodes):
        c = _off_last_axis(node, gm)
        if c is None:
            continue
        dim, g = c.args["dim"], gm.graph
        with g.inserting_before(node):
            t = g.call_function(torch.transpose, (c.x, dim, -1))
            kw = {"dtype": c.args["dtype"]} if c.args.get("dtype") is not None else {}
            sm = g.call_function(torch.softmax, (t, -1), kw)
            back = g.call_function(torch.transpose, (sm, dim, -1))
        back.meta.update(node.meta)
        node.replace_all_uses_with(back)
        g.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
