"""Session 5 experiments (scratch, GPU): forward pair step / acc form / LUT prefetch, pooling
variants, fwd+bwd profile breakdown. Writes $OUT/exp5.json."""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

import sparge_compile as sc
from sparge_compile.kernels import forward as F_
from sparge_compile.kernels import mask as M_
from sparge_compile.kernels import backward as B_
from sparge_compile.kernels import torch_impl


@triton.jit
def _step1(s, m_i, l_i, acc, v, qk_scale, ACCFORM: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if ACCFORM:
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _xfwd(Q, K, V, Out, Lse, KvNum, KvIdx, qk_scale, Hq, Nq, nq, nk,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          PAIR: tl.constexpr, ACCFORM: tl.constexpr, PREFETCH: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + (bh * Nq + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = bh * nq + i
    n_kept = tl.load(KvNum + row)
    lut = KvIdx + row * nk
    if PAIR:
        for t in range(n_kept // 2):
            s1 = tl.load(lut + 2 * t) * BLOCK_N
            s2 = tl.load(lut + 2 * t + 1) * BLOCK_N
            k1 = K.load([b, h, s1, 0]).reshape(BLOCK_N, BLOCK_D)
            k2 = K.load([b, h, s2, 0]).reshape(BLOCK_N, BLOCK_D)
            v1 = V.load([b, h, s1, 0]).reshape(BLOCK_N, BLOCK_D)
            v2 = V.load([b, h, s2, 0]).reshape(BLOCK_N, BLOCK_D)
            x1 = tl.dot(q, tl.trans(k1))
            x2 = tl.dot(q, tl.trans(k2))
            m_new = tl.maximum(m_i, tl.maximum(tl.max(x1, 1), tl.max(x2, 1)) * qk_scale)
            p1 = tl.math.exp2(x1 * qk_scale - m_new[:, None])
            p2 = tl.math.exp2(x2 * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p1.to(v1.dtype), v1, acc)
            acc = tl.dot(p2.to(v2.dtype), v2, acc)
            m_i = m_new
        if n_kept % 2 == 1:
            st = tl.load(lut + n_kept - 1) * BLOCK_N
            k = K.load([b, h, st, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, h, st, 0]).reshape(BLOCK_N, BLOCK_D)
            m_i, l_i, acc = _step1(tl.dot(q, tl.trans(k)), m_i, l_i, acc, v, qk_scale, ACCFORM)
    elif PREFETCH:
        nxt = tl.load(lut)
        for t in range(n_kept):
            st = nxt * BLOCK_N
            nxt = tl.load(lut + tl.minimum(t + 1, nk - 1))
            k = K.load([b, h, st, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, h, st, 0]).reshape(BLOCK_N, BLOCK_D)
            m_i, l_i, acc = _step1(tl.dot(q, tl.trans(k)), m_i, l_i, acc, v, qk_scale, ACCFORM)
    else:
        for t in range(n_kept):
            st = tl.load(lut + t) * BLOCK_N
            k = K.load([b, h, st, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, h, st, 0]).reshape(BLOCK_N, BLOCK_D)
            m_i, l_i, acc = _step1(tl.dot(q, tl.trans(k)), m_i, l_i, acc, v, qk_scale, ACCFORM)
    out = acc / l_i[:, None]
    tl.store(Out + (bh * Nq + offs_m[:, None]) * BLOCK_D + offs_d[None, :], out.to(Out.dtype.element_ty))
    tl.store(Lse + bh * Nq + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634)


def xfwd(q, k, v, num, idx, scale, pair, accform, prefetch, w, s):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _xfwd[(N // 128, B * H)](q, F_.descriptor(k, 64), F_.descriptor(v, 64), out, lse, num, idx,
                             scale * F_.LOG2E, H, N, N // 128, N // 64, BLOCK_M=128, BLOCK_N=64, BLOCK_D=D,
                             PAIR=pair, ACCFORM=accform, PREFETCH=prefetch, num_warps=w, num_stages=s)
    return out, lse


@triton.jit
def _xpool(X, Out, N, nb, BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
           PER: tl.constexpr):
    """contiguous (BH, N, D); PER blocks per program, CHUNK rows per load."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    for r in range(PER):
        blk = pid * PER + r
        accv = tl.zeros([BLOCK_D], tl.float32)
        for c in range(BLOCK // CHUNK):
            rows = blk * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
            x = tl.load(X + (bh * N + rows[:, None]) * BLOCK_D + cols[None, :]).to(tl.float32)
            accv += tl.sum(x, 0)
        tl.store(Out + (bh * nb + blk) * BLOCK_D + cols, accv / BLOCK)


def xpool(q, k, chunk, per, w):
    B, H, N, D = q.shape
    qb = torch.empty((B, H, N // 128, D), dtype=torch.float32, device=q.device)
    kb = torch.empty((B, H, N // 64, D), dtype=torch.float32, device=q.device)
    _xpool[(N // 128 // per, B * H)](q, qb, N, N // 128, BLOCK=128, CHUNK=min(chunk, 128), BLOCK_D=D, PER=per,
                                     num_warps=w)
    _xpool[(N // 64 // per, B * H)](k, kb, N, N // 64, BLOCK=64, CHUNK=min(chunk, 64), BLOCK_D=D, PER=per,
                                    num_warps=w)
    return qb, kb


@triton.jit
def _xpool2(Q, K, QB, KB, N, nq, BLOCK_D: tl.constexpr):
    """q block i (128 rows) and the two 64-row k blocks over the same rows, in one program."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    rows = i * 128 + tl.arange(0, 128)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(Q + (bh * N + rows[:, None]) * BLOCK_D + cols[None, :]).to(tl.float32)
    y = tl.load(K + (bh * N + rows[:, None]) * BLOCK_D + cols[None, :]).to(tl.float32)
    tl.store(QB + (bh * nq + i) * BLOCK_D + cols, tl.sum(x, 0) / 128)
    yk = tl.sum(tl.reshape(y, (2, 64, BLOCK_D)), 1) / 64
    two = tl.arange(0, 2)
    tl.store(KB + (bh * 2 * nq + 2 * i + two[:, None]) * BLOCK_D + cols[None, :], yk)


def xpool2(q, k, w):
    B, H, N, D = q.shape
    qb = torch.empty((B, H, N // 128, D), dtype=torch.float32, device=q.device)
    kb = torch.empty((B, H, N // 64, D), dtype=torch.float32, device=q.device)
    _xpool2[(N // 128, B * H)](q, k, qb, kb, N, N // 128, BLOCK_D=D, num_warps=w)
    return qb, kb


def autotune_exp(res, save):
    """First-call cost of the autotuned launches, then autotuned vs fixed timings."""
    import time
    from sparge_compile.kernels import tuning
    B, H, N, D = 1, 12, 32768, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    cfg = sc.SpargeConfig(topk=0.0498046875, topp=0.0, mode="topk")
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    r = res["autotune"] = {}

    def step():
        for x in (qg, kg, vg):
            x.grad = None
        sc.sparse_attention(qg, kg, vg, config=cfg).backward(do)
    tuning.AUTOTUNE = False
    step(); torch.cuda.synchronize()
    r["fixed_fwdbwd"] = bench(step)
    r["fixed_fwd"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
    tuning.AUTOTUNE = True
    t0 = time.perf_counter(); step(); torch.cuda.synchronize()
    r["first_call_s"] = round(time.perf_counter() - t0, 2)
    r["tuned_fwdbwd"] = bench(step)
    r["tuned_fwd"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
    tuning.AUTOTUNE = False
    r["fixed_fwdbwd_again"] = bench(step)
    r["fixed_fwd_again"] = bench(lambda: sc.sparse_attention(q, k, v, config=cfg))
    r["picked"] = tuning.best_configs()
    print("autotune", r, flush=True)
    save()


def bench(fn, rep=100):
    try:
        return round(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"), 4)
    except Exception as e:
        return f"error: {type(e).__name__}: {str(e)[:200]}"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    path = os.path.join(out_dir, "exp5.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    if os.environ.get("EXP_AUTOTUNE", "1") == "1":
        autotune_exp(res, save)
    B, H, N = 1, 12, 32768
    for D in [int(x) for x in os.environ.get("EXP_D", "128").split(",") if x]:
        r = res[f"D{D}"] = {}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        scale = D ** -0.5
        cfg = sc.SpargeConfig(topk=0.0498046875, topp=0.0, mode="topk")
        m = sc.predict_block_mask(q, k, config=cfg)
        num, idx = m.kv_num_blocks, m.kv_indices
        r["sparsity"] = m.sparsity()
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        bm = m.to_flex()
        r["flex_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm))
        o0, l0 = F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64)
        r["base_fwd"] = bench(lambda: F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64))
        ref, _ = torch_impl.attention_fwd(q[:, :2].float(), k[:, :2].float(), v[:, :2].float(),
                                          num[:, :2], idx[:, :2], scale, False, 128, 64)
        r["base_err"] = rel(o0[:, :2], ref)
        print(r, flush=True)
        var = {}
        for name, kw in [("acc_w4s2", (0, 1, 0, 4, 2)), ("plain_w4s2", (0, 0, 0, 4, 2)),
                         ("pre_w4s2", (0, 0, 1, 4, 2)), ("acc_w4s2_b", (0, 1, 0, 4, 2)),
                         ("plain_w4s2_b", (0, 0, 0, 4, 2))]:
            try:
                o, lse = xfwd(q, k, v, num, idx, scale, *kw)
                e = rel(o[:, :2], ref)
                lse_ok = bool(torch.allclose(lse, l0, atol=1e-2))
            except Exception as ex:
                var[name] = f"error: {type(ex).__name__}: {str(ex)[:200]}"
                continue
            var[name] = {"ms": bench(lambda: xfwd(q, k, v, num, idx, scale, *kw)), "err": e, "lse_ok": lse_ok}
            print(name, var[name], flush=True)
        r["fwd_variants"] = var
        r["base_fwd_again"] = bench(lambda: F_.attention_fwd_triton(q, k, v, num, idx, scale, False, 128, 64))
        save()
        # pooling
        pool = {"base": bench(lambda: M_.pool_qk_triton(q, k, 128, 64))}
        qb0, kb0 = M_.pool_qk_triton(q, k, 128, 64)
        for w in (4, 8, 2):
            try:
                qb, kb = xpool2(q, k, w)
                ok = bool(torch.allclose(qb, qb0[..., :D], atol=1e-5) and torch.allclose(kb, kb0[..., :D], atol=1e-5))
                pool[f"fused_rows_w{w}"] = {"ms": bench(lambda: xpool2(q, k, w)), "same": ok}
            except Exception as ex:
                pool[f"fused_rows_w{w}"] = f"error: {type(ex).__name__}: {str(ex)[:200]}"
        pool["base_again"] = bench(lambda: M_.pool_qk_triton(q, k, 128, 64))
        for chunk, per, w in ((32, 1, 4), (32, 1, 2), (64, 1, 4), (128, 1, 4), (32, 2, 4), (32, 4, 4), (16, 1, 2),
                              (64, 2, 8)):
            name = f"c{chunk}_p{per}_w{w}"
            try:
                qb, kb = xpool(q, k, chunk, per, w)
                ok = bool(torch.allclose(qb, qb0[..., :D], atol=1e-5) and torch.allclose(kb, kb0[..., :D], atol=1e-5))
            except Exception as ex:
                pool[name] = f"error: {type(ex).__name__}: {str(ex)[:200]}"
                continue
            pool[name] = {"ms": bench(lambda: xpool(q, k, chunk, per, w)), "same": ok}
        r["pool"] = pool
        print("pool", pool, flush=True)
        save()
        # fwd+bwd breakdown with the profiler
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

        def step():
            for x in (qg, kg, vg):
                x.grad = None
            sc.sparse_attention(qg, kg, vg, block_mask=m).backward(do)
        r["fwdbwd_kernel_path"] = bench(step)
        r["bwd_direct"] = bench(lambda: B_.attention_bwd_triton(do, q, k, v, o0, l0, num, idx, scale, False, 128, 64))
        from torch.profiler import ProfilerActivity, profile
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        ev = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t and e.count:
                ev[e.key[:80]] = {"us_total_per_step": round(t / 10, 1), "count": e.count}
        r["profile"] = dict(sorted(ev.items(), key=lambda kv: -kv[1]["us_total_per_step"])[:25])
        print(json.dumps(r["profile"], indent=1), flush=True)
        save()


if __name__ == "__main__":
    main()
