"""The FX graph as a networkx DiGraph of canonical nodes (the matcher walks this)."""
from __future__ import annotations

import networkx as nx
from torch import fx

from .canonical import canonicalize


def build_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """One vertex per FX node (attribute ``canon``: its :class:`Canon`), an edge per data use.

    ``users`` holds the FX user count, so "no user outside the match" is a check on out-edges.
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n, canon=canonicalize(n, gm), order=len(g))
    for n in gm.graph.nodes:
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def canon(g: nx.DiGraph, n):
    return g.nodes[n]["canon"]


def single_user(g: nx.DiGraph, n) -> bool:
    return g.out_degree(n) == 1 and len(n.users) == 1
