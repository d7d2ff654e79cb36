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
from sparge_compile.parallel import (
    balanced_head_order,
    kept_blocks_per_head,
    merge_lse,
    ring_attention,
    ulysses_attention,
    usp_attention,
    usp_groups,
)
from sparge_compile.parallel.mask import mask_from_pooled

CFG = sc.SpargeConfig(topk=0.3, topp=0.5, block_q=32, block_k=32, min_seq_len=0)
B, H, N, D = 2, 4, 256, 32
TOL = 1e-5      # against the single-process fp32 op, same mask
TOL64 = 2e-5    # fp32 against the float64 masked attention, same mask


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
    """Max relative error of the (out, dq, dk, dv) shards against the single-process op on the whole
    sequence ("err"), and against the float64 masked attention with the same mask ("err64")."""
    num, idx = dense_to_indices(dense)
    errs = {}
    for name, dtype in (("err", torch.float32), ("err64", torch.float64)):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        if dtype == torch.float32:
            out, _ = ops.block_sparse_attention_op(*leaves, num, idx, 1 / D ** 0.5, causal, CFG.block_q,
                                                   CFG.block_k)
        else:
            out = R.masked_attention(*leaves, dense, 1 / D ** 0.5, causal, CFG.block_q, CFG.block_k)
        out.backward(do.to(dtype))
        want = [out[:, :, rows]] + [t.grad[:, :, r] for t, r in zip(leaves, (rows, kv_rows, kv_rows))]
        errs[name] = max(_rel(a.to(dtype), b.detach()) for a, b in zip([par_out] + list(par_grads), want))
    return errs


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
    order, extra = None, {}
    if balance:   # the order an earlier call's masks give, then the call with it
        u = torch.randn(D, generator=torch.Generator().manual_seed(7))
        q, k = q.clone(), k.clone()
        q[:, :2] += u                           # heads 0, 1: key block 0 takes the softmax mass,
        k[:, :2, : CFG.block_k] += 3 * u        # so top-p keeps fewer blocks than on heads 2, 3
        _, _, m0 = _run(lambda *t: ulysses_attention(*t, is_causal=causal, config=CFG, return_mask=True),
                        q, k, v, do, rows, rows)
        loads = kept_blocks_per_head(m0)
        order = balanced_head_order(loads, P, Hkv)
        extra = {"loads": loads.tolist(), "order": order}
    def fn(*t):
        return ulysses_attention(*t, is_causal=causal, config=CFG, return_mask=True, head_order=order)
    out, grads, mask = _run(fn, q, k, v, do, rows, rows)
    h = H // P
    dense = _gather_mask(mask.to_dense(), rank * h, 0, (B, H, N // CFG.block_q, N // CFG.block_k))
    if order is not None:   # gathered in the permuted head order: back to the model's
        qo = [kv * (H // Hkv) + g for kv in order for g in range(H // Hkv)]
        dense = dense[:, torch.argsort(torch.tensor(qo))]
        extra["rank_kept"] = int(mask.kv_num_blocks.sum())
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, causal, CFG).to_dense()))
    return {**_errors(out, grads, dense, q, k, v, do, causal, rows, rows), "same_mask": same, **extra}


def _case_ring(causal, Hkv):
    rank, P = dist.get_rank(), dist.get_world_size()
    q, k, v, do = _full(Hkv, 11 + causal + Hkv)
    n = N // P
    rows = slice(rank * n, (rank + 1) * n)
    def fn(*t):
        return ring_attention(*t, is_causal=causal, config=CFG, return_mask=True)
    out, grads, mask = _run(fn, q, k, v, do, rows, rows)
    dense = _gather_mask(mask.to_dense(), 0, rank * n // CFG.block_q, (B, H, N // CFG.block_q,
                                                                       N // CFG.block_k))
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, causal, CFG).to_dense()))
    return {**_errors(out, grads, dense, q, k, v, do, causal, rows, rows), "same_mask": same}


def _case_ring_cross():
    """Queries and keys of different lengths (non-causal): 3 query blocks and 4 key blocks a rank
    on 2 ranks."""
    rank, P = dist.get_rank(), dist.get_world_size()
    q, k, v, do = _full(H, 41)
    Nq = 3 * CFG.block_q * P
    q, do = q[:, :, :Nq].contiguous(), do[:, :, :Nq].contiguous()
    n, nk = Nq // P, N // P
    rows, kv_rows = slice(rank * n, (rank + 1) * n), slice(rank * nk, (rank + 1) * nk)
    def fn(*t):
        return ring_attention(*t, config=CFG, return_mask=True)
    out, grads, mask = _run(fn, q, k, v, do, rows, kv_rows)
    dense = _gather_mask(mask.to_dense(), 0, rank * 3, (B, H, Nq // CFG.block_q, N // CFG.block_k))
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, False, CFG).to_dense()))
    return {**_errors(out, grads, dense, q, k, v, do, False, rows, kv_rows), "same_mask": same}


def _case_ring_given_mask(causal):
    """ring_attention(block_mask=...) with the rows of the single-process prediction."""
    rank, P = dist.get_rank(), dist.get_world_size()
    q, k, v, do = _full(H, 31 + causal)
    n = N // P
    rows = slice(rank * n, (rank + 1) * n)
    whole = sc.predict_block_mask(q, k, None, causal, CFG)
    r0, r1 = rank * n // CFG.block_q, (rank + 1) * n // CFG.block_q
    mine = sc.SpargeBlockMask(whole.kv_num_blocks[:, :, r0:r1], whole.kv_indices[:, :, r0:r1], n, N,
                              CFG.block_q,
                              CFG.block_k, causal)
    def fn(*t):
        return (ring_attention(*t, is_causal=causal, block_mask=mine), None)
    out, grads, _ = _run(fn, q, k, v, do, rows, rows)
    return {**_errors(out, grads, whole.to_dense(), q, k, v, do, causal, rows, rows), "same_mask": True}


def _case_usp(causal, groups):
    rank, P = dist.get_rank(), dist.get_world_size()
    U = dist.get_world_size(groups[0])
    q, k, v, do = _full(H, 21 + causal)
    n = N // P
    rows = slice(rank * n, (rank + 1) * n)
    def fn(*t):
        return usp_attention(*t, *groups, is_causal=causal, config=CFG, return_mask=True)
    out, grads, mask = _run(fn, q, k, v, do, rows, rows)
    ring_idx, u_idx = divmod(rank, U)
    row0 = ring_idx * (N // (P // U)) // CFG.block_q
    dense = _gather_mask(mask.to_dense(), u_idx * (H // U), row0, (B, H, N // CFG.block_q, N // CFG.block_k))
    same = bool(torch.equal(dense, sc.predict_block_mask(q, k, None, causal, CFG).to_dense()))
    return {**_errors(out, grads, dense, q, k, v, do, causal, rows, rows), "same_mask": same}


def _cases(P: int):
    cases = {"ulysses-balanced": lambda: _case_ulysses(False, H, balance=True),
             "ring-given-mask": lambda: _case_ring_given_mask(True)}
    for causal in (False, True):
        cases[f"ulysses-causal{causal}"] = lambda c=causal: _case_ulysses(c, H)
        cases[f"ring-causal{causal}"] = lambda c=causal: _case_ring(c, H)
    if P == 2:
        cases["ulysses-gqa"] = lambda: _case_ulysses(False, 2)
        cases["ring-gqa"] = lambda: _case_ring(True, 2)
        cases["ring-cross"] = _case_ring_cross
    if P == 4:
        groups = usp_groups(2, 2)
        for causal in (False, True):
            cases[f"usp-causal{causal}"] = lambda c=causal: _case_usp(c, groups)
    return cases


def _bad_inputs():
    """The errors the parallel functions raise, as {case: message}, run on every rank."""
    q, k, v, _ = _full(H, 0)
    calls = {
        "ring-shard-not-block-multiple": lambda: ring_attention(q[:, :, :48], k[:, :, :48], v[:, :, :48],
                                                                config=CFG),
        "ring-causal-unequal-shards": lambda: ring_attention(q[:, :, :32], k[:, :, :64], v[:, :, :64],
                                                             is_causal=True, config=CFG),
        "ulysses-heads-not-divisible": lambda: ulysses_attention(q[:, :3], k[:, :3], v[:, :3], config=CFG),
        "ulysses-head-order": lambda: ulysses_attention(q, k, v, config=CFG, head_order=[0, 0, 1, 2]),
        "usp-degrees": lambda: usp_groups(3, 1),
        "ring-mask-of-the-shard": lambda: ring_attention(
            q[:, :, :64], k[:, :, :64], v[:, :, :64],
            block_mask=sc.predict_block_mask(q[:, :, :64], k[:, :, :64], config=CFG)),
        "ulysses-mask-shape": lambda: ulysses_attention(
            q[:, :, :64], k[:, :, :64], v[:, :, :64],
            block_mask=sc.predict_block_mask(q[:, :, :64], k[:, :, :64], config=CFG)),
    }
    found = {}
    for name, call in calls.items():
        try:
            call()
            found[name] = None
        except (ValueError, TypeError) as e:
            found[name] = str(e)
    return found


def _worker(rank: int, P: int, port: int, path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: fn() for name, fn in _cases(P).items()}
        results["bad-inputs"] = _bad_inputs()
        every = [None] * P
        dist.all_gather_object(every, results)
        if rank == 0:
            with open(path, "w") as f:
                json.dump({name: [r[name] for r in every] for name in results}, f)
    finally:
        dist.barrier()   # no rank leaves (and takes rank 0's store with it) while another still talks
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4])
def world(request, tmp_path_factory):
    P = request.param
    path = str(tmp_path_factory.mktemp(f"cp{P}") / "results.json")
    for attempt in range(3):   # a port taken between _free_port and the bind, or a crash at exit
        try:
            mp.spawn(_worker, args=(P, _free_port(), path), nprocs=P, join=True)
            break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if os.path.exists(path):   # rank 0 wrote every rank's results: the checks ran
                break
            if attempt == 2:           # failing every time: a real error, not the environment
                raise
    with open(path) as f:
        return P, json.load(f)


def test_parallel_matches_single_process_op(world):
    P, results = world
    results = {name: rs for name, rs in results.items() if name != "bad-inputs"}
    expected = {"ulysses-causalFalse", "ulysses-causalTrue", "ulysses-balanced", "ring-causalFalse",
                "ring-causalTrue",
                "ring-given-mask"}
    expected |= {"ulysses-gqa", "ring-gqa", "ring-cross"} if P == 2 else {"usp-causalFalse", "usp-causalTrue"}
    assert set(results) == expected
    for key, tol in (("err", TOL), ("err64", TOL64)):
        bad = {name: [r[key] for r in rs] for name,
               rs in results.items() if not max(r[key] for r in rs) <= tol}
        assert not bad, f"{P} ranks: relative error ({key}) of (out, dq, dk, dv) above {tol}: {bad}"


def test_parallel_masks_equal_single_process_prediction(world):
    P, results = world
    results = {name: rs for name, rs in results.items() if name != "bad-inputs"}
    differ = [name for name, rs in results.items() if not all(r["same_mask"] for r in rs)]
    assert not differ, \
        f"{P} ranks: the parallel mask differs from sc.predict_block_mask on the whole sequence: {differ}"


def test_balanced_head_order_evens_the_ranks_kept_blocks(world):
    P, results = world
    r0 = results["ulysses-balanced"][0]
    loads, order = r0["loads"], r0["order"]
    per = len(order) // P
    plain = max(sum(loads[r * per: (r + 1) * per]) for r in range(P))
    ranked = [r["rank_kept"] for r in results["ulysses-balanced"]]
    assert ranked == [sum(loads[h] for h in order[r * per: (r + 1) * per]) for r in range(P)]
    assert sorted(order) == list(range(len(loads))) and max(ranked) <= plain
    if P == 2:   # the two sparse heads are 0 and 1: in the plain order both land on rank 0
        assert max(ranked) < plain, (loads, order)


@pytest.mark.parametrize("case, words", [
    ("ring-shard-not-block-multiple", "multiple of block_k"),
    ("ring-causal-unequal-shards", "same length"),
    ("ulysses-heads-not-divisible", "multiples of the group size"),
    ("ulysses-head-order", "head_order must be a permutation"),
    ("usp-degrees", "must equal the world size"),
    ("ring-mask-of-the-shard", "the whole key sequence"),
    ("ulysses-mask-shape", "block_mask"),
])
def test_bad_inputs_raise_errors_naming_the_argument(world, case, words):
    P, results = world
    messages = [r[case] for r in results["bad-inputs"]]
    assert len(messages) == P and all(m is not None and words in m for m in messages), messages


# ---- in-process pieces (no process group) -------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_mask_from_pooled_rows_equal_the_reference_mask(causal):
    q, k, _, _ = _full(2, 5)
    want = R.reference_block_mask(q, k, None, causal, CFG.topk, CFG.topp, CFG.mode, CFG.block_q, CFG.block_k)
    kbar = R.pool_blocks(k, CFG.block_k)
    n = N // 4
    for r in range(4):
        qbar = R.pool_blocks(q[:, :, r * n: (r + 1) * n], CFG.block_q)
        got = mask_from_pooled(qbar, kbar, 1 / D ** 0.5, causal, CFG, r * n, n, N)
        assert torch.equal(got, want[:, :, r * n // CFG.block_q: (r + 1) * n // CFG.block_q]), r


def test_merge_lse_equals_attention_over_the_union_and_keeps_empty_rows_finite():
    g = torch.Generator().manual_seed(3)
    s, v = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g,
                                                                            dtype=torch.float64)
    s[1, :4] = float("-inf")          # row 1 sees no key of the first part
    s[2, :] = float("-inf")           # row 2 sees no key at all
    parts = []
    for cols in (slice(0, 4), slice(4, 8)):
        lse = torch.logsumexp(s[:, cols], -1)
        ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        parts.append((torch.exp(s[:, cols] - ref[:, None]) @ v[cols], lse))
    out, lse = merge_lse(*parts[0], *parts[1])
    assert torch.allclose(out[[0, 1, 3, 4]], torch.softmax(s[[0, 1, 3, 4]], -1) @ v, atol=1e-12)
    assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64)) and torch.isneginf(lse[2])
    assert torch.allclose(lse[[0, 1, 3, 4]], torch.logsumexp(s[[0, 1, 3, 4]], -1))


def test_balanced_head_order_assigns_equal_counts_by_load():
    order = balanced_head_order([10, 1, 1, 10], 2)
    assert sorted(order) == [0, 1, 2, 3]
    assert sorted(sum([10, 1, 1, 10][h] for h in order[r * 2: r * 2 + 2]) for r in range(2)) == [11, 11]
    # GQA: kv head h carries query heads 2h, 2h + 1
    assert balanced_head_order([5, 5, 5, 5, 1, 1, 1, 1], 2, kv_heads=4) == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="kv_heads"):
        balanced_head_order([1, 2, 3], 2)
