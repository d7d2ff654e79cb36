"""calibrate(): a (topk, topp) per attention site, from a few batches of the dense model.

    plan = sc.calibrate(model, batches, target_sparsity=0.95)      # or max_error=0.05
    print(plan)                                                     # the report, one row per site
    plan.save("plan.json")
    model = torch.compile(model, backend="sparge", options={"plan": plan})

How it works (no change to the model's code):

1. **Capture** (``capture``). The model is compiled with the sparge backend in capture mode
   (inner "eager"): every attention site it can rewrite calls a capture op instead, which
   computes the site's dense attention (so the model runs dense) and hands q, k, v to the
   calibrator on the way.
2. **Statistics** (``statistics``), per site and batch, computed on the fly (nothing of size N
   is kept): the pooled block scores P̄ of every query block give, for every (topk, topp) of a
   grid, the exact mask and so the exact number of kept block pairs (the sparsity). On a sample
   of query blocks (``sample_blocks`` per head; all of them on short sequences) the dense
   attention is decomposed per key block, so the relative L1 error of the attention output
   (SpargeAttn's measure) of *every* grid point follows from one pass: the masks of one query
   block are prefixes of one order (its key blocks by descending P̄), so cumulative sums give
   them all.
3. **Search** (``search``) on these tables (no model run): with ``target_sparsity``, one point
   per site such that the overall sparsity (kept block pairs over all sites) reaches the target
   with the least mean error (Lagrange multiplier by bisection, then a greedy fill of the slack);
   with ``max_error``, per site the sparsest point whose error stays within the bound on every
   calibration batch.
4. **Check** (``capture`` again). The dense model runs once more; at every site the chosen
   point runs through the real sparse op on all query rows, giving the measured sparsity and
   error. With ``max_error`` a site whose measured error exceeds the bound on any batch backs
   off to the next denser point (and is measured again), until every site is within the bound
   on every batch.

The result (``result``) is a :class:`~sparge_compile.plan.SpargePlan`; ``api`` holds
calibrate() and its passes over the batches.
"""
from ..config import GRID_TOPK, GRID_TOPP, CalibrateConfig
from .api import CalibrationError, calibrate
from .search import allocate, frontier
from .statistics import site_tables

__all__ = ["GRID_TOPK", "GRID_TOPP", "CalibrateConfig", "CalibrationError", "allocate", "calibrate",
           "frontier", "site_tables"]
