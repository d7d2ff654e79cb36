"""sparge-compile benchmarks: ``python -m bench <name> [options]`` (``python -m bench --help``).

Benchmarks (each writes ``<name>.json`` and ``<name>.md``, most a ``<name>.png``, under ``--out``;
``--quick`` is a tiny CPU run in seconds):

* ``kernels``   (:mod:`bench.kernels`)   kernel speed vs SDPA (cuDNN, FlashAttention) and Flex, same mask
* ``accuracy``  (:mod:`bench.accuracy`)  error vs sparsity for each mask rule (top-k, top-p, hybrid)
* ``e2e``       (:mod:`bench.e2e`)       a Wan2.1-1.3B-sized DiT stack, inductor vs the "sparge" backend
* ``calibrate`` (:mod:`bench.calibrate`) sc.calibrate's per-site plan vs one global (topk, topp)
* ``distill``   (:mod:`bench.distill`)   distillation recovers quality at ~95% sparsity
* ``dit``       (:mod:`bench.dit`)       diffusers' DiTTransformer2DModel through backend="sparge"
* ``all``       (:mod:`bench.suite`)     kernels, accuracy and e2e, then ``report.md`` and ``summary.json``
* ``report``    (:mod:`bench.report`)    merge the JSON of several runs into one report

GPU tools (:mod:`bench.tools`): ``tune`` (kernel variants and launch settings), ``profile``
(per-kernel profile, host cost, compiler report).

Shared code: :mod:`bench.cli` (the command table), :mod:`bench.output` (JSON, markdown tables,
figures), :mod:`bench.common` (device, timing, guarded measurements), :mod:`bench.data`
(random and synthetic inputs), :mod:`bench.models` (the benchmarks' models).
"""
