"""The statistics of calibration: per attention call, the exact sparsity and the predicted
error of every (topk, topp) point of the grid (site_tables), and what one site collects over
the batches (SiteRecord)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as R


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
    if mode not in ("hybrid", "topk", "topp"):
        raise ValueError(f"mode must be hybrid, topk or topp, got {mode!r}")
    qf, kf = q.float(), k.float()
    P = R.block_scores(qf, kf, scale, is_causal, block_q, block_k)            # (B, Hq, nq, nk)
    B, Hq, nq, _ = P.shape
    L, order, nv = _kept_lengths(P, q.shape[2], k.shape[2], block_q, block_k, is_causal, topks, topps, mode)
    kept = L.sum((0, 1, 2)).reshape(-1).double().cpu().numpy()
    visible = float(nv.sum()) * B * Hq
    sb = _sample_blocks(nq, sample_blocks, q.device)
    num, den = _prefix_errors(qf, kf, v, scale, is_causal, block_q, block_k, order, sb, max_elems)
    Ls = L[:, :, sb].reshape(B, Hq, sb.numel(), -1) - 1
    err_num = torch.gather(num, -1, Ls).sum((0, 1, 2)).double().cpu().numpy()
    return kept, visible, err_num, float(den.sum())


def _kept_lengths(P: Tensor, Nq: int, Nk: int, block_q: int, block_k: int, is_causal: bool, topks, topps,
                  mode: str):
    """Per row and grid point, how many key blocks the mask keeps (``L``, (B, Hq, nq, K, T)), the
    order they are kept in (a prefix of ``order``: by descending P̄, the diagonal blocks first
    when causal) and the visible blocks per query block ``nv``."""
    B, Hq, nq, nk = P.shape
    vis = R.visible_blocks(Nq, Nk, block_q, block_k, is_causal, P.device)
    nv = vis.sum(-1)                                                          # (nq,)
    Pm = P.masked_fill(~vis, -1.0)
    ps, order = torch.sort(Pm, dim=-1, descending=True, stable=True)
    c = _rule_counts(ps, nv, topks, topps, mode)                              # (B, Hq, nq, K, T)
    if not is_causal:
        return c, order, nv
    K, T = len(topks), len(topps)
    diag = R.diagonal_blocks(Nq, Nk, block_q, block_k, True, P.device)
    dcum = torch.gather(diag.expand(B, Hq, nq, nk).to(torch.int64), -1, order).cumsum(-1)
    d_c = torch.gather(dcum, -1, (c - 1).reshape(B, Hq, nq, K * T)).view(B, Hq, nq, K, T)
    L = diag.sum(-1)[:, None, None] + c - d_c    # kept = diagonal blocks + the rest of the top c
    order = torch.sort(Pm.masked_fill(diag, 2.0), dim=-1, descending=True, stable=True).indices
    return L, order, nv


def _rule_counts(ps: Tensor, nv: Tensor, topks, topps, mode: str) -> Tensor:
    """Blocks the top-k / top-p rule (or their union) keeps, per row and grid point, from the
    rows' sorted block scores ``ps`` (invisible blocks at -1): at least 1, at most ``nv``."""
    B, Hq, nq, _ = ps.shape
    before = torch.cumsum(ps, dim=-1) - ps
    valid = ps >= 0
    cp = torch.stack([((before < t) & valid).sum(-1) for t in topps], dim=-1)  # (B, Hq, nq, T)
    cp = torch.minimum(cp, nv[:, None])
    tk = torch.tensor(list(topks), dtype=torch.float32, device=ps.device)
    ck = torch.ceil(tk[None, :] * nv.to(torch.float32)[:, None]).to(torch.int64)   # (nq, K)
    K, T = len(topks), len(topps)
    if mode == "hybrid":
        c = torch.maximum(ck[None, None, :, :, None], cp[:, :, :, None, :])
    elif mode == "topk":
        c = ck[None, None, :, :, None].expand(B, Hq, nq, K, T)
    else:
        c = cp[:, :, :, None, :].expand(B, Hq, nq, K, T)
    return torch.minimum(c.clamp(min=1), nv[:, None, None])


def _prefix_errors(qf: Tensor, kf: Tensor, v: Tensor, scale: float, is_causal: bool, block_q: int,
                   block_k: int, order: Tensor, sb: Tensor, max_elems: int):
    """Σ|out - dense| of every prefix length of ``order`` on the sampled query blocks ``sb``
    ((B, Hq, S, nk)), and Σ|dense| on them ((B, Hq, S)); rows in groups of at most max_elems."""
    B, Hq = qf.shape[:2]
    G, Dv, nk, S = Hq // kf.shape[1], v.shape[-1], order.shape[-1], sb.numel()
    num = torch.zeros(B, Hq, S, nk, dtype=torch.float32, device=qf.device)
    den = torch.zeros(B, Hq, S, dtype=torch.float32, device=qf.device)
    pad = nk * block_k - kf.shape[2]
    group = max(1, min(S, max_elems // max(1, nk * block_q * max(Dv, 1) * 2)))
    for b in range(B):
        for h in range(Hq):
            kh, vh = kf[b, h // G], v[b, h // G].float()
            vb = F.pad(vh, (0, 0, 0, pad)).view(nk, block_k, Dv)
            for g0 in range(0, S, group):
                e, pos, dense = _row_errors(qf[b, h], kh, vh, vb, order[b, h], sb[g0:g0 + group], scale,
                                            is_causal, block_q)
                num[b, h, g0:g0 + group].index_add_(0, pos, e)
                den[b, h, g0:g0 + group].index_add_(0, pos, dense)
    return num, den


def _row_errors(qh: Tensor, kh: Tensor, vh: Tensor, vb: Tensor, order_h: Tensor, blocks: Tensor, scale: float,
                is_causal: bool, block_q: int):
    """One head, some query blocks: the dense attention split per key block, so the error of
    every prefix of the rows' block order follows from cumulative sums. Returns per row the
    error of each prefix length (Rn, nk), the row's position among ``blocks``, and Σ|dense|."""
    dev = qh.device
    Nq, Nk = qh.shape[0], kh.shape[0]
    nk, block_k = vb.shape[:2]
    rows = blocks[:, None] * block_q + torch.arange(block_q, device=dev)[None, :]
    pos = torch.arange(blocks.numel(), device=dev)[:, None].expand_as(rows)
    ok = rows < Nq
    rows, pos = rows[ok], pos[ok]                                            # (Rn,)
    s = (qh[rows] @ kh.t()) * scale                                          # (Rn, Nk)
    if is_causal:
        s = s.masked_fill(torch.arange(Nk, device=dev)[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = p @ vh                                                               # (Rn, Dv)
    pp = F.pad(p, (0, nk * block_k - Nk)).view(-1, nk, block_k)
    m = pp.sum(-1)                                                           # (Rn, nk)
    U = torch.bmm(pp.transpose(0, 1), vb).transpose(0, 1)                   # (Rn, nk, Dv)
    perm = order_h[blocks[pos]]                                              # (Rn, nk)
    U = torch.gather(U, 1, perm[..., None].expand_as(U)).cumsum_(1)
    m = torch.gather(m, 1, perm).cumsum_(1)
    U.div_(m.clamp_min(1e-30)[..., None]).sub_(o[:, None, :])
    return U.abs_().sum(-1), pos, o.abs().sum(-1)


@dataclass(eq=False)   # a record is itself (compared by identity)
class SiteRecord:
    """What calibration learns about one attention site (by stable id): its shapes, whether the
    backend rewrote it, the grid tables per batch, its search ladder and the measured points."""

    sid: str
    kind: str
    shapes: list = field(default_factory=list)
    rewritten: bool = False
    reason: str = ""
    kept: dict = field(default_factory=dict)        # batch -> (C,) kept pairs
    visible: dict = field(default_factory=dict)     # batch -> visible pairs
    num: dict = field(default_factory=dict)         # batch -> (C,) error numerator (sample)
    den: dict = field(default_factory=dict)         # batch -> error denominator
    group: object = None                            # its search.Ladder, once searched
    meas: dict = field(default_factory=dict)        # (cand, batch) -> [num, den, kept, visible]
    parts: dict = field(default_factory=dict)       # (cand, batch) -> {call ordinal in the batch: values}
    ordinal: dict = field(default_factory=dict)     # (round, batch) -> calls seen so far
    note: str = ""

    @property
    def ran(self) -> bool:
        return bool(self.kept)

    def tables(self):
        """Over the grid: kept pairs, visible pairs, pooled error and the worst batch's error."""
        kept = sum(self.kept.values())
        vis = sum(self.visible.values())
        den = sum(self.den.values())
        err = sum(self.num.values()) / max(den, 1e-30)
        worst = np.max(np.stack([self.num[b] / max(self.den[b], 1e-30) for b in self.num]), axis=0)
        return kept, vis, err, worst

    def add_tables(self, b: int, kept, visible, num, den) -> None:
        """Add one call's site_tables to batch b's (a site may run several times per batch)."""
        for table, vals in ((self.kept, kept), (self.visible, visible), (self.num, num), (self.den, den)):
            table[b] = table[b] + vals if b in table else vals
