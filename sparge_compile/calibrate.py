"""calibrate(): a (topk, topp) per attention site, from a few batches of the dense model.

    plan = sc.calibrate(model, batches, target_sparsity=0.95)      # or max_error=0.05
    print(plan)                                                     # the report, one row per site
    plan.save("plan.json")
    model = torch.compile(model, backend="sparge", options={"plan": plan})

How it works (no change to the model's code):

1. **Capture.** The model is compiled with the sparge backend in capture mode (inner "eager"):
   every attention site it can rewrite calls a capture op instead, which computes the site's
   dense attention (so the model runs dense) and hands q, k, v to the calibrator on the way.
2. **Statistics, per site and batch, computed on the fly** (nothing of size N is kept):
   the pooled block scores P̄ of every query block give, for every (topk, topp) of a grid, the
   exact mask and so the exact number of kept block pairs (the sparsity). On a sample of query
   blocks (``sample_blocks`` per head; all of them on short sequences) the dense attention is
   decomposed per key block, so the relative L1 error of the attention output (SpargeAttn's
   measure) of *every* grid point follows from one pass: the masks of one query block are
   prefixes of one order (its key blocks by descending P̄), so cumulative sums give them all.
3. **Search** on these tables (no model run): with ``target_sparsity``, one point per site
   such that the overall sparsity (kept block pairs over all sites) reaches the target with the
   least mean error (Lagrange multiplier by bisection, then a greedy fill of the slack); with
   ``max_error``, per site the sparsest point whose error stays within the bound on every
   calibration batch.
4. **Check.** The dense model runs once more; at every site the chosen point runs through the
   real sparse op on all query rows, giving the measured sparsity and error. With ``max_error``
   a site whose measured error exceeds the bound on any batch backs off to the next denser
   point (and is measured again), until every site is within the bound on every batch.

The result is a :class:`~sparge_compile.plan.SpargePlan`.
"""
from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference as R
from .config import SpargeConfig
from .distill import _describe
from .plan import PlanSite, SpargePlan, site_signature
from .validate import is_real

log = logging.getLogger("sparge_compile.calibrate")

# Top-k in steps of 0.25% up to 10% (where 90-99% sparsity lives), coarser above.
GRID_TOPK = tuple(sorted({0.0, *(round(0.0025 * i, 4) for i in range(1, 41)),
                          *(round(0.01 * i, 2) for i in range(11, 21)),
                          *(round(0.05 * i, 2) for i in range(5, 21))}))
GRID_TOPP = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {settings: backend}


class CalibrationError(RuntimeError):
    """calibrate() cannot go on: bad arguments, no inputs, or no attention site to calibrate."""


# --------------------------------------------------------------------------------------------
# Statistics of one site call


def _sample_blocks(nq: int, n: int, device) -> Tensor:
    if n <= 0 or nq <= n:
        return torch.arange(nq, device=device)
    return torch.linspace(0, nq - 1, n, device=device).round().long().unique()


@torch.no_grad()
def site_tables(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool, block_q: int, block_k: int,
                topks, topps, mode: str = "hybrid", sample_blocks: int = 16, max_elems: int = 1 << 25):
    """Tables over the (topk, topp) grid for one attention call (op layout, GQA aware).

    Returns float64 CPU arrays over the flattened grid (index ``ik * len(topps) + ip``):
    ``kept`` (block pairs kept, summed over batch, heads and query blocks, diagonal blocks
    included as the kernel keeps them), ``err_num`` (Σ|out - dense| over the sampled query
    rows) and the scalars ``visible`` (block pairs the rows may see) and ``err_den`` (Σ|dense|
    over the sampled rows). ``err_num / err_den`` is the relative L1 error on the sample.
    """
    B, Hq, Nq, _ = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    nq, nk = R.cdiv(Nq, block_q), R.cdiv(Nk, block_k)
    dev = q.device
    qf, kf = q.float(), k.float()
    P = R.block_scores(qf, kf, scale, is_causal, block_q, block_k)            # (B, Hq, nq, nk)
    vis = R.visible_blocks(Nq, Nk, block_q, block_k, is_causal, dev)
    nv = vis.sum(-1)                                                          # (nq,)
    Pm = P.masked_fill(~vis, -1.0)
    ps, order = torch.sort(Pm, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ps, dim=-1) - ps
    valid = ps >= 0
    cp = torch.stack([((before < t) & valid).sum(-1) for t in topps], dim=-1)  # (B, Hq, nq, T)
    cp = torch.minimum(cp, nv[:, None])
    tk = torch.tensor(list(topks), dtype=torch.float32, device=dev)
    ck = torch.ceil(tk[None, :] * nv.to(torch.float32)[:, None]).to(torch.int64)   # (nq, K)
    K, T = len(topks), len(topps)
    if mode == "hybrid":
        c = torch.maximum(ck[None, None, :, :, None], cp[:, :, :, None, :])
    elif mode == "topk":
        c = ck[None, None, :, :, None].expand(B, Hq, nq, K, T)
    elif mode == "topp":
        c = cp[:, :, :, None, :].expand(B, Hq, nq, K, T)
    else:
        raise ValueError(f"mode must be hybrid, topk or topp, got {mode!r}")
    c = torch.minimum(c.clamp(min=1), nv[:, None, None])                       # (B, Hq, nq, K, T)
    if is_causal:
        diag = R.diagonal_blocks(Nq, Nk, block_q, block_k, True, dev)
        dcum = torch.gather(diag.expand(B, Hq, nq, nk).to(torch.int64), -1, order).cumsum(-1)
        d_c = torch.gather(dcum, -1, (c - 1).reshape(B, Hq, nq, K * T)).view(B, Hq, nq, K, T)
        L = diag.sum(-1)[:, None, None] + c - d_c    # kept = diagonal blocks + the rest of the top c
        # the kept set is a prefix of this order: the diagonal blocks, then the others by P̄
        order = torch.sort(Pm.masked_fill(diag, 2.0), dim=-1, descending=True, stable=True).indices
    else:
        L = c
    kept = L.sum((0, 1, 2)).reshape(-1).double().cpu().numpy()
    visible = float(nv.sum()) * B * Hq

    # the error of every prefix length, on the sampled query blocks
    sb = _sample_blocks(nq, sample_blocks, dev)
    S = sb.numel()
    num = torch.zeros(B, Hq, S, nk, dtype=torch.float32, device=dev)
    den = torch.zeros(B, Hq, S, dtype=torch.float32, device=dev)
    pad = nk * block_k - Nk
    keys = torch.arange(Nk, device=dev)
    per_block = nk * block_q * max(Dv, 1) * 2
    group = max(1, min(S, max_elems // max(1, per_block)))
    for b in range(B):
        for h in range(Hq):
            kh = kf[b, h // G]
            vh = v[b, h // G].float()
            vb = F.pad(vh, (0, 0, 0, pad)).view(nk, block_k, Dv)
            for g0 in range(0, S, group):
                blocks = sb[g0:g0 + group]
                starts = blocks * block_q
                rows = (starts[:, None] + torch.arange(block_q, device=dev)[None, :])
                pos = torch.arange(blocks.numel(), device=dev)[:, None].expand_as(rows)
                ok = rows < Nq
                rows, pos = rows[ok], pos[ok]                                # (Rn,)
                s = (qf[b, h, rows] @ kh.t()) * scale                        # (Rn, Nk)
                if is_causal:
                    s = s.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
                p = torch.softmax(s, dim=-1)
                o = p @ vh                                                   # (Rn, Dv)
                pp = F.pad(p, (0, pad)).view(-1, nk, block_k)
                m = pp.sum(-1)                                               # (Rn, nk)
                U = torch.bmm(pp.transpose(0, 1), vb).transpose(0, 1)       # (Rn, nk, Dv)
                perm = order[b, h, blocks[pos]]                              # (Rn, nk)
                U = torch.gather(U, 1, perm[..., None].expand_as(U)).cumsum_(1)
                m = torch.gather(m, 1, perm).cumsum_(1)
                U.div_(m.clamp_min(1e-30)[..., None]).sub_(o[:, None, :])
                e = U.abs_().sum(-1)                                         # (Rn, nk)
                num[b, h, g0:g0 + group].index_add_(0, pos, e)
                den[b, h, g0:g0 + group].index_add_(0, pos, o.abs().sum(-1))
    Ls = L[:, :, sb].reshape(B, Hq, S, K * T) - 1
    err_num = torch.gather(num, -1, Ls).sum((0, 1, 2)).double().cpu().numpy()
    return kept, visible, err_num, float(den.sum())


# --------------------------------------------------------------------------------------------
# The search


def frontier(kept: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the Pareto points: kept ascending, error strictly decreasing."""
    idx = np.lexsort((np.arange(len(kept)), err, kept))
    out, best = [], math.inf
    for i in idx:
        if not out or err[i] < best - 1e-9 * abs(best):   # (float noise is no improvement)
            out.append(i)
            best = err[i]
    return np.asarray(out, dtype=np.int64)


def allocate(kepts: list, errs: list, budget: float) -> list[int]:
    """One candidate per site (indices into each site's arrays) with Σ kept <= budget and the
    least Σ err: Lagrange multiplier by bisection on the Pareto frontiers, then a greedy fill of
    the remaining budget by error saved per kept block pair. Sparsest points if infeasible."""
    fronts = [frontier(kp, er) for kp, er in zip(kepts, errs)]
    fk = [kp[f] for kp, f in zip(kepts, fronts)]
    fe = [er[f] for er, f in zip(errs, fronts)]
    scale = max(1.0, float(sum(x[-1] for x in fk)))

    def pick(lam):
        return [int(np.argmin(e + lam * k / scale)) for k, e in zip(fk, fe)]

    def total(ch):
        return sum(float(k[j]) for k, j in zip(fk, ch))

    sparsest = [0] * len(fk)
    if total(sparsest) > budget:
        return [int(f[0]) for f in fronts]
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 4.0
        if hi > 1e30:
            break
    if total(pick(lo)) <= budget:
        ch = pick(lo)
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if total(pick(mid)) <= budget:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        ch = pick(hi)
    if total(ch) > budget:  # the multiplier search can land on a tie; fall back
        ch = sparsest
    left = budget - total(ch)
    while True:   # greedy fill: the denser point that saves the most error per kept pair
        best, best_r = None, 0.0
        for s, (k, e) in enumerate(zip(fk, fe)):
            j0 = ch[s]
            for j in range(j0 + 1, len(k)):
                dk = float(k[j] - k[j0])
                if dk > left:
                    break
                r = (float(e[j0] - e[j]) / dk) if dk > 0 else math.inf
                if r > best_r:
                    best, best_r = (s, j), r
        if best is None:
            break
        s, j = best
        left -= float(fk[s][j] - fk[s][ch[s]])
        ch[s] = j
    return [int(f[j]) for f, j in zip(fronts, ch)]


# --------------------------------------------------------------------------------------------
# Calibration state


@dataclass
class _Site:
    sid: str
    kind: str
    shapes: list = field(default_factory=list)
    rewritten: bool = False
    reason: str = ""
    kept: dict = field(default_factory=dict)        # batch -> (C,) kept pairs
    visible: dict = field(default_factory=dict)     # batch -> visible pairs
    num: dict = field(default_factory=dict)         # batch -> (C,) error numerator (sample)
    den: dict = field(default_factory=dict)         # batch -> error denominator
    group: "_Group | None" = None
    meas: dict = field(default_factory=dict)        # (cand, batch) -> [num, den, kept, visible]
    parts: dict = field(default_factory=dict)       # (cand, batch) -> {call ordinal in the batch: values}
    ordinal: dict = field(default_factory=dict)     # (round, batch) -> calls seen so far
    note: str = ""

    @property
    def ran(self) -> bool:
        return bool(self.kept)

    def tables(self):
        kept = sum(self.kept.values())
        vis = sum(self.visible.values())
        den = sum(self.den.values())
        err = sum(self.num.values()) / max(den, 1e-30)
        worst = np.max(np.stack([self.num[b] / max(self.den[b], 1e-30) for b in self.num]), axis=0)
        return kept, vis, err, worst

    def add(self, table: dict, b: int, vals) -> None:
        if b in table:
            table[b] = table[b] + vals
        else:
            table[b] = vals


@dataclass
class _Group:
    """Sites that move together on one ladder (one site, or all of them for a global point)."""

    sites: list
    ladder: list                 # candidate indices, sparsest first (per site the same index)
    pos: int = 0
    exhausted: bool = False

    @property
    def cand(self) -> int:
        return int(self.ladder[self.pos])

    def advance(self) -> bool:
        if self.pos + 1 < len(self.ladder):
            self.pos += 1
            return True
        self.exhausted = True
        return False


def _call_args(batch):
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _to_device(x, device):
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device) if x.device != device else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _materialize(inputs, batches, device) -> list:
    if isinstance(inputs, nn.Module):
        raise CalibrationError("inputs must be a list of batches or a callable(i) -> batch, not a module")
    if callable(inputs) and not isinstance(inputs, Tensor):
        n = 4 if batches is None else int(batches)
        out = [_call_inputs(inputs, i) for i in range(n)]
    else:
        if isinstance(inputs, (Tensor, dict)) or not hasattr(inputs, "__iter__"):
            raise CalibrationError("inputs must be a list of batches or a callable(i) -> batch; wrap a "
                                   "single batch as [batch]")
        out = []
        for i, b in enumerate(inputs):
            if batches is not None and i >= int(batches):
                break
            out.append(b)
    if not out:
        raise CalibrationError("calibrate: no input batches")
    return [_to_device(b, device) for b in out]


def _call_inputs(inputs, i: int):
    try:
        return inputs(i)
    except Exception as e:
        raise CalibrationError(f"calibrate: inputs({i}) raised {type(e).__name__}: {e}") from e


def _sync(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class _Calibrator:
    def __init__(self, backend, config: SpargeConfig, topks, topps, sample_blocks: int):
        self.be = backend
        self.config = config
        self.topks, self.topps = tuple(topks), tuple(topps)
        self.sample_blocks = sample_blocks
        self.sites: dict[str, _Site] = {}
        self.key_to_sid: dict[str, str] = {}
        self.phase = "stats"
        self.batch = 0
        self.max_error: float | None = None
        self.calls = 0
        self.round = 0
        self.global_cand: int | None = None   # the one-point-for-all-sites baseline

    # the sites the backend found, by stable id
    def sync_sites(self) -> None:
        for gr in self.be.graphs:
            for info in gr.sites:
                st = self.sites.get(info.site_id)
                if st is None:
                    st = self.sites[info.site_id] = _Site(info.site_id, info.kind, reason=info.reason)
                sig = site_signature(info.kind, info.shapes)
                if sig not in st.shapes:
                    st.shapes.append(sig)
                if info.rewritten:
                    st.rewritten = True
                    self.key_to_sid[info.key] = info.site_id
                elif not st.rewritten:
                    st.reason = info.reason

    def candidate(self, c: int) -> tuple[float, float]:
        T = len(self.topps)
        return float(self.topks[c // T]), float(self.topps[c % T])

    def __call__(self, key, q, k, v, scale, is_causal):
        if key not in self.key_to_sid:
            self.sync_sites()
        st = self.sites.get(self.key_to_sid.get(key, ""))
        if st is None:
            return None
        from .site_ops import dense_attention

        self.calls += 1
        dense = dense_attention(q, k, v, scale, is_causal)
        b = self.batch
        if self.phase == "stats":
            kept, vis, num, den = site_tables(q, k, v, scale, is_causal, self.config.block_q,
                                              self.config.block_k, self.topks, self.topps, self.config.mode,
                                              self.sample_blocks)
            st.add(st.kept, b, kept)
            st.add(st.visible, b, vis)
            st.add(st.num, b, num)
            st.add(st.den, b, den)
        elif self.phase == "check" and st.group is not None:
            self._check(st, b, q, k, v, scale, is_causal, dense)
        return dense

    def _ensure(self, st, c, b, q, k, v, scale, is_causal, dense, call: int):
        """Measure candidate c on call ``call`` of batch b, once (several calls of a site in one
        batch add up); returns the pooled [num, den, kept, visible] of (c, b)."""
        parts = st.parts.setdefault((c, b), {})
        if call not in parts:
            from .attention import sparse_attention

            topk, topp = self.candidate(c)
            cfg = self.config.replace(topk=topk, topp=topp)
            out, mask = sparse_attention(q, k, v, scale=scale, is_causal=is_causal, config=cfg,
                                         return_mask=True)
            num = float((out.float() - dense.float()).abs().sum())
            den = float(dense.float().abs().sum())
            parts[call] = np.array([num, den, float(mask.kv_num_blocks.sum()), float(mask.visible_pairs())])
            st.meas[(c, b)] = np.sum(list(parts.values()), axis=0)
        return st.meas[(c, b)]

    def _check(self, st, b, q, k, v, scale, is_causal, dense):
        """Measure the site's current point on this batch; with max_error, back off while the
        measured error exceeds it. Also measure the global baseline point."""
        call = st.ordinal.get((self.round, b), 0)
        st.ordinal[(self.round, b)] = call + 1
        g = st.group
        while True:
            n, d = self._ensure(st, g.cand, b, q, k, v, scale, is_causal, dense, call)[:2]
            if self.max_error is not None and n / max(d, 1e-30) > self.max_error and g.advance():
                continue
            break
        if self.global_cand is not None:
            self._ensure(st, self.global_cand, b, q, k, v, scale, is_causal, dense, call)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain: what the model raised, under Dynamo's wrappers
    (a fake-tensor error during tracing carries the model's own error as its cause)."""
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or e.__context__
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _rejected(batch, i: int, e: Exception) -> CalibrationError:
    root = _root_cause(e)
    why = f"{type(root).__name__}: {_first_line(root)}"
    if root is not e:
        why += f" (raised through {type(e).__name__})"
    from torch._dynamo.exc import BackendCompilerFailed

    who = ("the sparge capture backend failed on" if isinstance(e, BackendCompilerFailed)
           else "the model rejected")
    return CalibrationError(f"calibrate: {who} batch {i} = {_describe(batch)} (called as model(*batch) for "
                            f"a tuple/list, model(**batch) for a dict, model(batch) otherwise): {why}")


def _run_batches(compiled, batches, cal: _Calibrator, phase: str, start: int = 0):
    cal.phase = phase
    for i, batch in enumerate(batches, start):
        cal.batch = i
        args, kwargs = _call_args(batch)
        try:
            compiled(*args, **kwargs)
        except CalibrationError:
            raise
        except Exception as e:
            raise _rejected(batch, i, e) from e


# --------------------------------------------------------------------------------------------
# Argument checks (each error names the argument: TypeError for a type, ValueError for a range)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _type_error(name: str, what: str, got) -> TypeError:
    return TypeError(f"calibrate: {name} must be {what}, got {type(got).__name__} {got!r}")


def _check_objective(target_sparsity, max_error) -> None:
    for name, x in (("target_sparsity", target_sparsity), ("max_error", max_error)):
        if x is not None and not is_real(x):
            raise _type_error(name, "a number (or None)", x)
    if (target_sparsity is None) == (max_error is None):
        raise ValueError("calibrate: give exactly one of target_sparsity and max_error")
    if target_sparsity is not None and not (0.0 <= float(target_sparsity) < 1.0):
        raise ValueError(f"calibrate: target_sparsity must be in [0, 1), got {target_sparsity}")
    if max_error is not None and not (0.0 < float(max_error) < math.inf):
        raise ValueError(f"calibrate: max_error must be a finite number > 0, got {max_error}")


def _check_options(*, batches, per_site, inner, sample_blocks, max_rounds, verbose) -> None:
    if batches is not None and not _is_int(batches):
        raise _type_error("batches", "an int (or None)", batches)
    if batches is not None and batches < 1:
        raise ValueError(f"calibrate: batches must be >= 1, got {batches}")
    for name, x, low in (("sample_blocks", sample_blocks, 0), ("max_rounds", max_rounds, 0)):
        if not _is_int(x):
            raise _type_error(name, "an int", x)
        if x < low:
            raise ValueError(f"calibrate: {name} must be >= {low}, got {x}")
    for name, x in (("per_site", per_site), ("verbose", verbose)):
        if not isinstance(x, bool):
            raise _type_error(name, "a bool", x)
    if not (isinstance(inner, str) or callable(inner)):
        raise _type_error("inner", "a backend name or a compiler callable", inner)


def _grid(name: str, values) -> tuple:
    """A search axis: a non-empty iterable of numbers in [0, 1], sorted, duplicates dropped."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise _type_error(name, "an iterable of numbers in [0, 1]", values)
    values = list(values)
    bad = [x for x in values if not is_real(x)]
    if bad:
        raise TypeError(f"calibrate: {name} must hold numbers in [0, 1], got an item of type "
                        f"{type(bad[0]).__name__}: {bad[0]!r}")
    if not values:
        raise ValueError(f"calibrate: {name} must not be empty")
    out = [x for x in values if not (0.0 <= float(x) <= 1.0)]
    if out:
        raise ValueError(f"calibrate: {name} must be numbers in [0, 1], got {out[0]}")
    return tuple(sorted({float(x) for x in values}))


def calibrate(model: nn.Module, inputs, *, target_sparsity: float | None = None,
              max_error: float | None = None, config: SpargeConfig | None = None,
              batches: int | None = None, per_site: bool = True,
              inner="eager", sample_blocks: int = 16, topks=GRID_TOPK, topps=GRID_TOPP,
              max_rounds: int = 6, verbose: bool = False) -> SpargePlan:
    """Choose (topk, topp) per attention site of ``model`` from a few input batches.

    model: an ``nn.Module`` (or a model returned by ``torch.compile``: its original module is
        used); it runs in eval mode under ``torch.no_grad`` (its mode is restored afterwards).
    inputs: a list (or iterable) of batches, or a callable ``inputs(i) -> batch``; a batch is a
        tuple (``model(*batch)``), a dict (``model(**batch)``) or one tensor. Moved to the model's
        device. batches: how many to use (default: all of a list; 4 from a callable).
    target_sparsity: reach this overall sparsity (kept block pairs over all calibrated sites)
        with the least mean attention-output error; or
    max_error: the sparsest point per site whose relative L1 attention-output error (against
        dense, SpargeAttn's measure) stays within this bound on every calibration batch.
        Exactly one of the two.
    config: block sizes, mode and min_seq_len (sites with fewer keys stay dense and are not
        calibrated); default ``SpargeConfig()``.
    per_site: False gives one global (topk, topp) for all sites (the baseline).
    inner: what runs the capture graph ("eager": compiling it would only cost time).
    sample_blocks: query blocks per head whose rows give the predicted error (all if fewer; 0: all).
    topks, topps: the search grid (numbers in [0, 1]).
    max_rounds: at most this many check passes over the batches (0: no measurement).

    Bad arguments raise TypeError (a wrong type) or ValueError (out of range) naming the argument;
    a batch the model rejects raises :class:`CalibrationError` naming the batch and the model's error.

    Returns a :class:`SpargePlan` (``print(plan)`` is the report: each site's choice, predicted
    and measured sparsity and error). Raises :class:`CalibrationError` when no site qualifies.
    """
    _check_objective(target_sparsity, max_error)
    _check_options(batches=batches, per_site=per_site, inner=inner, sample_blocks=sample_blocks,
                   max_rounds=max_rounds, verbose=verbose)
    config = SpargeConfig() if config is None else config
    if not isinstance(config, SpargeConfig):
        raise TypeError(f"calibrate: config must be a SpargeConfig, got {type(config).__name__}")
    topks, topps = _grid("topks", topks), _grid("topps", topps)
    if config.mode == "topk":
        topps = (0.0,)
    elif config.mode == "topp":
        topks = (0.0,)
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: model must be an nn.Module, got {type(model).__name__}")
    from .compiler import SpargeBackend

    device = next((p.device for p in model.parameters()), None)
    data = _materialize(inputs, batches, device)
    t0 = time.perf_counter()
    # one capture backend per model and rewrite settings: calibrating the same model again
    # (another target, more batches) finds Dynamo's compiled capture graphs in its cache
    settings = (config.block_q, config.block_k, config.min_seq_len,
                inner if isinstance(inner, str) else id(inner))
    be = _BACKENDS.setdefault(model, {}).get(settings)
    if be is None:
        be = SpargeBackend(config=config, inner=inner)
        be.capture = True
        _BACKENDS[model][settings] = be
    cal = _Calibrator(be, config, topks, topps, sample_blocks)
    cal.max_error = None if max_error is None else float(max_error)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        compiled = torch.compile(model, backend=be, dynamic=False)
        with torch.no_grad(), be.capturing(cal):
            _run_batches(compiled, data[:1], cal, "stats")   # compiles the capture graph(s)
            _sync(device)
            t_first = time.perf_counter()
            _run_batches(compiled, data[1:], cal, "stats", start=1)
            _sync(device)
            t_stats = time.perf_counter()
            cal.sync_sites()
            active = [s for s in cal.sites.values() if s.rewritten and s.ran]
            if not active:
                raise CalibrationError("calibrate: no attention site to calibrate (the backend rewrote none "
                                       "that ran; see the sites' reasons: " + "; ".join(
                                           f"{s.sid}: {s.reason}" for s in cal.sites.values()) + ")")
            _search(cal, active, target_sparsity, max_error, per_site)
            t_search = time.perf_counter()
            for r in range(max_rounds):
                cal.round = r
                pending = [s for s in active if any(
                    (c, b) not in s.meas for c in (s.group.cand, cal.global_cand) if c is not None
                    for b in range(len(data)))]
                if not pending:
                    break
                _run_batches(compiled, data, cal, "check")
            _sync(device)
            t_check = time.perf_counter()
    finally:
        for m, training in modes:
            m.training = training
    plan = _make_plan(cal, active, config, target_sparsity, max_error, per_site, len(data))
    plan.summary.update(seconds=t_check - t0, seconds_first_batch=t_first - t0,
                        seconds_capture_and_stats=t_stats - t0,
                        seconds_search=t_search - t_stats, seconds_check=t_check - t_search)
    if verbose:
        print(plan.table())
    log.info("%s", plan.table())
    return plan


def _global_point(tabs: dict, active: list, target, max_error) -> int:
    """One grid point for every site: the least mean error at overall sparsity >= target, or the
    sparsest point with every site within max_error on every batch (predicted)."""
    tk = np.sum([tabs[s.sid][0] for s in active], axis=0)
    if target is not None:
        budget = (1.0 - float(target)) * sum(tabs[s.sid][1] for s in active)
        te = np.mean([tabs[s.sid][2] for s in active], axis=0)
        ok = np.flatnonzero(tk <= budget)
        return int(ok[np.argmin(te[ok])]) if ok.size else int(np.argmin(tk))
    tw = np.max([tabs[s.sid][3] for s in active], axis=0)
    ok = np.flatnonzero(tw <= max_error)
    return int(ok[np.lexsort((tw[ok], tk[ok]))[0]]) if ok.size else int(np.argmin(tw))


def _search(cal: _Calibrator, active: list, target, max_error, per_site: bool) -> None:
    tabs = {s.sid: s.tables() for s in active}
    gc = _global_point(tabs, active, target, max_error)
    if not per_site:   # the baseline itself: one point (one ladder, with max_error) for all sites
        if target is not None:
            ladder = [gc]
        else:
            tk = np.sum([tabs[s.sid][0] for s in active], axis=0)
            tw = np.max([tabs[s.sid][3] for s in active], axis=0)
            f = frontier(tk, tw)
            ok = np.flatnonzero(tw[f] <= max_error)
            ladder = [int(x) for x in f[int(ok[0]) if ok.size else len(f) - 1:]]
        g = _Group(list(active), ladder)
        for s in active:
            s.group = g
        return
    cal.global_cand = gc
    if target is not None:
        budget = (1.0 - float(target)) * sum(tabs[s.sid][1] for s in active)
        kepts = [tabs[s.sid][0] for s in active]
        errs = [tabs[s.sid][2] / len(active) for s in active]
        choice = allocate(kepts, errs, budget)
        if sum(k[c] for k, c in zip(kepts, choice)) > budget:
            warnings.warn(f"calibrate: target sparsity {target} is out of reach at these block sizes; "
                          "using the sparsest points", stacklevel=3)
        for s, c in zip(active, choice):
            s.group = _Group([s], [c])
        return
    # max_error: the sparsest point within the bound on every batch; denser frontier points after it
    for s in active:
        kept, _, _, worst = tabs[s.sid]
        f = frontier(kept, worst)
        ok = np.flatnonzero(worst[f] <= max_error)
        start = int(ok[0]) if ok.size else len(f) - 1
        s.group = _Group([s], [int(x) for x in f[start:]])


def _measured(st: _Site, c: int, n_batches: int):
    """Pooled [num, den, kept, visible] of candidate c over the batches, and the worst batch error."""
    ms = [st.meas[(c, b)] for b in range(n_batches) if (c, b) in st.meas]
    if not ms:
        return None, None
    return np.sum(ms, axis=0), max(float(x[0] / max(x[1], 1e-30)) for x in ms)


def _make_plan(cal: _Calibrator, active, config, target, max_error, per_site, n_batches) -> SpargePlan:
    sites = {}
    sum_pk = sum_mk = sum_v = sum_mv = 0.0
    perr, merr = [], []
    for sid, st in cal.sites.items():
        if st not in active:
            note = st.reason if not st.rewritten else "not run during calibration"
            sites[sid] = PlanSite(kind=st.kind, shapes=st.shapes, note=note)
            continue
        c = st.group.cand
        topk, topp = cal.candidate(c)
        kept, vis, err, worst = st.tables()
        m, m_max = _measured(st, c, n_batches)
        m_err = float(m[0] / max(m[1], 1e-30)) if m is not None else None
        m_sp = float(1.0 - m[2] / max(m[3], 1e-30)) if m is not None else None
        note = ""
        if st.group.pos > 0:
            note = f"backed off {st.group.pos} step(s) after the measured error exceeded the bound"
        dense = False
        if max_error is not None and m_max is not None and m_max > max_error:
            dense = True
            note = f"kept dense: measured error {m_max:.3g} > max_error even at the densest point"
        elif kept[c] >= vis:
            dense, note = True, "keeps every block: runs dense"
        sites[sid] = PlanSite(topk=None if dense else topk, topp=None if dense else topp, dense=dense,
                              kind=st.kind, shapes=st.shapes, note=note,
                              predicted_sparsity=float(1.0 - kept[c] / max(vis, 1e-30)),
                              predicted_error=float(err[c]), measured_sparsity=0.0 if dense else m_sp,
                              measured_error=0.0 if dense else m_err,
                              measured_max_error=0.0 if dense else m_max)
        sum_pk += float(kept[c])
        sum_v += vis
        perr.append(float(err[c]))
        if m is not None:
            sum_mk += vis if dense else float(m[2])
            sum_mv += vis if dense else float(m[3])
            merr.append(0.0 if dense else m_err)
    objective = {"target_sparsity": float(target)} if target is not None else {"max_error": float(max_error)}
    if not per_site:
        objective["per_site"] = False
    summary = dict(predicted_sparsity=1.0 - sum_pk / max(sum_v, 1e-30),
                   measured_sparsity=(1.0 - sum_mk / sum_mv) if sum_mv else None,
                   predicted_error=float(np.mean(perr)) if perr else None,
                   measured_error=float(np.mean(merr)) if merr else None,
                   measured_max_error=max((s.measured_max_error or 0.0) for s in sites.values()),
                   sites=len(sites), calibrated=len(active), batches=n_batches,
                   grid=[len(cal.topks), len(cal.topps)], sample_blocks=cal.sample_blocks)
    if cal.global_cand is not None:
        gc = cal.global_cand
        tk, tp = cal.candidate(gc)
        tabs = [st.tables() for st in active]
        ms = [_measured(st, gc, n_batches) for st in active]
        have = all(m is not None for m, _ in ms)
        summary["global"] = dict(
            topk=tk, topp=tp,
            predicted_sparsity=1.0 - sum(t[0][gc] for t in tabs) / max(sum(t[1] for t in tabs), 1e-30),
            predicted_error=float(np.mean([t[2][gc] for t in tabs])),
            measured_sparsity=(1.0 - sum(m[2] for m, _ in ms) / sum(m[3] for m, _ in ms)) if have else None,
            measured_error=float(np.mean([m[0] / max(m[1], 1e-30) for m, _ in ms])) if have else None,
            measured_max_error=max(w for _, w in ms) if have else None)
    meta = {"torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return SpargePlan(config=config, sites=sites, objective=objective, summary=summary, meta=meta)


__all__ = ["calibrate", "CalibrationError", "site_tables", "allocate", "frontier", "GRID_TOPK", "GRID_TOPP"]
