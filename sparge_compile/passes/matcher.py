"""Find attention sites in a Dynamo FX graph and decide, for each, whether it can be rewritten.

A site is

* a softmax whose input is (a chain of scales, casts and identities over) a matmul Q·Kᵀ and
  whose output flows (through casts / eval dropout) into the left side of a matmul with V;
* a call of ``F.scaled_dot_product_attention``;
* a call of ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``).

Every intermediate of a hand-written site must have no user outside the match; the softmax
must be over the key axis; shapes, ranks, dtypes and head dims must fit the sparse op.
Whatever cannot be proved to be plain softmax attention becomes a dense site with a reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from ..validate import HEAD_DIMS_SUPPORTED, head_dim_ok
from .canonical import example_value
from .graph import canon, single_user
from .mask_proof import CAUSAL, additive_mask, prove_mask

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Operand:
    """A tensor for the op: ``node`` with an optional permutation applied (``perm``)."""

    node: fx.Node
    perm: tuple | None = None

    def shape(self):
        ev = example_value(self.node)
        s = tuple(ev.shape)
        return tuple(s[i] for i in self.perm) if self.perm is not None else s


@dataclass
class AttentionMatch:
    """One attention found in the FX graph: its anchor node, q/k/v, scale, and whether it may be
    rewritten (with the reason when not)."""

    kind: str                      # "matmul-softmax" | "sdpa" | "mha"
    anchor: fx.Node                # its output is what the rewrite replaces
    spelling: str = ""
    rewrite: bool = False
    reason: str = ""
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    out_perm: tuple | None = None
    scale_parts: list = field(default_factory=list)
    is_causal: bool = False
    shapes: dict = field(default_factory=dict)
    dtype: str = ""
    matched: list = field(default_factory=list)   # intermediates removed by the rewrite
    mha_args: dict | None = None
    key_padding: fx.Node | None = None   # a (B | 1, 1, 1, Nk) bool key-padding mask from the graph

    @property
    def name(self) -> str:
        return self.anchor.name

    def dense(self, reason: str) -> "AttentionMatch":
        self.rewrite, self.reason = False, reason
        return self


def _fmt(shape) -> tuple:
    return tuple(int(s) if isinstance(s, int) else str(s) for s in shape)


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:
        return str(a) == str(b)


def _spell(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f".{t}"
    return getattr(t, "__name__", str(t))


def _swap_last(perm, r):
    p = list(perm) if perm is not None else list(range(r))
    p[-1], p[-2] = p[-2], p[-1]
    return tuple(p)


def _is_matmul_near(g: nx.DiGraph, n, depth=3) -> bool:
    """Is there a matmul among the ancestors of n within ``depth`` steps?"""
    frontier, seen = [n], {n}
    for _ in range(depth + 1):
        nxt = []
        for x in frontier:
            if canon(g, x).kind == "matmul":
                return True
            for p in g.predecessors(x):
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        frontier = nxt
    return False


def find_sites(gm: fx.GraphModule, g: nx.DiGraph) -> list[AttentionMatch]:
    sites = []
    for n in gm.graph.nodes:
        c = canon(g, n)
        if c.kind == "softmax":
            s = _match_softmax(g, n)
        elif c.kind == "sdpa":
            s = _match_sdpa(g, n)
        elif c.kind == "mha":
            s = _match_mha(g, n)
        elif n.op == "call_function" and n.target in FAST_PATHS:
            s = _fast_path(n)
        else:
            continue
        if s is not None:
            sites.append(s)
    return sites


def _check_qkv(site: AttentionMatch, gqa: bool = False) -> AttentionMatch:
    """Common checks on q/k/v operands (shapes in op layout (..., N, D))."""
    qs, ks, vs = site.q.shape(), site.k.shape(), site.v.shape()
    site.shapes = dict(q=_fmt(qs), k=_fmt(ks), v=_fmt(vs))
    evq, evk, evv = (example_value(o.node) for o in (site.q, site.k, site.v))
    site.dtype = str(evq.dtype).replace("torch.", "")
    if not (len(qs) == len(ks) == len(vs)) or len(qs) not in (3, 4):
        return site.dense(f"rank {len(qs)} q/k/v (the op takes rank 3 or 4)")
    if not (evq.dtype == evk.dtype == evv.dtype) or evq.dtype not in DTYPES:
        return site.dense(f"dtypes q={evq.dtype}, k={evk.dtype}, v={evv.dtype} (need one of fp16/bf16/fp32)")
    if not (evq.device == evk.device == evv.device):
        return site.dense("q, k, v on different devices")
    if not (_same(qs[-1], ks[-1]) and _same(qs[-1], vs[-1])):
        return site.dense(f"head dims differ (q {qs[-1]}, k {ks[-1]}, v {vs[-1]})")
    if not _same(ks[-2], vs[-2]):
        return site.dense("k and v lengths differ")
    if not all(_same(a, b) for a, b in zip(ks[:-2], vs[:-2])):
        return site.dense("k and v batch/head dims differ")
    if len(qs) == 4 and gqa:
        if not _same(qs[0], ks[0]):
            return site.dense("q and k batch sizes differ (broadcast)")
        hq, hk = qs[1], ks[1]
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            return site.dense(f"q heads {hq} not a multiple of k heads {hk}")
    elif not all(_same(a, b) for a, b in zip(qs[:-2], ks[:-2])):
        return site.dense(f"q batch/head dims {_fmt(qs[:-2])} differ from k's {_fmt(ks[:-2])} (broadcast)")
    d = qs[-1]
    d = int(d)  # a symbolic head dim is specialised here (a guard); sequence lengths never are
    if not head_dim_ok(d):
        return site.dense(f"head dim {d} unsupported (it must be {HEAD_DIMS_SUPPORTED})")
    site.rewrite, site.reason = True, "rewritten"
    return site


# ---------------------------------------------------------------- hand-written softmax(QKᵀ)V
def _walk_back(g: nx.DiGraph, n):
    """From the softmax input back through scales, casts and identities: (node, chain, parts)."""
    parts, chain = [], []
    while isinstance(n, fx.Node) and canon(g, n).kind in ("scale", "cast", "identity"):
        c = canon(g, n)
        chain.append(n)
        if c.kind == "scale":
            parts.append((c.args["op"], c.args["factor"]))
        n = c.x
    return n, chain, parts


def _scores_reason(g: nx.DiGraph, c_sm, cs, mm_s, chain) -> str | None:
    """Why the scores feeding the softmax rule the site out (None: they do not)."""
    dim, r = c_sm.args["dim"], c_sm.args["rank"]
    if dim is None or r is None or dim != r - 1:
        return f"softmax over axis {dim} of a rank-{r} tensor, not the key axis"
    if cs.args["bias"] is not None:
        return f"additive bias on the scores (baddbmm beta={cs.args.get('beta')})"
    if cs.args["po"] is not None:
        return "scores are permuted (einsum output not (..., q, k))"
    for x in [mm_s] + chain:
        if not single_user(g, x):
            return f"scores ({x.name}) have another user outside the attention"
    return None


def _walk_forward(g: nx.DiGraph, site: AttentionMatch, sm: fx.Node):
    """From the softmax forward through casts to the P·V matmul: (matmul, casts) or (None, reason)."""
    post, n = [], sm
    while True:
        if not single_user(g, n):
            return None, f"attention probabilities ({n.name}) are used elsewhere (returned or reused)"
        u = next(iter(n.users))
        cu = canon(g, u)
        if cu.kind in ("cast", "identity") and cu.x is n:
            post.append(u)
            site.spelling += f" -> {_spell(u)}"
            n = u
            continue
        if cu.kind == "dropout":
            return None, f"dropout (p={cu.args.get('p')}) on the attention probabilities in training"
        if cu.kind == "matmul" and cu.args["a"] is n and cu.args["b"] is not n and cu.args["pa"] is None \
                and cu.args["bias"] is None and cu.args["alpha"] is None:
            return u, post
        return None, f"probabilities feed {_spell(u)}, not the left side of a matmul with V"


def _match_softmax(g: nx.DiGraph, sm: fx.Node) -> AttentionMatch | None:
    c_sm = canon(g, sm)
    mm_s, chain, parts = _walk_back(g, c_sm.x)
    proof, why, pad = None, "", None
    masked = additive_mask(mm_s) if isinstance(mm_s, fx.Node) else None
    if masked is not None:   # scores + where(cond, 0, -big): a mask, which may be proved causal
        proof, why, pad = _prove_scores_mask(masked[1], mm_s)
        if proof is None:
            site = AttentionMatch("matmul-softmax", sm, spelling=f"{_spell(mm_s)} -> softmax")
            return site.dense(f"scores pass through {_spell(mm_s)} before the softmax: {why}")
        add = mm_s
        mm_s, chain2, parts2 = _walk_back(g, masked[0])
        chain, parts = chain + [add] + chain2, parts + parts2
    if not isinstance(mm_s, fx.Node) or canon(g, mm_s).kind != "matmul":
        if isinstance(mm_s, fx.Node) and _is_matmul_near(g, mm_s):
            site = AttentionMatch("matmul-softmax", sm, spelling=f"{_spell(mm_s)} -> softmax")
            return site.dense(f"scores pass through {_spell(mm_s)} before the softmax (mask or bias)")
        return None  # a softmax that is not attention
    cs = canon(g, mm_s)
    site = AttentionMatch("matmul-softmax", sm)
    site.spelling = " -> ".join([_spell(mm_s)] + [_spell(x) for x in chain[::-1]] + [_spell(sm)])
    reason = _scores_reason(g, c_sm, cs, mm_s, chain)
    if reason is not None:
        return site.dense(reason)
    if cs.args["alpha"] is not None:
        parts.append(("mul", cs.args["alpha"]))
    mm_o, post = _walk_forward(g, site, sm)
    if mm_o is None:
        return site.dense(post)
    site.spelling += f" -> {_spell(mm_o)}"
    co = canon(g, mm_o)
    site.anchor = mm_o
    a, b = cs.args["a"], cs.args["b"]
    if min(example_value(x).dim() for x in (a, b, co.args["b"])) < 3:
        return None  # a product with a weight matrix (rank 2): a softmax between matmuls, not attention
    site.q = Operand(a, cs.args["pa"])
    if cs.args["pb"] is None and canon(g, b).kind == "transpose":
        site.k = Operand(canon(g, b).x)
    else:
        site.k = Operand(b, _swap_last(cs.args["pb"], example_value(b).dim()))
    site.v = Operand(co.args["b"], co.args["pb"])
    site.out_perm, site.scale_parts = co.args["po"], parts
    site.matched = [mm_o] + post[::-1] + [sm] + chain + [mm_s]
    site.is_causal, site.key_padding = proof == CAUSAL, pad
    if example_value(mm_o).dtype != example_value(site.q.node).dtype:
        _check_qkv(site)
        return site.dense(f"output dtype {example_value(mm_o).dtype} differs from q's")
    site = _check_qkv(site)
    if proof is not None and site.rewrite:
        site.reason = f"rewritten ({why})"
    return site


def _prove_scores_mask(cond: fx.Node, scores: fx.Node):
    ev = example_value(scores)
    if not isinstance(ev, torch.Tensor) or ev.dim() < 2:
        return None, "mask or bias", None
    proof, why, pad = prove_mask(cond, ev.shape[-2], ev.shape[-1])
    return _padding_fits(proof, why.replace("attn_mask", "the additive mask"), pad, ev)


# ---------------------------------------------------------------- F.scaled_dot_product_attention
def _match_sdpa(g: nx.DiGraph, n: fx.Node) -> AttentionMatch:
    a = canon(g, n).args
    site = AttentionMatch("sdpa", n, spelling="scaled_dot_product_attention")
    site.q, site.k, site.v = Operand(a["query"]), Operand(a["key"]), Operand(a["value"])
    site = _check_qkv(site, gqa=a["enable_gqa"] is True)
    proof = None
    if a["attn_mask"] is not None:
        proof, why, site.key_padding = _prove(a["attn_mask"], site)
        if proof is None:
            return site.dense(why)
    p = a["dropout_p"]
    if not isinstance(p, (int, float)):
        return site.dense("dropout_p is not a constant")
    if p > 0:
        return site.dense(f"dropout_p={p} (training-time dropout)")
    if not isinstance(a["is_causal"], bool):
        return site.dense("is_causal is not a constant")
    if not isinstance(a["enable_gqa"], bool):
        return site.dense("enable_gqa is not a constant")
    site.is_causal = a["is_causal"] or proof == CAUSAL
    sc = a["scale"]
    if sc is not None and not (isinstance(sc, (int, float)) or
                               (isinstance(sc, fx.Node) and not isinstance(example_value(sc), torch.Tensor))):
        return site.dense("scale is not a number")
    site.scale_parts = [("mul", sc)]
    if proof is not None and site.rewrite:
        site.reason = f"rewritten ({why})"
    return site


def _prove(mask: fx.Node, site: AttentionMatch):
    """A mask built in the graph proved causal or all true (see :mod:`.mask_proof`)."""
    evq, evk = example_value(site.q.node), example_value(site.k.node)
    if not (isinstance(evq, torch.Tensor) and isinstance(evk, torch.Tensor)):
        return None, "attn_mask given (q/k shapes unknown)", None
    return _padding_fits(*prove_mask(mask, evq.shape[-2], evk.shape[-2]), evq)


def _padding_fits(proof, why: str, pad, evq):
    """A key-padding mask the op can take: q of rank 4, the mask's batch 1 or q's."""
    if pad is None or proof is None:
        return proof, why, pad
    b = example_value(pad).shape[0]
    if evq.dim() != 4 or not (_same(b, 1) or _same(b, evq.shape[0])):
        return None, f"key-padding mask of batch {b} for q of shape {tuple(evq.shape)}", None
    return proof, why, pad


# ---------------------------------------------------------------- nn.MultiheadAttention
def _match_mha(g: nx.DiGraph, n: fx.Node) -> AttentionMatch:
    a = canon(g, n).args
    site = AttentionMatch("mha", n, spelling="multi_head_attention_forward")
    site.mha_args = a
    q, k = a["query"], a["key"]
    evq, evk = example_value(q), example_value(k)
    num_heads, E = a["num_heads"], a["embed_dim_to_check"]
    if isinstance(evq, torch.Tensor) and isinstance(evk, torch.Tensor):
        site.shapes = dict(q=_fmt(evq.shape), k=_fmt(evk.shape))
        site.dtype = str(evq.dtype).replace("torch.", "")
    for u in n.users:
        if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0) and \
                not (u.op == "call_function" and u.target is operator.getitem and not u.users):
            return site.dense("the attention weights are used (need_weights)")
    if a["key_padding_mask"] is not None:
        return site.dense("key_padding_mask given (not supported yet)")
    if a["attn_mask"] is not None:
        if a["is_causal"] is not True:
            return site.dense("attn_mask given without is_causal=True")
        site.is_causal = True   # PyTorch's documented promise: the mask is causal
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return site.dense("bias_k / bias_v / add_zero_attn")
    if a["static_k"] is not None or a["static_v"] is not None:
        return site.dense("static_k / static_v")
    if a["is_causal"] is not False and a["attn_mask"] is None:
        return site.dense("is_causal hint without attn_mask")
    if not isinstance(a["dropout_p"], (int, float)) or not isinstance(a["training"], bool):
        return site.dense("dropout / training not constant")
    if a["training"] and a["dropout_p"] > 0:
        return site.dense(f"dropout_p={a['dropout_p']} in training")
    if not isinstance(num_heads, int) or not isinstance(evq, torch.Tensor) or evq.dim() not in (2, 3):
        return site.dense("unsupported MultiheadAttention call")
    if evq.dtype not in DTYPES or evk.dtype != evq.dtype:
        return site.dense(f"dtype {evq.dtype}")
    e = int(evq.shape[-1])
    if e % num_heads or not head_dim_ok(e // num_heads):
        return site.dense(f"head dim {e / num_heads:g} unsupported (it must be {HEAD_DIMS_SUPPORTED})")
    if not isinstance(E, int) or E != e:
        return site.dense("embed_dim mismatch")
    site.rewrite = True
    site.reason = "rewritten (is_causal=True: the mask is causal)" if site.is_causal else "rewritten"
    return site


FAST_PATHS = {torch._transformer_encoder_layer_fwd: "TransformerEncoderLayer",
              torch._native_multi_head_attention: "MultiheadAttention"}


def _fast_path(n: fx.Node) -> AttentionMatch:
    """PyTorch's fused inference kernels (eval, no grad): reported, kept dense."""
    site = AttentionMatch("fastpath", n, spelling=n.target.__name__)
    return site.dense(f"{FAST_PATHS[n.target]} fast path (eval, no grad): call "
                      "torch.backends.mha.set_fastpath_enabled(False) before compiling to run it sparse")


def key_length(site: AttentionMatch):
    if site.kind == "mha":
        return example_value(site.mha_args["key"]).shape[0]
    return site.k.shape()[-2]
