"""FX passes of the sparge backend.

* :mod:`.canonical` one canonical kind per spelling of an FX node (matmul, transpose, scale, ...)
* :mod:`.graph`     the FX graph as a networkx DiGraph of canonical nodes
* :mod:`.matcher`   attention sites: softmax(Q·Kᵀ·scale)·V, SDPA, MultiheadAttention
* :mod:`.rewrite`   replace a site by the run-time op (:mod:`sparge_compile.site_ops`), dead-code elimination
* :mod:`.shield`    keep Inductor's attention fusion off softmax chains over another axis
* :mod:`.pipeline`  the whole pass: sites, ids, plan, rewrite, report
* :mod:`.report`    the per-site report (``sc.explain``)
"""
from .pipeline import sparsify_graph

__all__ = ["sparsify_graph"]
