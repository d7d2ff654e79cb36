"""Shared checks for the kernel tests (CPU interpreter and GPU): random inputs, the tie-aware
mask comparison, and relative-error helpers against the float64 reference."""
from __future__ import annotations

import math

import torch

import sparge_compile as sc
from sparge_compile import reference as R

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    """‖a − b‖ / ‖b‖, with ‖b‖ floored at floor·sqrt(numel): a reference gradient can cancel to
    exactly zero (a row that sees one key has dq = 0), where rounding noise of the O(1) terms
    that cancel would make the plain ratio meaningless."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(floor * b.numel() ** 0.5))


def make_qkv(seed, B, Hq, Hkv, Nq, Nk, D, dtype, device="cpu", requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g)
    # a per-block offset gives the block scores structure (so masks are not all-or-nothing)
    q = q + 0.5 * torch.randn(B, Hq, 1, D, generator=g)
    k = k + torch.randn(B, Hkv, Nk, 1, generator=g).sign() * 0.3
    out = [x.to(device=device, dtype=dtype).requires_grad_(requires_grad) for x in (q, k, v)]
    return out


def mask_mismatch_is_tie(q, k, kern_dense, cfg: sc.SpargeConfig, is_causal, eps=1e-4):
    """True iff every row where the kernel's mask differs from the float64 reference is a
    near-tie: the differing blocks sit at the cut with probabilities within eps of the cut
    value, or the Top-p cumulative mass at the cut is within eps of topp."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qd, kd = q.detach().double().cpu(), k.detach().double().cpu()
    ref = R.reference_block_mask(qd, kd, scale, is_causal, cfg.topk, cfg.topp, cfg.mode,
                                 cfg.block_q, cfg.block_k)
    kern = kern_dense.cpu()
    diff = kern != ref
    if not diff.any():
        return True, ref
    p = R.block_scores(qd, kd, scale, is_causal, cfg.block_q, cfg.block_k)
    vis = R.visible_blocks(q.shape[2], k.shape[2], cfg.block_q, cfg.block_k, is_causal)
    for idx in diff.any(-1).nonzero().tolist():
        row_p = p[tuple(idx)].masked_fill(~vis[idx[-1]], -1.0)
        ps, _ = torch.sort(row_p, descending=True, stable=True)
        before = torch.cumsum(ps.clamp_min(0), 0) - ps.clamp_min(0)
        c = int((ref[tuple(idx)] & vis[idx[-1]]).sum())
        cut_vals = [ps[t] for t in (c - 2, c - 1, c) if 0 <= t < len(ps)]
        cut_mass = [before[t] for t in (c - 1, c, c + 1) if 0 <= t < len(ps)]
        for j in diff[tuple(idx)].nonzero().flatten().tolist():
            near_val = any(abs(float(row_p[j] - cv)) < eps for cv in cut_vals)
            near_mass = any(abs(float(cm - cfg.topp)) < eps for cm in cut_mass)
            if not (near_val or near_mass):
                return False, ref
    return True, ref


def reference_out_and_grads(q, k, v, dense_mask, cfg, is_causal, dout=None):
    qd, kd, vd = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = R.masked_attention(qd, kd, vd, dense_mask.cpu(), None, is_causal, cfg.block_q, cfg.block_k)
    if dout is None:
        return ref, None
    grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double().cpu())
    return ref, grads


def gradient_magnitudes(q, k, v, dense_mask, cfg, is_causal, dout):
    """Norms of the cancellation-free magnitudes of dQ, dK, dV (float64): the sums of the absolute
    terms, with dS = P ∘ (dP − δ) bounded by P ∘ (|dP| + Σ|dO|∘|O|). Where the true gradient cancels
    (every row sees one key: dS = 0 exactly), a kernel's result is rounding noise of size
    ~eps·(these), however accurate the kernel is."""
    qd, kd, vd, dod = (x.detach().double().cpu() for x in (q, k, v, dout))
    G = qd.shape[1] // kd.shape[1]
    kr, vr = kd.repeat_interleave(G, 1), vd.repeat_interleave(G, 1)
    scale = qd.shape[-1] ** -0.5
    m = R.dense_token_mask(dense_mask.cpu(), qd.shape[2], kd.shape[2], cfg.block_q, cfg.block_k, is_causal)
    p = torch.softmax((qd @ kr.transpose(-2, -1) * scale).masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    dp = dod @ vr.transpose(-2, -1)
    # delta = rowsum(dO ∘ O) is computed from O as stored (rounded to q's dtype, as FlashAttention
    # does): its rounding error is bounded by the rowsum of |dO| ∘ |O|, not by |delta| (found on
    # the H200: bf16, 2 queries seeing 1-2 keys, dq off by 5.7% of a cancelling gradient)
    t = p * (dp.abs() + (dod.abs() * (p @ vr).abs()).sum(-1, keepdim=True))

    def per_kv_head(x):  # the GQA group's query heads add up into their kv head
        return x.unflatten(1, (x.shape[1] // G, G)).sum(2)

    return ((scale * t @ kr.abs()).norm(), per_kv_head(scale * t.transpose(-2, -1) @ qd.abs()).norm(),
            per_kv_head(p.transpose(-2, -1) @ dod.abs()).norm())


def grad_errors(grads, ref_grads, magnitudes, floor: float = 1e-3, share: float | None = None) -> dict:
    """{"dq"|"dk"|"dv": relative error}, the reference's norm floored at a share of the gradient's
    magnitude (see :func:`gradient_magnitudes`) and at floor·sqrt(numel). share: 1%, 10% in
    bf16, whose rounding of one term (2^-9 of it) is already 20% of a 1% floor: a gradient that
    cancels to ~0 (2 queries, 1-2 keys each) then reads as 5% off on the H200."""
    if share is None:
        share = 0.1 if grads[0].dtype == torch.bfloat16 else 0.01
    out = {}
    for name, g, r, mag in zip(("dq", "dk", "dv"), grads, ref_grads, magnitudes):
        g, r = g.detach().double().cpu(), r.detach().double().cpu()
        denom = max(float(r.norm()), floor * r.numel() ** 0.5, share * float(mag), 1e-30)
        out[name] = float((g - r).norm()) / denom
    return out
