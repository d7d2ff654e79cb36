"""Context parallelism on the CPU: gloo process groups of 2 and 4 ranks (torch.multiprocessing).

Every parallel result is compared with the single-process sparse op on the whole sequence with the
same mask (the parallel code's masks, gathered): outputs and the gradients dq, dk, dv. The masks
themselves are compared with the single-process prediction. Each world size is one spawn (all
cases in it), so the file stays within CI's time on 2 cores.
"""
from __future__ import annotations

import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparge_compile as sc
from sparge_compile import ops
from sparge_compile import reference as R
from sparge_compile.kernels.torch_impl import dense_to_indices
from sparge_compile.parallel import (balanced_head_order, kept_blocks_per_head, merge_lse, ring_attention,
                                     ulysses_attention, usp_attention, usp_groups)
from sparge_compile.parallel.mask import mask_from_pooled

CFG = sc.SpargeConfig(topk=0.3, topp=0.5, block_q=32, block_k=32, min_seq_len=0)
B, H, N, D = 1, 4, 256, 32
TOL = 1e-5


def _full(Hkv: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, N, D, generator=g) for h in (H, Hkv, Hkv, H))
    return q, k, v, do


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _gather_mask(dense_piece, head0: int, row0: int, shape):
    """The whole (B, H, nq, nk) dense mask from every rank's piece (its heads from head0, query
    blocks from row0)."""
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (dense_piece, head0, row0))
    full = torch.zeros(shape, dtype=torch.bool)
    for piece, h0, r0 in pieces:
        full[:, h0: h0 + piece.shape[1], r0: r0 + piece.shape[2]] = piece
    return full


def _errors(par_out, par_grads, dense, q, k, v, do, causal, rows, kv_rows):
    """Max relative error of (out, dq, dk, dv) shards against the single-process op on the whole sequence."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    num, idx = dense_to_indices(dense)
    out, _ = ops.block_sparse_attention_op(*leaves, num, idx, 1 / D ** 0.5, causal, CFG.block_q, CFG.block_k)
    out.backward(do)
    want = [out[:, :, rows]] + [t.grad[:, :, r] for t, r in zip(leaves, (rows, kv_rows, kv_rows))]
    return max(_rel(a, b.detach()) for a, b in zip([par_out] + list(par_grads), want))


def _run(fn, q, k, v, do, rows, kv_rows):
    leaves = [t[:, :, r].clone().requires_grad_() for t, r in zip((q, k, v), (rows, kv_rows, kv_rows))]
    out, mask = fn(*leaves)
    out.backward(do[:, :, rows])
    return out.detach(), [t.grad for t in leaves], mask


def _case_ulysses(causal, Hkv, balance=False):
    rank, P = dist.get_rank(), dist.get_world_size()
    q, k, v, do = _full(Hkv, 1 + causal + Hkv)
    n = N // P
    rows = slice(rank * n, (rank + 1) * n)
    order = None
    if balance:   # the order an earlier call's masks give, then the call with it
        _, _, m0 = _run(lambda *t: ulysses_attention(*t, is_causal=causal, config=CFG, return_mask=True),
                        q, k, v, do, rows, rows)
        order = balanced_head_order(kept_blocks_per_head(m0), P, Hkv)
    fn = lambda *t: ulysses_attention(*t, is_causal=causal, config=CFG, return_mask=True, head_order=order)  # noqa: E731
    out, grads, mask = _run(fn, q, k, v, do, rows, rows)
    h = H // P
    dense = _gather_mask(mask.to_dense(), rank * h, 0, (B, H, N // CFG.block_q, N // CFG.block_k))
    if order is not None:   # gathered in the permuted head order: back to the model's
        qo = [kv * (H // Hkv) + g for kv in order for g in range(H // Hkv)]
        dense = dense[:, torch.argsort(torch.tensor(qo))]
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, causal, CFG).to_dense()))
    return {"err": _errors(out, grads, dense, q, k, v, do, causal, rows, rows), "same_mask": same}


def _case_ring(causal, Hkv):
    rank, P = dist.get_rank(), dist.get_world_size()
    q, k, v, do = _full(Hkv, 11 + causal + Hkv)
    n = N // P
    rows = slice(rank * n, (rank + 1) * n)
    fn = lambda *t: ring_attention(*t, is_causal=causal, config=CFG, return_mask=True)  # noqa: E731
    out, grads, mask = _run(fn, q, k, v, do, rows, rows)
    dense = _gather_mask(mask.to_dense(), 0, rank * n // CFG.block_q, (B, H, N // CFG.block_q, N // CFG.block_k))
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, causal, CFG).to_dense()))
    return {"err": _errors(out, grads, dense, q, k, v, do, causal, rows, rows), "same_mask": same}


def _case_usp(causal, groups):
    rank, P = dist.get_rank(), dist.get_world_size()
    U = dist.get_world_size(groups[0])
    q, k, v, do = _full(H, 21 + causal)
    n = N // P
    rows = slice(rank * n, (rank + 1) * n)
    fn = lambda *t: usp_attention(*t, *groups, is_causal=causal, config=CFG, return_mask=True)  # noqa: E731
    out, grads, mask = _run(fn, q, k, v, do, rows, rows)
    ring_idx, u_idx = divmod(rank, U)
    row0 = ring_idx * (N // (P // U)) // CFG.block_q
    dense = _gather_mask(mask.to_dense(), u_idx * (H // U), row0, (B, H, N // CFG.block_q, N // CFG.block_k))
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, causal, CFG).to_dense()))
    return {"err": _errors(out, grads, dense, q, k, v, do, causal, rows, rows), "same_mask": same}


def _cases(P: int):
    cases = {}
    for causal in (False, True):
        cases[f"ulysses-causal{causal}"] = lambda c=causal: _case_ulysses(c, H)
        cases[f"ring-causal{causal}"] = lambda c=causal: _case_ring(c, H)
    if P == 2:
        cases["ulysses-gqa"] = lambda: _case_ulysses(False, 2)
        cases["ulysses-balanced"] = lambda: _case_ulysses(True, H, balance=True)
        cases["ring-gqa"] = lambda: _case_ring(True, 2)
    if P == 4:
        groups = usp_groups(2, 2)
        for causal in (False, True):
            cases[f"usp-causal{causal}"] = lambda c=causal: _case_usp(c, groups)
    return cases


def _worker(rank: int, P: int, port: int, path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: fn() for name, fn in _cases(P).items()}
        every = [None] * P
        dist.all_gather_object(every, results)
        if rank == 0:
            merged = {name: {"err": max(r[name]["err"] for r in every),
                             "same_mask": all(r[name]["same_mask"] for r in every)} for name in results}
            with open(path, "w") as f:
                json.dump(merged, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4])
def world(request, tmp_path_factory):
    P = request.param
    path = str(tmp_path_factory.mktemp(f"cp{P}") / "results.json")
    mp.spawn(_worker, args=(P, _free_port(), path), nprocs=P, join=True)
    with open(path) as f:
        return P, json.load(f)


def test_parallel_matches_single_process_op(world):
    P, results = world
    expected = {"ulysses-causalFalse", "ulysses-causalTrue", "ring-causalFalse", "ring-causalTrue"}
    expected |= {"ulysses-gqa", "ulysses-balanced", "ring-gqa"} if P == 2 else {"usp-causalFalse", "usp-causalTrue"}
    assert set(results) == expected
    bad = {name: r["err"] for name, r in results.items() if not r["err"] <= TOL}
    assert not bad, f"{P} ranks: relative error of (out, dq, dk, dv) above {TOL}: {bad}"


def test_parallel_masks_equal_single_process_prediction(world):
    P, results = world
    differ = [name for name, r in results.items() if not r["same_mask"]]
    assert not differ, f"{P} ranks: the parallel mask differs from sc.predict_block_mask on the whole sequence: {differ}"
