"""Plain PyTorch definitions of the method, written for clarity, not speed.

These are the specification the Triton kernels are tested against (in float64):

* :func:`pool_blocks`          mean of the valid tokens of each block
* :func:`visible_blocks`       which key blocks a query block may see (causal rule)
* :func:`diagonal_blocks`      key blocks that meet a query block's diagonal (always kept, causal)
* :func:`block_scores`         P̄ = softmax_j(q̄_i · k̄_j · scale) over the visible blocks
* :func:`keep_counts`          c_k, c_p and max(c_k, c_p, 1) per query block
* :func:`reference_block_mask` the hybrid Top-k + Top-p block mask, dense bool (B, Hq, nq, nk)
* :func:`masked_attention`     dense attention with every score outside the kept blocks at -inf
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, ceil(N / block), D): mean over the real tokens of each block."""
    B, H, N, D = x.shape
    nb = cdiv(N, block)
    pad = nb * block - N
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad))
    sums = xp.reshape(B, H, nb, block, D).sum(dim=3)
    counts = torch.full((nb,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def visible_blocks(nq_tok: int, nk_tok: int, block_q: int, block_k: int, is_causal: bool,
                   device=None) -> torch.Tensor:
    """(nq, nk) bool: key block j has at least one key some row of query block i may attend to.

    Causal masking is SDPA's (top-left aligned): query row r sees keys 0..r.
    """
    nq, nk = cdiv(nq_tok, block_q), cdiv(nk_tok, block_k)
    if not is_causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    last_row = torch.clamp((torch.arange(nq, device=device) + 1) * block_q, max=nq_tok) - 1
    first_key = torch.arange(nk, device=device) * block_k
    return first_key[None, :] <= last_row[:, None]


def diagonal_blocks(nq_tok: int, nk_tok: int, block_q: int, block_k: int, is_causal: bool,
                    device=None) -> torch.Tensor:
    """(nq, nk) bool: with is_causal, key blocks holding key index r for some row r of block i."""
    nq, nk = cdiv(nq_tok, block_q), cdiv(nk_tok, block_k)
    if not is_causal:
        return torch.zeros(nq, nk, dtype=torch.bool, device=device)
    first_row = torch.arange(nq, device=device) * block_q
    last_row = torch.clamp(first_row + block_q, max=nq_tok) - 1
    first_key = torch.arange(nk, device=device) * block_k
    last_key = torch.clamp(first_key + block_k, max=nk_tok) - 1
    return (first_key[None, :] <= last_row[:, None]) & (last_key[None, :] >= first_row[:, None])


def key_blocks_visible(kv_keep: torch.Tensor, block_k: int) -> torch.Tensor:
    """(B, nk) bool: key block j holds at least one key the padding mask kv_keep (B, Nk) keeps."""
    B, Nk = kv_keep.shape
    nk = cdiv(Nk, block_k)
    pad = nk * block_k - Nk
    return torch.nn.functional.pad(kv_keep, (0, pad)).reshape(B, nk, block_k).any(-1)


def visible(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, is_causal: bool,
            kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Visible block pairs: (nq, nk), or (B, 1, nq, nk) with a key-padding mask kv_keep (B, Nk)
    (a key block whose keys are all padding is hidden)."""
    vis = visible_blocks(q.shape[2], k.shape[2], block_q, block_k, is_causal, q.device)
    if kv_keep is None:
        return vis
    return vis & key_blocks_visible(kv_keep, block_k)[:, None, None, :]


def block_logits(q: torch.Tensor, k: torch.Tensor, scale: float, is_causal: bool,
                 block_q: int, block_k: int, kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, nq, nk) pooled scores q̄·k̄·scale, -inf where the block is hidden (causal, or all
    of its keys padding). The pooled k̄ is the mean over every key of the block, padding included."""
    Hq, Hkv = q.shape[1], k.shape[1]
    qb = pool_blocks(q, block_q)
    kb = pool_blocks(k, block_k).repeat_interleave(Hq // Hkv, dim=1)
    s = qb @ kb.transpose(-2, -1) * scale
    return s.masked_fill(~visible(q, k, block_q, block_k, is_causal, kv_keep), float("-inf"))


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, is_causal: bool,
                 block_q: int, block_k: int, kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """P̄ (B, Hq, nq, nk): softmax over visible key blocks of pooled q̄·k̄·scale (0 where hidden)."""
    s = block_logits(q, k, scale, is_causal, block_q, block_k, kv_keep)
    none = (s == float("-inf")).all(-1, keepdim=True)   # a row with no visible block: all 0
    return torch.softmax(s.masked_fill(none, 0.0), dim=-1).masked_fill(none, 0.0)


def nonfinite_rows(q: torch.Tensor, k: torch.Tensor, scale: float, is_causal: bool,
                   block_q: int, block_k: int, kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq, nq) bool: query blocks with a NaN or infinite pooled score on a visible key block
    (NaN/inf in q or k). Such a row cannot be ranked: it keeps every visible block, i.e. it is
    computed exactly as dense attention (and gives SDPA's NaNs where SDPA would)."""
    s = block_logits(q, k, scale, is_causal, block_q, block_k, kv_keep)
    return (~torch.isfinite(s) & visible(q, k, block_q, block_k, is_causal, kv_keep)).any(-1)


def block_self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, nb): mean pairwise cosine similarity of the tokens of each block of x (B, H, N, D),
    self-pairs excluded ((|sum u|^2 - sum |u|^2) / (n (n - 1)), u the unit tokens); 1 for a block
    of one token. SpargeAttn's self-similarity judge."""
    B, H, N, D = x.shape
    nb = cdiv(N, block)
    u = torch.nn.functional.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    pad = nb * block - N
    u = torch.nn.functional.pad(u, (0, 0, 0, pad)).reshape(B, H, nb, block, D)
    n = torch.full((nb,), float(block), dtype=u.dtype, device=x.device)
    n[-1] = block - pad
    s = u.sum(3)
    num = (s * s).sum(-1) - (u * u).sum((3, 4))
    return torch.where(n > 1, num / (n * (n - 1)).clamp_min(1), torch.ones_like(num))


def never_dropped(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, theta: float | None,
                  vis: torch.Tensor) -> torch.Tensor | None:
    """The blocks the self-similarity judge keeps whatever the scores (visible ones only): the
    rows of query blocks and the columns of key blocks whose similarity is below theta."""
    if theta is None:
        return None
    G = q.shape[1] // k.shape[1]
    low_q = block_self_similarity(q, block_q) < theta
    low_k = (block_self_similarity(k, block_k) < theta).repeat_interleave(G, dim=1)
    return (low_q[..., :, None] | low_k[..., None, :]) & vis


def keep_counts(p: torch.Tensor, n_visible: torch.Tensor, topk: float, topp: float, mode: str):
    """Blocks to keep per row: returns (c_k, c_p, c), each (..., nq) int64.

    c_k = ceil(topk · n_visible), computed in float32 (the kernels' arithmetic);
    c_p = fewest blocks, in descending order of p, whose sum is >= topp (at most n_visible);
    hidden blocks are marked with p = -1 and never counted;
    c   = max(c_k, c_p, 1) for "hybrid"; max(c_k, 1) for "topk"; max(c_p, 1) for "topp".
    """
    nv = n_visible.to(torch.float32)
    c_k = torch.ceil(torch.tensor(topk, dtype=torch.float32) * nv).to(torch.int64)
    ps, _ = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ps, dim=-1) - ps  # mass of the blocks ranked before each one
    c_p = ((before < topp) & (ps >= 0)).sum(-1)  # hidden blocks carry p = -1
    c_p = torch.minimum(c_p, n_visible.to(torch.int64))
    if mode == "hybrid":
        c = torch.maximum(c_k, c_p)
    elif mode == "topk":
        c = c_k
    elif mode == "topp":
        c = c_p
    else:
        raise ValueError(f"mode must be hybrid, topk or topp, got {mode!r}")
    return c_k, c_p, torch.clamp(c, min=1)


def reference_block_mask(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                         is_causal: bool = False, topk: float = 0.03, topp: float = 0.2,
                         mode: str = "hybrid", block_q: int = 128, block_k: int = 64,
                         kv_keep: torch.Tensor | None = None, theta: float | None = None) -> torch.Tensor:
    """The hybrid Top-k + Top-p block mask as a dense bool tensor (B, Hq, nq, nk).

    Keeps, per query block, the c = max(c_k, c_p, 1) highest-scoring visible key blocks
    (ties to the lower block index) and, with is_causal, every visible diagonal block. A query
    block whose pooled scores are not all finite (NaN/inf in q or k) keeps every visible block.
    kv_keep (B, Nk) bool: a key-padding mask; key blocks of padding alone are never visible
    (c counts the visible ones; a row with none keeps none). theta: the self-similarity judge
    (:func:`never_dropped`), applied after the selection.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = block_scores(q, k, scale, is_causal, block_q, block_k, kv_keep)
    vis = visible(q, k, block_q, block_k, is_causal, kv_keep).expand(p.shape)
    n_visible = vis.sum(-1)
    _, _, c = keep_counts(p.masked_fill(~vis, -1.0), n_visible, topk, topp, mode)
    c = torch.minimum(c, n_visible)
    # rank of each block in descending order of p, ties to the lower index (stable sort)
    order = torch.sort(p.masked_fill(~vis, -1.0), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(p.shape[-1], device=p.device).expand_as(order))
    keep = (rank < c[..., None]) & vis
    diag = diagonal_blocks(q.shape[2], k.shape[2], block_q, block_k, is_causal, q.device) & vis
    dense = nonfinite_rows(q, k, scale, is_causal, block_q, block_k, kv_keep)[..., None] & vis
    kept = never_dropped(q, k, block_q, block_k, theta, vis)
    return keep | diag | dense | (kept if kept is not None else False)


def dense_token_mask(block_mask: torch.Tensor, nq_tok: int, nk_tok: int, block_q: int,
                     block_k: int, is_causal: bool, kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Expand a (B, H, nq, nk) block mask to a (B, H, Nq, Nk) token mask (causal and the
    key-padding mask kv_keep (B, Nk) applied)."""
    m = block_mask.repeat_interleave(block_q, dim=-2)[..., :nq_tok, :]
    m = m.repeat_interleave(block_k, dim=-1)[..., :nk_tok]
    if is_causal:
        m = m & torch.ones(nq_tok, nk_tok, dtype=torch.bool, device=m.device).tril()
    if kv_keep is not None:
        m = m & kv_keep[:, None, None, :]
    return m


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                     scale: float | None = None, is_causal: bool = False, block_q: int = 128,
                     block_k: int = 64, kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention with every score outside the kept blocks (and, with kv_keep (B, Nk), on
    padding keys) set to -inf (GQA aware); a row that sees no key gives 0.

    Differentiable (use float64 inputs for a reference).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    m = dense_token_mask(block_mask, q.shape[2], k.shape[2], block_q, block_k, is_causal, kv_keep)
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~m, float("-inf"))
    sees = m.any(-1, keepdim=True)   # a row that sees no key gives 0 (SDPA's safe softmax)
    return torch.softmax(s.masked_fill(~sees, 0.0), dim=-1).masked_fill(~sees, 0.0) @ v


def pv_filter_blocks(scores: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                     block_q: int, block_k: int, threshold: float) -> torch.Tensor:
    """SpargeAttn's online softmax-aware filter, as the blocks it leaves computed.

    scores: (B, H, rows, Nk) scaled scores (-inf where masked) of whole query blocks (the last
    may be partial); kv_num_blocks (B, H, nqb), kv_indices (B, H, nqb, nk): those blocks' rows
    of the mask. Walking each query block's kept key blocks in kv_indices order, a block is
    skipped when every row's largest score in it is more than ``threshold`` below that row's
    running max over the blocks before it (skipped ones included: a skipped block is below the
    max, so cannot raise it). Returns (B, H, nqb, nk) bool: the kept blocks not skipped."""
    B, H, rows, Nk = scores.shape
    nqb, nk = kv_indices.shape[-2:]
    pad = nk * block_k - Nk
    rm = F.pad(scores, (0, pad), value=float("-inf")).view(B, H, rows, nk, block_k).amax(-1)
    idx = kv_indices.long().clamp(0, nk - 1)   # entries past kv_num_blocks may hold anything
    order = idx.repeat_interleave(block_q, dim=2)[:, :, :rows]
    rm = torch.gather(rm, -1, order)                       # (B, H, rows, nk) in walk order
    before = torch.cummax(rm, -1).values.roll(1, -1)
    before[..., 0] = float("-inf")
    live = rm >= before - threshold                        # -inf >= -inf: a row yet unseen is live
    live = F.pad(live, (0, 0, 0, nqb * block_q - rows)).view(B, H, nqb, block_q, nk).any(3)
    kept = torch.arange(nk, device=scores.device) < kv_num_blocks[..., None].long()
    out = torch.zeros(B, H, nqb, nk, dtype=torch.int8, device=scores.device)
    return out.scatter_reduce_(-1, idx, (live & kept).to(torch.int8), "amax").bool()


def pv_filter_mask(q: torch.Tensor, k: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                   scale: float, is_causal: bool, block_q: int, block_k: int, threshold: float,
                   kv_keep: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, H, nq, nk) bool block mask the forward computes under the P·V filter with
    ``threshold`` (λ): :func:`pv_filter_blocks` on the full scores (a reference: O(Nq·Nk))."""
    G = q.shape[1] // k.shape[1]
    nk = cdiv(k.shape[2], block_k)
    dense = torch.ones(*kv_indices.shape[:-1], nk, dtype=torch.bool, device=q.device)
    m = dense_token_mask(dense, q.shape[2], k.shape[2], block_q, block_k, is_causal, kv_keep)
    s = (q @ k.repeat_interleave(G, dim=1).transpose(-2, -1)) * scale
    return pv_filter_blocks(s.masked_fill(~m, float("-inf")), kv_num_blocks, kv_indices, block_q, block_k,
                            threshold)
