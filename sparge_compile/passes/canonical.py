"""Canonical view of Dynamo FX nodes: every spelling of the same operation gets one kind.

``canonicalize(node)`` returns a :class:`Canon` whose ``kind`` is one of

* ``matmul``    ``perm(a, pa) @ perm(b, pb)`` (then ``perm(., po)``): ``@``, ``torch.matmul``,
                ``torch.bmm``, ``Tensor.matmul``/``bmm``, two-operand ``torch.einsum``,
                ``torch.baddbmm`` (``alpha`` becomes a scale, ``beta != 0`` an additive bias)
* ``transpose`` swap of the last two axes: ``transpose``, ``.mT``, ``permute``, ``swapaxes``
* ``scale``     multiplication or division by a scalar (a number or a symbolic size)
* ``cast``      ``.float()``, ``.half()``, ``.to(dtype)``, ``.type_as``, ...
* ``identity``  eval-mode dropout (or ``p == 0``), ``contiguous``, ``clone``
* ``dropout``   dropout that is active (training)
* ``softmax``   ``torch.softmax``, ``F.softmax``, ``Tensor.softmax``, ``nn.Softmax`` (dim normalised)
* ``sdpa``      ``F.scaled_dot_product_attention`` (arguments bound by name)
* ``mha``       ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``)
* ``other``     anything else
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm,
              torch.Tensor.__matmul__}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
SOFTMAX_FNS = {torch.softmax, F.softmax, torch.Tensor.softmax, torch._C._nn.softmax
               if hasattr(torch._C._nn, "softmax") else torch.softmax}
MUL_FNS = {operator.mul, torch.mul, torch.Tensor.mul, operator.imul}
DIV_FNS = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, operator.itruediv}
DROPOUT_FNS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as", "type"}
IDENTITY_METHODS = {"contiguous", "clone"}
TRANSPOSE_FNS = {torch.transpose, torch.swapaxes, torch.swapdims}
SDPA_FNS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
MHA_FNS = {F.multi_head_attention_forward}

_SDPA_SIG = inspect.Signature([
    inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
    for n, d in [("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
                 ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
                 ("is_causal", False), ("scale", None), ("enable_gqa", False)]])


@dataclass
class Canon:
    kind: str
    x: object = None               # the main tensor input (transpose/scale/cast/identity/softmax)
    args: dict = field(default_factory=dict)

    def __repr__(self):
        return f"Canon({self.kind}, {self.args})"


def example_value(n):
    """The fake/example value Dynamo recorded for a node (or the constant itself)."""
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return n


def is_tensor_node(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(example_value(n), torch.Tensor)


def rank(n) -> int | None:
    ev = example_value(n)
    return ev.dim() if isinstance(ev, torch.Tensor) else None


def _is_scalar(a) -> bool:
    """A Python number, or a node holding a symbolic number (not a tensor)."""
    if isinstance(a, bool):
        return False
    if isinstance(a, (int, float)):
        return True
    if isinstance(a, fx.Node):
        ev = example_value(a)
        return isinstance(ev, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(ev, bool)
    return False


def _norm_dim(d, r):
    if not isinstance(d, int) or r is None:
        return None
    return d + r if d < 0 else d


def _swaps_last_two(perm, r) -> bool:
    perm = [_norm_dim(p, r) for p in perm]
    if None in perm or r is None or r < 2 or len(perm) != r:
        return False
    want = list(range(r - 2)) + [r - 1, r - 2]
    return perm == want


def _target_and_args(node: fx.Node, gm: fx.GraphModule | None):
    """(callable or method name, args, kwargs); call_module resolved to the module."""
    if node.op == "call_module" and gm is not None:
        return gm.get_submodule(node.target), node.args, node.kwargs
    return node.target, node.args, node.kwargs


def _parse_einsum(eq: str, ranks):
    """Two-operand einsum as a batched matmul: returns (pa, pb, po) permutations or None.

    perm(a, pa) has axes (*batch, i, c), perm(b, pb) has (*batch, c, j), and the einsum's
    output equals perm(perm(a, pa) @ perm(b, pb), po) (None means identity).
    """
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    # expand "..." into fresh upper-case letters
    if any("..." in s for s in ops + [out]):
        fresh = "".join(chr(ord("A") + i) for i in range(8))
        n_ell = None
        new = []
        for s, r in zip(ops, ranks):
            if "..." in s:
                if r is None:
                    return None
                k = r - (len(s) - 3)
                if n_ell is not None and n_ell != k:
                    return None
                n_ell = k
                s = s.replace("...", fresh[:k])
            new.append(s)
        if n_ell is None:
            return None
        ops = new
        out = out.replace("...", fresh[:n_ell])
    A, B = ops
    if len(set(A)) != len(A) or len(set(B)) != len(B) or len(set(out)) != len(out):
        return None
    contracted = [c for c in A if c in B and c not in out]
    if len(contracted) != 1:
        return None
    c = contracted[0]
    batch = [x for x in out if x in A and x in B]
    i_s = [x for x in A if x not in B]
    j_s = [x for x in B if x not in A]
    if len(i_s) != 1 or len(j_s) != 1 or set(out) != set(batch) | {i_s[0], j_s[0]}:
        return None
    if set(A) != set(batch) | {i_s[0], c} or set(B) != set(batch) | {j_s[0], c}:
        return None
    i, j = i_s[0], j_s[0]
    ca = batch + [i, c]
    cb = batch + [c, j]
    co = batch + [i, j]
    pa = tuple(A.index(x) for x in ca)
    pb = tuple(B.index(x) for x in cb)
    po = tuple(co.index(x) for x in out)

    def ident(p):
        return None if p == tuple(range(len(p))) else p

    return ident(pa), ident(pb), ident(po)


def canonicalize(node: fx.Node, gm: fx.GraphModule | None = None) -> Canon:
    if node.op not in ("call_function", "call_method", "call_module"):
        return Canon("other")
    try:
        return _canonicalize(node, gm)
    except Exception:  # a spelling we do not understand is "other", never a crash
        return Canon("other")


def _canonicalize(node: fx.Node, gm) -> Canon:
    target, args, kwargs = _target_and_args(node, gm)
    method = target if node.op == "call_method" else None
    for family in _FAMILIES:
        c = family(node, target, method, args, kwargs)
        if c is not None:
            return c
    return Canon("other")


def _matmul(node, target, method, args, kwargs):
    if target in MATMUL_FNS or method in MATMUL_METHODS:
        a, b = args[0], args[1]
        if is_tensor_node(a) and is_tensor_node(b):
            return Canon("matmul", args=dict(a=a, b=b, pa=None, pb=None, po=None, alpha=None, bias=None))
    if target is torch.einsum:
        eq, ops = args[0], list(args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if isinstance(eq, str) and len(ops) == 2 and all(is_tensor_node(o) for o in ops):
            perms = _parse_einsum(eq, [rank(o) for o in ops])
            if perms is not None:
                pa, pb, po = perms
                return Canon("matmul", args=dict(a=ops[0], b=ops[1], pa=pa, pb=pb, po=po, alpha=None,
                                                 bias=None))
    if target in (torch.baddbmm, torch.Tensor.baddbmm) or method == "baddbmm":
        inp, b1, b2 = args[0], args[1], args[2]
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if is_tensor_node(b1) and is_tensor_node(b2) and _is_scalar(alpha) and isinstance(beta, (int, float)):
            return Canon("matmul", args=dict(a=b1, b=b2, pa=None, pb=None, po=None,
                                             alpha=None if alpha == 1 else alpha,
                                             bias=None if beta == 0 else inp, beta=beta))
    return None


def _transpose(node, target, method, args, kwargs):
    """Transposes of the last two axes (transpose, swapaxes, .mT, permute)."""
    x = args[0] if args else None
    r_in = rank(x)
    if target in TRANSPOSE_FNS or method in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (args[1], args[2]) if len(args) >= 3 else (kwargs.get("dim0"), kwargs.get("dim1"))
        d = sorted([_norm_dim(d0, r_in), _norm_dim(d1, r_in)])
        ok = r_in is not None and r_in >= 2 and d == [r_in - 2, r_in - 1]
        return Canon("transpose", x=x) if ok else Canon("other")
    if target is getattr and len(args) == 2 and args[1] == "mT":
        return Canon("transpose", x=x)
    if target is torch.permute or method == "permute":
        perm = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kwargs.get("dims"))
        if isinstance(perm, int):
            perm = [perm]
        ok = perm is not None and _swaps_last_two(list(perm), r_in)
        return Canon("transpose", x=x) if ok else Canon("other")
    return None


_MUL_METHODS = ("mul", "div", "__mul__", "__truediv__", "mul_", "div_", "__rmul__")


def _scale(node, target, method, args, kwargs):
    """Multiplication or division by a scalar."""
    if not (target in MUL_FNS or target in DIV_FNS or method in _MUL_METHODS):
        return None
    a, b = args[0], args[1]
    if target in DIV_FNS or method in ("div", "__truediv__", "div_"):
        if kwargs.get("rounding_mode") is None and is_tensor_node(a) and _is_scalar(b):
            return Canon("scale", x=a, args=dict(op="div", factor=b))
        return Canon("other")
    if is_tensor_node(a) and _is_scalar(b):
        return Canon("scale", x=a, args=dict(op="mul", factor=b))
    if is_tensor_node(b) and _is_scalar(a):
        return Canon("scale", x=b, args=dict(op="mul", factor=a))
    return Canon("other")


_CAST_FNS = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.to, torch.Tensor.type_as,
             torch.Tensor.bfloat16)


def _cast_or_identity(node, target, method, args, kwargs):
    x = args[0] if args else None
    if method in CAST_METHODS or target in _CAST_FNS:
        ev, evx = example_value(node), example_value(x)
        if isinstance(ev, torch.Tensor) and isinstance(evx, torch.Tensor) and ev.shape == evx.shape \
                and ev.device == evx.device:
            return Canon("cast", x=x, args=dict(dtype=ev.dtype))
        return Canon("other")
    if method in IDENTITY_METHODS or target in (torch.clone,):
        if kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
            return Canon("other")
        return Canon("identity", x=x)
    return None


def _dropout(node, target, method, args, kwargs):
    x = args[0] if args else None
    if isinstance(target, torch.nn.Dropout):
        active = target.training and target.p > 0
        return Canon("dropout" if active else "identity", x=x, args=dict(p=target.p))
    if target not in DROPOUT_FNS:
        return None
    if target is torch.dropout:  # torch.dropout(input, p, train)
        p = args[1] if len(args) > 1 else kwargs.get("p")
        train = args[2] if len(args) > 2 else kwargs.get("train")
    else:  # F.dropout(input, p=0.5, training=True, inplace=False)
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        train = args[2] if len(args) > 2 else kwargs.get("training", True)
    if train is False or p == 0:
        return Canon("identity", x=x)
    return Canon("dropout", x=x, args=dict(p=p))


def _softmax(node, target, method, args, kwargs):
    sm_module = isinstance(target, torch.nn.Softmax)
    if not (target in SOFTMAX_FNS or method == "softmax" or sm_module):
        return None
    x = args[0] if args else None
    if sm_module:
        dim, dtype = target.dim, None
    else:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        dtype = args[2] if len(args) > 2 and not isinstance(args[2], int) else kwargs.get("dtype")
    return Canon("softmax", x=x, args=dict(dim=_norm_dim(dim, rank(x)), rank=rank(x), dtype=dtype))


def _fused(node, target, method, args, kwargs):
    """SDPA and F.multi_head_attention_forward, their arguments bound by name."""
    if target in SDPA_FNS:
        bound = _SDPA_SIG.bind(*args, **kwargs)
    elif target in MHA_FNS:
        bound = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    else:
        return None
    bound.apply_defaults()
    kind = "sdpa" if target in SDPA_FNS else "mha"
    return Canon(kind, x=bound.arguments["query"], args=dict(bound.arguments))


_FAMILIES = (_matmul, _transpose, _scale, _cast_or_identity, _dropout, _softmax, _fused)
