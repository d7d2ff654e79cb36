"""sparge-compile benchmarks: ``python -m bench {kernels,accuracy,e2e,all} [--quick] [--out DIR]``.

* :mod:`bench.kernels`   kernel speed vs SDPA (cuDNN, FlashAttention) and FlexAttention, same mask
* :mod:`bench.accuracy`  error vs sparsity for each mask rule (top-k, top-p, hybrid)
* :mod:`bench.e2e`       a Wan2.1-1.3B-sized DiT stack, inductor vs the "sparge" backend
* :mod:`bench.common`    timing, data and report helpers

Each writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``--out``; ``all`` also
writes ``report.md`` (every table) and ``summary.json`` (the headline numbers).
"""
