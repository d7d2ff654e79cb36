"""Sparse + linear attention (SLA, arXiv 2509.24006; SLA2): a linear-attention branch for the key
blocks the block mask drops, in plain PyTorch (the reference and the CPU implementation).

Per key block j (real tokens only): ``S_j = φ(K_j)ᵀ V_j`` (D × Dv) and ``z_j = φ(K_j)ᵀ 1`` (D).
Per query block i, over the dropped blocks ``j ∈ L_i`` (visible to every row of block i, not kept):
``O_lin = φ(Q_i) Σ_j S_j / (φ(Q_i) · Σ_j z_j + eps)``, the sums taken as the row's total minus its
kept blocks. A query block with no dropped block has ``O_lin = 0``.

Combinations (:class:`LinearBranch`):

* ``"sla"``  (SLA's released form, the baseline): ``O = O_sparse + proj(O_lin)``, proj a per-layer
  ``nn.Linear(D, D)`` initialised to zero (so ``O = O_sparse`` at init).
* ``"sla-all"`` (SLA's released code exactly): the same, with O_lin the linear attention over
  *all* keys (``φ(q) Σ φ(k)ᵀv / (φ(q)·Σ φ(k) + eps)``, every row), not only the dropped blocks;
  non-causal only. Its cost is two (D x Dv) products per head, not a pass over the kept blocks.
* ``"sla2"`` (SLA2's faithful form): ``O = (1 − a) O_sparse + a O_lin`` with
  ``a = gate_h · (1 − r̂_i)``, ``r̂_i`` the kept blocks' share of the pooled block scores ``P̄_i``
  and ``gate_h`` a learnable scalar per head (0 at init: ``O = O_sparse``; 1: the exact identity
  O = r·O_kept + (1 − r)·O_dropped with r estimated by the pooled scores). Not clamped to [0, 1]:
  a clamp would stop the gate's gradient for good once a step pushed it past a bound.
  Optional router: learnable ``W_q, W_k`` (D × D, identity at init) on the pooled q̄/k̄; the mask
  is predicted from ``(q W_q, k W_k)`` (pooling is linear, so that is the mask of the routed
  pooled scores) and ``r̂`` uses the routed scores, through which the router gets its gradient.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, ops, ops_linear
from .attention import _config, predict_block_mask
from .block_mask import SpargeBlockMask
from .config import SpargeConfig
from .kernels.torch_impl import indices_to_dense
from .reference import block_scores, cdiv
from .validate import check_block_mask, check_flag, check_qkv

log = logging.getLogger(__name__)

FEATURE_MAPS = ("softmax", "elu")
COMBINES = ("sla", "sla2")        # over the dropped blocks
COMBINES_ALL = COMBINES + ("sla-all",)   # and SLA's released code (linear attention over all keys)
_PROJ = ("sla", "sla-all")        # the combinations through proj
METHODS = ("subtract", "direct")
BRANCH_NAME = "sparge_linear"

__all__ = ["AnchorHook", "BRANCH_NAME", "COMBINES", "COMBINES_ALL", "FEATURE_MAPS", "LinearBranch",
           "block_states", "combine_outputs", "dropped_states", "enable_linear_branch", "feature_map",
           "linear_attention_all", "linear_attention_dropped", "linear_domain", "route_qk",
           "sla_all_output", "sparse_linear_attention", "with_linear"]


def feature_map(x: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """φ: ``"softmax"`` over the head dim (SLA's default, DESIGN §1b) or ``"elu"`` (elu(x) + 1)."""
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    if kind == "elu":
        return F.elu(x) + 1.0
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, nb, block, D), zero rows past N. Contiguous first: with a symbolic
    N (dynamic shapes), the traced pad of a permuted x is taken to be contiguous, but a pad of 0
    returns x's layout at run time, and the matmul's views that follow then fail."""
    B, H, N, D = x.shape
    nb = cdiv(N, block)
    return F.pad(x.contiguous(), (0, 0, 0, nb * block - N)).reshape(B, H, nb, block, D)


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def block_states(k: torch.Tensor, v: torch.Tensor, block_k: int, kind: str = "softmax"):
    """Per key block: S (B, Hkv, nk, D, Dv) = φ(K_j)ᵀ V_j and z (B, Hkv, nk, D) = φ(K_j)ᵀ 1, over
    the real tokens of each block (φ of a padding row would not be 0: padding is dropped after φ)."""
    pk = _blocked(feature_map(_acc(k), kind), block_k)
    real = _blocked(torch.ones_like(k[..., :1], dtype=pk.dtype), block_k)
    pk = pk * real
    return pk.transpose(-2, -1) @ _blocked(_acc(v), block_k), pk.sum(-2)


def linear_domain(nq_tok: int, nk_tok: int, block_q: int, block_k: int, is_causal: bool,
                  device=None) -> torch.Tensor:
    """(nq, nk) bool: key blocks that every row of query block i sees wholly (all blocks, or with
    is_causal those ending at or before the block's first row). The linear branch covers only
    these; each row's domain is a prefix of the key blocks."""
    nq, nk = cdiv(nq_tok, block_q), cdiv(nk_tok, block_k)
    if not is_causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    first_row = torch.arange(nq, device=device) * block_q
    last_key = torch.clamp((torch.arange(nk, device=device) + 1) * block_k, max=nk_tok) - 1
    return last_key[None, :] <= first_row[:, None]


def _expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], dim=1)


def dropped_states(S: torch.Tensor, z: torch.Tensor, keep: torch.Tensor, domain: torch.Tensor,
                   method: str = "subtract"):
    """Σ over the dropped blocks (domain & ~keep) of S and z, per query block.

    S (B, Hkv, nk, D, Dv), z (B, Hkv, nk, D), keep (B, Hq, nq, nk) bool, domain (nq, nk) bool (a
    prefix per row). ``"subtract"``: the row's total (a prefix sum up to its last domain block)
    minus its kept blocks (what the kernel does: it visits the kept blocks anyway);
    ``"direct"``: the sum over the dropped blocks. Returns (B, Hq, nq, D, Dv) and (B, Hq, nq, D).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    hq = keep.shape[1]
    S, z = _expand_heads(S, hq), _expand_heads(z, hq)
    if method == "direct":
        w = (domain & ~keep).to(S.dtype)
        return torch.einsum("bhij,bhjde->bhide", w, S), torch.einsum("bhij,bhjd->bhid", w, z)
    n_dom = domain.sum(-1)                                 # (nq,): the prefix length of each row
    last = (n_dom - 1).clamp(min=0)
    has = (n_dom > 0).to(S.dtype)
    total_S = S.cumsum(2)[:, :, last] * has[:, None, None]
    total_z = z.cumsum(2)[:, :, last] * has[:, None]
    w = (domain & keep).to(S.dtype)
    kept_S = torch.einsum("bhij,bhjde->bhide", w, S)
    kept_z = torch.einsum("bhij,bhjd->bhid", w, z)
    return total_S - kept_S, total_z - kept_z


def linear_attention_dropped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                             block_q: int, block_k: int, is_causal: bool = False, kind: str = "softmax",
                             eps: float = 1e-5, method: str = "subtract") -> torch.Tensor:
    """O_lin (B, Hq, Nq, Dv) in q's dtype: linear attention of each query block over its dropped key
    blocks (module docstring). keep: (B, Hq, nq, nk) bool, the kept blocks (SpargeBlockMask.to_dense()).
    A query block without a dropped block gives 0."""
    domain = linear_domain(q.shape[2], k.shape[2], block_q, block_k, is_causal, q.device)
    S, z = block_states(k, v, block_k, kind)
    S_d, z_d = dropped_states(S, z, keep, domain, method)
    pq = _blocked(feature_map(_acc(q), kind), block_q)          # (B, H, nq, bq, D)
    num = pq @ S_d                                              # (B, H, nq, bq, Dv)
    den = pq @ z_d[..., None]                                   # (B, H, nq, bq, 1)
    any_dropped = (domain & ~keep).any(-1)[..., None, None]     # exact zero, not a cancelled total
    out = torch.where(any_dropped, num / (den + eps), torch.zeros_like(num))
    B, H, nq, bq, Dv = out.shape
    return out.reshape(B, H, nq * bq, Dv)[:, :, : q.shape[2]].to(q.dtype)


def linear_attention_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "softmax",
                         eps: float = 1e-5) -> torch.Tensor:
    """Linear attention of every query over all keys (SLA's released ``calc_linear``), (B, Hq, Nq, Dv)
    in q's dtype; GQA: the key heads' sums serve their query-head group."""
    pk = _expand_heads(feature_map(_acc(k), kind), q.shape[1])
    kv = pk.transpose(-1, -2) @ _expand_heads(_acc(v), q.shape[1])     # (B, H, D, Dv)
    pq = feature_map(_acc(q), kind)
    den = (pq * pk.sum(-2, keepdim=True)).sum(-1, keepdim=True) + eps
    return (pq @ kv / den).to(q.dtype)


def sla_all_output(out_s, q, k, v, weight, bias, kind: str = "softmax", eps: float = 1e-5):
    """SLA's released form, the definition ``sparge::sla_all`` computes: out_s + proj(O_lin), O_lin
    the linear attention over all keys (:func:`linear_attention_all`), proj = (weight, bias)."""
    out_l = linear_attention_all(q, k, v, kind, eps)
    on = torch.ones(out_s.shape[:-1], dtype=torch.bool, device=out_s.device)
    return combine_outputs(out_s, out_l, on, None, "sla-all", (weight, bias))


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class LinearBranch(nn.Module):
    """The learnable parts of one attention site's linear branch (see the module docstring).

    head_dim: D. num_heads: query heads (the sla2 gate is per head; None: one gate for all).
    combine: "sla" (O_sparse + proj(O_lin), proj zero-init), "sla-all" (the same with O_lin over all
    keys, as SLA's released code; non-causal) or "sla2" (learnable ratio).
    feature_map: "softmax" (default) or "elu". router: sla2 only, learnable W_q/W_k on q̄/k̄.
    eps: added to the linear branch's denominator.
    """

    def __init__(self, head_dim: int, num_heads: int | None = None, combine: str = "sla",
                 feature_map: str = "softmax", router: bool = False, eps: float = 1e-5):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int)
                                      or num_heads <= 0):
            raise ValueError(f"num_heads must be a positive int or None, got {num_heads!r}")
        self.combine = _check_choice("combine", combine, COMBINES_ALL)
        self.feature_map = _check_choice("feature_map", feature_map, FEATURE_MAPS)
        check_flag("router", router)
        if router and combine != "sla2":
            raise ValueError("router=True needs combine='sla2' (the router is trained through the ratio)")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.head_dim, self.num_heads, self.eps = head_dim, num_heads, float(eps)
        if combine in _PROJ:
            self.proj = nn.Linear(head_dim, head_dim)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.gate = nn.Parameter(torch.zeros(num_heads or 1))
        if router:
            self.router_q = nn.Parameter(torch.eye(head_dim))
            self.router_k = nn.Parameter(torch.eye(head_dim))
        self.has_router = router

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, combine={self.combine!r}, "
                f"feature_map={self.feature_map!r}, router={self.has_router}")

    def params(self) -> list[torch.Tensor]:
        """The learnable tensors in the order :func:`combine_outputs` and the backend's anchor
        take them: sla ``[proj.weight, proj.bias]``; sla2 ``[gate]`` (+ ``[router_q, router_k]``)."""
        if self.combine in _PROJ:
            return [self.proj.weight, self.proj.bias]
        return [self.gate] + ([self.router_q, self.router_k] if self.has_router else [])

    def spec(self) -> tuple:
        """(combine, feature_map, eps, router, num_heads or 0): what the compiled site needs besides
        the parameters (the anchor's constant arguments)."""
        return self.combine, self.feature_map, self.eps, self.has_router, self.num_heads or 0

    def route(self, q: torch.Tensor, k: torch.Tensor):
        """The (q, k) the mask and the pooled scores are computed from: routed if there is a router."""
        return route_qk(q, k, self.params(), self.combine, self.has_router)

    def forward(self, out_sparse: torch.Tensor, out_lin: torch.Tensor, dropped: torch.Tensor,
                kept_share: torch.Tensor | None = None) -> torch.Tensor:
        """Combine (B, H, Nq, D) outputs. dropped (B, H, Nq) bool: the row's query block dropped some
        block (elsewhere the branch adds nothing, proj's bias included). kept_share (B, H, Nq): r̂,
        needed by "sla2"."""
        return combine_outputs(out_sparse, out_lin, dropped, kept_share, self.combine, self.params(),
                               self.num_heads or 0)


def check_fits(q: torch.Tensor, params, combine: str, router: bool, num_heads: int, where: str) -> None:
    """A clear error where a branch (params as :meth:`LinearBranch.params`) was made for another
    head dim or head count than the attention ``q`` ((B,) H, N, D; real or fake) it is applied to."""
    H, D = q.shape[-3], q.shape[-1]
    sized = params[0] if combine in _PROJ else (params[1] if router else None)
    if sized is not None and sized.shape[-1] != D:
        raise ValueError(f"{where} has head_dim={sized.shape[-1]} but the attention's "
                         f"head dim is {D} (q {tuple(q.shape)}); attach it with head_dim={D}")
    if combine == "sla2" and num_heads and num_heads != H:
        raise ValueError(f"{where} has num_heads={num_heads} but the attention has {H} "
                         f"query heads (q {tuple(q.shape)}); attach it with num_heads={H} (or None)")


def route_qk(q: torch.Tensor, k: torch.Tensor, params, combine: str, router: bool):
    """(q W_q, k W_k) with sla2's router (params as :meth:`LinearBranch.params`), else (q, k)."""
    if not router:
        return q, k
    _, wq, wk = params
    return q @ wq.to(q.dtype), k @ wk.to(k.dtype)


def combine_outputs(out_sparse, out_lin, dropped, kept_share, combine: str, params, num_heads: int = 0):
    """:meth:`LinearBranch.forward` on its parameters as a list (``params()``): what the eager
    function and the backend's compiled sites both call. num_heads 0: one sla2 gate for all heads."""
    on = dropped[..., None]
    if combine in _PROJ:
        w, b = params
        lin = F.linear(out_lin.to(w.dtype), w, b).to(out_sparse.dtype)
        return out_sparse + torch.where(on, lin, torch.zeros_like(lin))
    if kept_share is None:
        raise ValueError("combine='sla2' needs kept_share (the kept blocks' share of the pooled scores)")
    H = out_sparse.shape[1]
    if num_heads and num_heads != H:
        raise ValueError(f"LinearBranch has num_heads={num_heads} but the input has {H} heads")
    g = params[0].to(out_sparse.dtype).reshape(1, -1, 1)
    a = (g * (1.0 - kept_share.to(out_sparse.dtype)))[..., None]   # no clamp: it would freeze g
    a = torch.where(on, a, torch.zeros_like(a))
    return (1.0 - a) * out_sparse + a * out_lin


def _per_token(x: torch.Tensor, block_q: int, nq_tok: int) -> torch.Tensor:
    """(B, H, nq) per query block -> (B, H, Nq) per query token."""
    return x.repeat_interleave(block_q, dim=-1)[..., :nq_tok]


def _kept_share(q, k, scale, is_causal, keep, block_q, block_k) -> torch.Tensor:
    """r̂ per query token (B, Hq, Nq): the kept blocks' share of P̄_i (differentiable in q, k)."""
    p = block_scores(_acc(q), _acc(k), scale, is_causal, block_q, block_k)
    return _per_token((p * keep.to(p.dtype)).sum(-1), block_q, q.shape[2])


def _mask(q, k, scale, is_causal, cfg, block_mask, branch):
    if block_mask is not None:
        check_block_mask(block_mask, q, k)
        return block_mask
    rq, rk = branch.route(q, k)
    return predict_block_mask(rq.detach(), rk.detach(), scale, is_causal, cfg)


def sparse_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, branch: LinearBranch,
                            config: SpargeConfig | None = None, is_causal: bool = False,
                            block_mask: SpargeBlockMask | None = None, scale: float | None = None):
    """Sparse attention over the kept blocks combined with the linear branch over the dropped ones.

    q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D). The mask is predicted (from the routed q/k when the
    branch has a router) unless block_mask is given. Differentiable in q, k, v and in the
    branch's parameters (the sparse op's autograd plus PyTorch ops). O_lin runs in the Triton
    kernels (``sparge::linear_dropped``) where ``kernels.use_triton(q)`` (CUDA, or
    TRITON_INTERPRET=1), otherwise in :func:`linear_attention_dropped`.
    """
    if not isinstance(branch, LinearBranch):
        raise TypeError(f"branch must be a LinearBranch, got {type(branch).__name__}")
    cfg = _config(config)
    check_flag("is_causal", is_causal)
    scale = check_qkv(q, k, v, scale)
    if q.shape[-1] != branch.head_dim:
        raise ValueError(f"q has head dim {q.shape[-1]} but branch.head_dim is {branch.head_dim}")
    m = _mask(q, k, scale, is_causal, cfg, block_mask, branch)
    out_s, _ = ops.block_sparse_attention_op(q, k, v, m.kv_num_blocks, m.kv_indices, scale, is_causal,
                                             m.block_q, m.block_k)
    return with_linear(out_s, q, k, v, m.kv_num_blocks, m.kv_indices, scale, is_causal, m.block_q, m.block_k,
                       branch.params(), *branch.spec())


def with_linear(out_s, q, k, v, kv_num_blocks, kv_indices, scale: float, is_causal: bool, block_q: int,
                block_k: int, params, combine: str, feature_map: str, eps: float, router: bool,
                num_heads: int = 0, q_lin=None):
    """The sparse output ``out_s`` (of the mask kv_num_blocks / kv_indices) combined with the linear
    branch over the blocks that mask drops: the part of :func:`sparse_linear_attention` after the
    sparse op, on the branch's parameters as a list (``LinearBranch.params()``) and its ``spec()``,
    so the backend's compiled sites compute the same function. q_lin: the q of φ(q) when ``q`` is
    pre-scaled (a symbolic scale: then scale is 1), else None (q itself)."""
    q_lin = q if q_lin is None else q_lin
    if combine == "sla-all":   # SLA's released form: linear attention over all keys, every row
        if is_causal:
            raise ValueError("combine='sla-all' (linear attention over all keys) is non-causal only; "
                             "use combine='sla' (over the dropped blocks) for causal attention")
        if kernels.use_triton(q):   # the Triton kernels (kernels/linear_all.py) behind a custom op
            return ops_linear.sla_all_op(out_s, q_lin, k, v, params[0], params[1], feature_map, eps)
        return sla_all_output(out_s, q_lin, k, v, params[0], params[1], feature_map, eps)
    keep = indices_to_dense(kv_num_blocks, kv_indices, cdiv(k.shape[2], block_k))
    if kernels.use_triton(q):   # the Triton kernels (kernels/linear.py) behind a custom op
        out_l = ops_linear.linear_dropped_op(q_lin, k, v, kv_num_blocks, kv_indices, block_q, block_k,
                                             is_causal, feature_map, eps)
    else:
        out_l = linear_attention_dropped(q_lin, k, v, keep, block_q, block_k, is_causal, feature_map, eps)
    domain = linear_domain(q.shape[2], k.shape[2], block_q, block_k, is_causal, q.device)
    dropped = _per_token((domain & ~keep).any(-1), block_q, q.shape[2])
    share = None
    if combine == "sla2":
        rq, rk = route_qk(q, k, params, combine, router)
        share = _kept_share(rq, rk, scale, is_causal, keep, block_q, block_k)
    return combine_outputs(out_s, out_l, dropped, share, combine, params, num_heads)


class AnchorHook:
    """The forward pre-hook :func:`enable_linear_branch` puts on a site module. Under torch.compile
    (Dynamo traces hooks) it calls ``sparge::linear_anchor`` on the branch's parameters: Dynamo then
    lifts them into the graph as inputs, and the node carries the module's ``nn_module_stack``, so
    the sparge backend pairs it with the module's attention call (passes/linear.py). The op is
    pure and its output unused: other backends (AOTAutograd, Inductor) drop it, and run eagerly
    the hook does nothing at all."""

    def __init__(self, name: str = BRANCH_NAME):
        self.name = name

    def __call__(self, module: nn.Module, args):
        if not torch.compiler.is_compiling():
            return None
        branch = getattr(module, self.name, None)
        if isinstance(branch, LinearBranch):
            ops_linear.linear_anchor_op(branch.params(), *branch.spec())
        return None


def _has_hook(module: nn.Module, name: str) -> bool:
    return any(isinstance(h, AnchorHook) and h.name == name for h in module._forward_pre_hooks.values())


def _site_module(model: nn.Module, path: str) -> nn.Module:
    if not isinstance(path, str):
        raise TypeError(f"sites: module paths are strings, got {type(path).__name__}")
    try:
        return model.get_submodule(path.split("#", 1)[0])
    except AttributeError as err:
        raise ValueError(f"sites: {path!r} is not a submodule of the model") from err


def _found_sites(model, sites, head_dim, example_inputs) -> dict:
    """{module path: its head dim} from ``sites`` and ``head_dim``, or from running the model on
    ``example_inputs`` (:func:`..site_finder.find_attention_modules`): every module whose own forward
    calls attention once (all of them where ``sites`` is None), each with its own head dim."""
    if sites is None and example_inputs is None:
        raise TypeError("enable_linear_branch needs sites (the module paths of the attention modules, e.g. "
                        "['blocks.0.attn', ...]; the site ids sparge_compile.explain lists are accepted) or "
                        "example_inputs (the model then runs once and its attention modules are found)")
    if isinstance(sites, str):
        raise TypeError("sites must be a list of module paths, not a single string")
    if example_inputs is None:
        if head_dim is None:
            raise TypeError("enable_linear_branch needs head_dim (the attention's head dim), or "
                            "example_inputs to read it from the model's attention calls")
        return {path: head_dim for path in sites}
    from .site_finder import find_attention_modules

    found = {f.path: f for f in find_attention_modules(model, example_inputs)}
    wanted = list(found) if sites is None else [p.split("#", 1)[0] for p in sites]
    return {path: _site_head_dim(path, found.get(path), head_dim) for path in wanted
            if sites is not None or _usable(found[path])}


def _usable(site) -> bool:
    """A found site a branch can serve: not the root, one attention call per forward call, one head dim."""
    ok = site.path != "" and site.calls_per_forward == 1 and site.head_dim is not None
    if not ok:
        log.warning("enable_linear_branch: no branch on %r (%s)", site.path or "<root>",
                    "the compiled root's hooks are not in its graph" if site.path == "" else
                    "several attention calls per forward call, or several head dims")
    return ok


def _site_head_dim(path, site, head_dim) -> int:
    if site is None:
        raise ValueError(f"sites: {path!r} calls no attention on example_inputs")
    if site.head_dim is None or (head_dim is not None and head_dim != site.head_dim):
        raise ValueError(f"sites: {path!r} calls attention with head dim {site.head_dim} (None: several), "
                         f"not head_dim={head_dim}")
    return site.head_dim


def enable_linear_branch(model: nn.Module, sites=None, head_dim: int | None = None,
                         num_heads: int | None = None, name: str = BRANCH_NAME, *, example_inputs=None,
                         **kwargs) -> dict[str, LinearBranch]:
    """Attach one LinearBranch as submodule ``name`` of each module path in ``sites`` (the attention
    modules' dotted names, or the backend's site ids ``"blocks.0.attn#0"``, whose part before ``#``
    is the module), so its parameters are the model's (trained by distill(), saved by
    state_dict()), and a forward pre-hook (:class:`AnchorHook`) through which the sparge backend
    finds it: the attention call of that module then computes sparse + linear attention with it.
    example_inputs (a tuple of arguments or a dict of keyword arguments): the model runs on them
    once (no gradients) and, with sites None, every module whose own forward calls attention once
    gets a branch, each of its own head dim (head_dim may then be omitted). kwargs go to
    LinearBranch. Returns {path: branch}. A site that already has one keeps it (and its hook)."""
    found = {}
    for path, dim in _found_sites(model, sites, head_dim, example_inputs).items():
        site = _site_module(model, path)
        branch = getattr(site, name, None)
        if branch is None:
            branch = LinearBranch(dim, num_heads, **kwargs)
            params = next(site.parameters(), None)
            if params is not None:      # the site's device; the branch stays float32 (as SLA's proj_l)
                branch = branch.to(params.device)
            site.add_module(name, branch)
        elif not isinstance(branch, LinearBranch):
            raise ValueError(f"sites: {path!r} already has an attribute {name!r} that is not a LinearBranch")
        if not _has_hook(site, name):
            site.register_forward_pre_hook(AnchorHook(name))
        found[path] = branch
    return found
