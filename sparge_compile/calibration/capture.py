"""Capture: the model runs dense through the sparge backend in capture mode, and every attention
site it rewrote hands its q, k, v to the Calibrator, which gathers the site's statistics (first
pass) or measures its chosen point with the real sparse op (check passes).

Everything calibration uses of the backend and the run-time op is here: ``SpargeBackend`` with
``capture = True``, its ``graphs`` (the sites it found) and ``capturing`` (the hook its
``sparge::site_capture`` sites call), ``site_ops.dense_attention``, and the per-model cache of
capture backends ``_BACKENDS`` (weakly keyed: freed with the model).
"""
from __future__ import annotations

import weakref

import numpy as np
from torch import nn

from ..attention import sparse_attention
from ..compiler import SpargeBackend
from ..config import SpargeConfig
from ..plan import site_signature
from ..site_ops import dense_attention
from .statistics import SiteRecord, site_tables

_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> {settings: backend}


def capture_backend(model: nn.Module, config: SpargeConfig, inner) -> SpargeBackend:
    """The capture backend of ``model`` for these rewrite settings. One per model and settings:
    calibrating the same model again (another target, more batches) finds Dynamo's compiled
    capture graphs in its cache."""
    settings = (config.block_q, config.block_k, config.min_seq_len,
                inner if isinstance(inner, str) else id(inner))
    be = _BACKENDS.setdefault(model, {}).get(settings)
    if be is None:
        be = SpargeBackend(config=config, inner=inner)
        be.capture = True
        _BACKENDS[model][settings] = be
    return be


class Calibrator:
    """The capture hook: ``calibrator(site_key, q, k, v, scale, is_causal)`` returns the site's
    dense attention and, by ``phase``, adds the call's tables ("stats") or measures the site's
    current point on the current ``batch`` ("check")."""

    def __init__(self, backend: SpargeBackend, config: SpargeConfig, topks, topps, sample_blocks: int,
                 max_error: float | None):
        self.be = backend
        self.config = config
        self.topks, self.topps = tuple(topks), tuple(topps)
        self.sample_blocks = sample_blocks
        self.max_error = max_error
        self.sites: dict[str, SiteRecord] = {}
        self.key_to_sid: dict[str, str] = {}
        self.phase = "stats"
        self.batch = 0
        self.calls = 0
        self.round = 0
        self.global_cand: int | None = None   # the one-point-for-all-sites baseline

    def hook(self):
        """The context in which the backend's capture sites call this calibrator."""
        return self.be.capturing(self)

    def sync_sites(self) -> None:
        """Take in the sites the backend found (by stable id) and the run-time keys of the rewritten ones."""
        for gr in self.be.graphs:
            for info in gr.sites:
                st = self.sites.get(info.site_id)
                if st is None:
                    st = self.sites[info.site_id] = SiteRecord(info.site_id, info.kind, reason=info.reason)
                sig = site_signature(info.kind, info.shapes)
                if sig not in st.shapes:
                    st.shapes.append(sig)
                if info.rewritten:
                    st.rewritten = True
                    self.key_to_sid[info.key] = info.site_id
                elif not st.rewritten:
                    st.reason = info.reason

    def candidate(self, c: int) -> tuple[float, float]:
        """Grid index -> (topk, topp)."""
        T = len(self.topps)
        return float(self.topks[c // T]), float(self.topps[c % T])

    def __call__(self, key, q, k, v, scale, is_causal):
        if key not in self.key_to_sid:
            self.sync_sites()
        st = self.sites.get(self.key_to_sid.get(key, ""))
        if st is None:
            return None
        self.calls += 1
        dense = dense_attention(q, k, v, scale, is_causal)
        if self.phase == "stats":
            st.add_tables(self.batch, *site_tables(q, k, v, scale, is_causal, self.config.block_q,
                                                   self.config.block_k, self.topks, self.topps,
                                                   self.config.mode, self.sample_blocks))
        elif self.phase == "check" and st.group is not None:
            self._check(st, self.batch, q, k, v, scale, is_causal, dense)
        return dense

    def _ensure(self, st, c, b, q, k, v, scale, is_causal, dense, call: int):
        """Measure candidate c on call ``call`` of batch b, once (several calls of a site in one
        batch add up); returns the pooled [num, den, kept, visible] of (c, b)."""
        parts = st.parts.setdefault((c, b), {})
        if call not in parts:
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
