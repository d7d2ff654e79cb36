"""Linear-branch timing (GPU): the cost of sparse + linear attention (SLA, issue 19) against the
sparse kernel alone at the same mask.

1. Correctness first (bf16, B=1, H=4/Hkv=2, N=4133, D=128, causal and not, both feature maps):
   the Triton linear branch's output and gradients against the float64 PyTorch definition;
   exits non-zero on a failure.
2. At B=1, H=12, N=32768, D=128, bf16, masks of a uniform kept count per row (top-k rule) at
   95% and 97% block sparsity: the sparse forward alone (kernels/forward.py's wrapper), the
   linear branch alone, sparse + linear (the two ops and SLA's combine O_s + proj(O_lin)),
   forward and forward + backward (through the ops' autograd), and the ratios. The issue's
   target: sparse + linear ≤ 1.15x the sparse kernel at the same sparsity.
``triton.testing.do_bench`` medians in ms.

    PYTHONPATH=. python -m bench.tools.linear [--out DIR]     (writes DIR/linear.json; default $OUT or ./out)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import triton

from bench import output as O
from bench.cli import module_entry
from bench.common import environment
from bench.tools import require_cuda

B, H, N, D = 1, 12, 32768, 128
BLOCK_Q, BLOCK_K = 128, 64
SPARSITIES = (0.95, 0.97)
TARGET = 1.15
COMMON_ARGS = False  # no --quick: a GPU tool


def time_ms(fn) -> float:
    return round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)


def randn(*shape, g, grad=False) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_correctness() -> list[dict]:
    """The kernels against the float64 definition on the GPU; SystemExit on a failure."""
    from sparge_compile import kernels, ops_linear
    from sparge_compile import linear_branch as lb
    from sparge_compile.kernels.torch_impl import indices_to_dense

    rows, bad = [], []
    g = torch.Generator(device="cuda").manual_seed(0)
    for causal in (False, True):
        for kind in lb.FEATURE_MAPS:
            q = randn(1, 4, 4133, D, g=g, grad=True)
            k, v = randn(1, 2, 4133, D, g=g, grad=True), randn(1, 2, 4133, D, g=g, grad=True)
            num, idx = kernels.predict_mask(q.detach(), k.detach(), D ** -0.5, causal, 0.1, 0.0, "topk",
                                            BLOCK_Q, BLOCK_K)
            out = ops_linear.linear_dropped_op(q, k, v, num, idx, BLOCK_Q, BLOCK_K, causal, kind, 1e-5)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
            keep = indices_to_dense(num, idx, idx.shape[-1])
            ref = lb.linear_attention_dropped(qd, kd, vd, keep, BLOCK_Q, BLOCK_K, causal, kind, 1e-5)
            ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
            row = {"causal": causal, "feature_map": kind, "out": rel(out, ref)}
            row.update({n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)})
            rows.append(row)
            print("check", row, flush=True)
            if not (row["out"] < 2e-2 and max(row["dq"], row["dk"], row["dv"]) < 4e-2):
                bad.append(row)
    if bad:
        raise SystemExit(f"linear branch: GPU results differ from the float64 reference: {bad}")
    return rows


def _uniform_mask(q, k, sparsity: float):
    """A top-k mask keeping round((1 − sparsity)·nk) key blocks in every row (from the pooled scores)."""
    from sparge_compile import kernels

    return kernels.predict_mask(q, k, D ** -0.5, False, 1.0 - sparsity, 0.0, "topk", BLOCK_Q, BLOCK_K)


def time_sparsity(q, k, v, dout, sparsity: float) -> dict:
    """The timings of one sparsity (see the module docstring)."""
    from sparge_compile import SpargeBlockMask, ops, ops_linear
    from sparge_compile import linear_branch as lb
    from sparge_compile.kernels.forward import attention_fwd_triton
    from sparge_compile.kernels.linear import _states, block_states_triton, linear_fwd_triton

    num, idx = _uniform_mask(q.detach(), k.detach(), sparsity)
    nk = idx.shape[-1]
    mask = SpargeBlockMask(num, idx, N, N, BLOCK_Q, BLOCK_K, False)
    branch = lb.LinearBranch(D, H, combine="sla").cuda()
    scale = D ** -0.5

    def sparse_op():
        return ops.block_sparse_attention_op(q, k, v, num, idx, scale, False, BLOCK_Q, BLOCK_K)[0]

    def sparse_linear():
        out_s = sparse_op()
        out_l = ops_linear.linear_dropped_op(q, k, v, num, idx, BLOCK_Q, BLOCK_K, False, "softmax", 1e-5)
        return out_s + branch.proj(out_l.float()).to(out_s.dtype)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), dout)

    res = {"sparsity": round(1 - float(num.float().mean()) / nk, 4)}
    with torch.no_grad():
        res["sparse_fwd_ms"] = time_ms(lambda: attention_fwd_triton(q, k, v, num, idx, scale, False, BLOCK_Q,
                                                                    BLOCK_K))
        res["linear_fwd_ms"] = time_ms(lambda: linear_fwd_triton(q, k, v, num, idx, BLOCK_Q, BLOCK_K))
        # its parts: the states alone, states + the total's scan (the rest is the per-query-block kernel)
        res["linear_states_ms"] = time_ms(lambda: block_states_triton(k, v, BLOCK_K))
        res["linear_states_scan_ms"] = time_ms(lambda: _states(k, v, BLOCK_K, False, "softmax"))
        res["sparse_linear_fwd_ms"] = time_ms(sparse_linear)
        # kernels/linear_recompute.py (opt-in): no per-block states, kept blocks from the K/V tiles
        from sparge_compile.kernels import linear_recompute as lr

        rec = lambda: lr.linear_fwd_recompute(q, k, v, num, idx, BLOCK_Q, BLOCK_K, True, 1e-5)  # noqa: E731
        res["linear_recompute_vs_states_rel"] = rel(rec(), linear_fwd_triton(q, k, v, num, idx, BLOCK_Q,
                                                                             BLOCK_K))
        res["linear_recompute_fwd_ms"] = time_ms(rec)
        res["ratio_fwd_recompute"] = round((res["sparse_fwd_ms"] + res["linear_recompute_fwd_ms"])
                                           / res["sparse_fwd_ms"], 3)
        res.update(time_sla_all(q, k, v, num, idx, mask, res["sparse_fwd_ms"]))
    res["sparse_fwd_bwd_ms"] = time_ms(fwd_bwd(sparse_op))
    res["sparse_linear_fwd_bwd_ms"] = time_ms(fwd_bwd(sparse_linear))
    res["ratio_fwd"] = round(res["sparse_linear_fwd_ms"] / res["sparse_fwd_ms"], 3)
    res["ratio_fwd_bwd"] = round(res["sparse_linear_fwd_bwd_ms"] / res["sparse_fwd_bwd_ms"], 3)
    res["meets_target"] = res["ratio_fwd"] <= TARGET and res["ratio_fwd_bwd"] <= TARGET
    return res


def time_sla_all(q, k, v, num, idx, mask, sparse_ms: float) -> dict:
    """SLA's released form (combine="sla-all": O_s + proj(linear attention over all keys)) on the
    same mask: the sparse forward then kernels/linear_all.py's states and term kernels, directly
    and through sparse_linear_attention (its op dispatch included), their agreement, and the
    ratio to the sparse forward alone."""
    from sparge_compile import linear_branch as lb
    from sparge_compile.kernels import linear_all
    from sparge_compile.kernels.forward import attention_fwd_triton

    full = lb.LinearBranch(D, H, combine="sla-all").to(q.device)
    with torch.no_grad():
        full.proj.weight.normal_(0, D ** -0.5)
        full.proj.bias.normal_(0, 0.1)
    w, b, scale = full.proj.weight, full.proj.bias, D ** -0.5

    def kernels_only():
        out_s, _ = attention_fwd_triton(q, k, v, num, idx, scale, False, BLOCK_Q, BLOCK_K)
        return linear_all.sla_all_fwd_triton(out_s, q, k, v, w, b)

    api = lambda: lb.sparse_linear_attention(q, k, v, full, block_mask=mask)  # noqa: E731
    res = {"sla_all_api_vs_kernels_rel": rel(api(), kernels_only()),
           "sla_all_states_ms": time_ms(lambda: linear_all.folded_states(k, v, w, b)),
           "sla_all_fwd_ms": time_ms(kernels_only), "sla_all_api_fwd_ms": time_ms(api)}
    res["ratio_fwd_sla_all"] = round(res["sla_all_fwd_ms"] / sparse_ms, 3)
    res["sla_all_meets_target"] = res["ratio_fwd_sla_all"] <= TARGET
    return res


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for linear.json")


def run(args) -> dict:
    require_cuda("linear")
    res = {"env": environment(torch.device("cuda")), "triton": triton.__version__, "target_ratio": TARGET,
           "shape": {"B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16", "block_q": BLOCK_Q,
                     "block_k": BLOCK_K}, "check": check_correctness(), "timings": []}
    out = Path(args.out) / "linear.json"
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (randn(B, H, N, D, g=g, grad=True) for _ in range(3))
    dout = randn(B, H, N, D, g=g)
    for s in SPARSITIES:
        res["timings"].append(time_sparsity(q, k, v, dout, s))
        print(res["timings"][-1], flush=True)
        O.write_json(out, res)   # after every sparsity: a run cut short keeps what it measured
    return res


COLUMNS = [("sparsity", "sparsity"), ("sparse_fwd_ms", "sparse fwd ms"), ("linear_fwd_ms", "linear fwd ms"),
           ("sparse_linear_fwd_ms", "sparse+linear fwd ms"), ("ratio_fwd", "fwd ratio"),
           ("linear_recompute_fwd_ms", "linear fwd ms, recompute"),
           ("ratio_fwd_recompute", "fwd ratio, recompute"),
           ("sla_all_fwd_ms", "sla-all fwd ms"), ("ratio_fwd_sla_all", "fwd ratio, sla-all"),
           ("sla_all_meets_target", f"sla-all <= {TARGET}x"),
           ("sparse_fwd_bwd_ms", "sparse fwd+bwd ms"),
           ("sparse_linear_fwd_bwd_ms", "sparse+linear fwd+bwd ms"),
           ("ratio_fwd_bwd", "fwd+bwd ratio"), ("meets_target", f"<= {TARGET}x")]


def markdown(res: dict) -> list[tuple[str, str]]:
    check = O.table(res["check"], [(c, c) for c in ("causal", "feature_map", "out", "dq", "dk", "dv")], 5)
    return [("linear branch: relative error vs float64 (bf16, N=4133)", check),
            (f"sparse vs sparse + linear, {res['env'].get('gpu')}, B=1 H=12 N=32768 D=128 bf16",
             O.table(res["timings"], COLUMNS))]


main = module_entry(__spec__.name)  # python -m bench.tools.linear [options]

if __name__ == "__main__":
    raise SystemExit(main())
