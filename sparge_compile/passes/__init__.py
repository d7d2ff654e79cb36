"""FX passes of the sparge backend.

* :mod:`.canonical` one canonical kind per spelling of an FX node (matmul, transpose, scale, ...)
* :mod:`.graph`     the FX graph as a networkx DiGraph of canonical nodes
* :mod:`.matcher`   attention sites: softmax(Q·Kᵀ·scale)·V, SDPA, MultiheadAttention
* :mod:`.rewrite`   replace a site by the sparse op, dead-code elimination
* :mod:`.runtime`   what the rewritten graph calls (mask prediction that records the mask)
* :mod:`.report`    the per-site report (``sc.explain``)
"""
from .pipeline import sparsify_graph

__all__ = ["sparsify_graph"]
