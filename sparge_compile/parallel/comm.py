"""The collectives context parallelism needs, on torch.distributed (NCCL on GPUs, gloo on the CPU).

* :func:`seq_to_heads` / :func:`heads_to_seq`  Ulysses' all-to-all, differentiable (each is the
  other's backward: an all-to-all is a permutation of the data, linear)
* :func:`ring_shift`                           send tensors to the next rank, receive the previous one's
* :func:`all_gather_cat`                        all-gather along an axis (no gradient; pooled keys)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_size(group) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and the group's size."""
    return dist.get_rank(group), dist.get_world_size(group)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over the leading axis (one slice per rank)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, group=group)
    return y


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    B, H, n, D = x.shape
    P = dist.get_world_size(group)
    parts = x.reshape(B, P, H // P, n, D).permute(1, 0, 2, 3, 4)      # (P, B, H/P, n, D): head group p
    y = _all_to_all(parts, group)                                       # slice p: sequence chunk p
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * n, D)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    B, h, N, D = x.shape
    P = dist.get_world_size(group)
    parts = x.reshape(B, h, P, N // P, D).permute(2, 0, 1, 3, 4)      # (P, B, h, N/P, D): chunk p
    y = _all_to_all(parts, group)                                       # slice p: head group p
    return y.permute(1, 0, 2, 3, 4).reshape(B, P * h, N // P, D)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return _seq_to_heads(x, group) if to_heads else _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        back = _heads_to_seq(g, ctx.group) if ctx.to_heads else _seq_to_heads(g, ctx.group)
        return back, None, None


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, H, N/P, D) sequence shard -> (B, H/P, N, D): every token of this rank's H/P heads."""
    return _AllToAll.apply(x, group, True)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, H/P, N, D) -> (B, H, N/P, D): the inverse of :func:`seq_to_heads`."""
    return _AllToAll.apply(x, group, False)


def ring_shift(tensors, group=None) -> tuple[list, list]:
    """Start sending ``tensors`` to the next rank of the group and receiving the previous rank's.

    Returns (received buffers, handle): :func:`wait_all` the handle before reading the buffers.
    """
    rank, P = group_rank_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % P) if group is not None else (rank + 1) % P
    prv = dist.get_global_rank(group, (rank - 1) % P) if group is not None else (rank - 1) % P
    bufs = [torch.empty_like(t) for t in tensors]
    sends = [t.contiguous() for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in sends]
    ops += [dist.P2POp(dist.irecv, b, prv, group) for b in bufs]
    return bufs, (dist.batch_isend_irecv(ops), sends)   # the sends stay referenced until waited on


def wait_all(handle) -> None:
    for r in handle[0]:
        r.wait()


def all_gather_cat(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape on all ranks) along ``dim``, in rank order."""
    P = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out, dim=dim)
