"""Ulysses and ring combined (USP, as in yunchang / xDiT): Ulysses over heads inside groups of
``ulysses_degree`` consecutive ranks, ring attention over the sequence between those groups."""
from __future__ import annotations

import torch.distributed as dist

from ..attention import _config
from ..validate import check_int
from .comm import heads_to_seq, seq_to_heads
from .ring import ring_attention
from .ulysses import _check_heads


def usp_groups(ulysses_degree: int, ring_degree: int):
    """(ulysses_group, ring_group) of this rank; collective: every rank must call it, in the same order.

    Rank g = ring_index * ulysses_degree + ulysses_index: a Ulysses group is ulysses_degree
    consecutive ranks (consecutive sequence shards), a ring group the ranks of one head slice.
    """
    U, Rd = check_int("ulysses_degree", ulysses_degree, 1), check_int("ring_degree", ring_degree, 1)
    if U * Rd != dist.get_world_size():
        raise ValueError(f"ulysses_degree * ring_degree ({U} * {Rd}) must equal the world size "
                         f"({dist.get_world_size()})")
    rank, mine = dist.get_rank(), [None, None]
    for r in range(Rd):
        ranks = list(range(r * U, (r + 1) * U))
        g = dist.new_group(ranks)
        mine[0] = g if rank in ranks else mine[0]
    for u in range(U):
        ranks = list(range(u, U * Rd, U))
        g = dist.new_group(ranks)
        mine[1] = g if rank in ranks else mine[1]
    return mine[0], mine[1]


def usp_attention(q, k, v, ulysses_group, ring_group, scale=None, is_causal: bool = False, config=None,
                  return_mask: bool = False):
    """Block-sparse attention over a Ulysses x ring grid (groups from :func:`usp_groups`).

    q, k, v: (B, H, N/P, D), rank g holding sequence shard g. The all-to-all gives each rank H/U
    heads of N/R tokens; ring attention over ring_group (mask predicted on the whole key set)
    runs them; the all-to-all back returns (B, H, N/P, D) (and the ring's mask with return_mask).
    """
    cfg = _config(config)
    _check_heads(q, k, dist.get_world_size(ulysses_group))
    qh, kh, vh = (seq_to_heads(t, ulysses_group) for t in (q, k, v))
    out, mask = ring_attention(qh, kh, vh, scale, is_causal, cfg, ring_group, return_mask=True)
    out = heads_to_seq(out, ulysses_group)
    return (out, mask) if return_mask else out
