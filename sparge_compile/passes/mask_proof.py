"""Proofs that a mask built inside the graph is causal (or no mask at all), from its construction.

Transformers builds the causal mask of a decoder under torch.compile from ``arange``s and
comparisons (``kv_idx <= q_idx``), combined with ``&`` and moved with ``.to``/``expand``; the
mask is then passed to SDPA as ``attn_mask``. This module reads that construction as algebra,
not by evaluating the mask (which would cost Nq x Nk at compile time and hold only for the
example sizes):

* an ``arange`` is an *index* along one axis, ``i + offset`` (``+``/``-`` a scalar moves the
  offset; ``[None, :]``, ``unsqueeze``, ``expand`` move or broadcast the axis);
* a comparison of a key index with a query index is a *band*: ``j - i <= d`` (or ``>= d``), j on
  the key axis (-1), i on the query axis (-2);
* ``new_ones``/``ones``/``full(True)`` are *true*; ``&`` is a conjunction.

A mask is proved causal when its conjunction is exactly one upper band ``j - i <= 0`` (SDPA's
top-left causal mask) and true terms; proved absent when it is all true terms. Offsets may be
symbolic sizes (the check installs a guard). A term read from data of shape (B | 1, 1, 1, Nk)
is a key-padding mask (transformers' ``attention_mask``): it is passed to the kernels, which
drop key blocks of padding alone and mask partly padded ones element-wise. Anything else stays
unproved, with the reason: a sliding window, a bottom-right aligned mask with Nq != Nk, or
another term built from data.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .canonical import example_value

CAUSAL, NO_MASK = "causal", "none"


@dataclass(frozen=True)
class Index:
    """A tensor of rank ``rank`` whose value is ``position along axis + offset`` (size 1 elsewhere)."""

    axis: int
    rank: int
    offset: object = 0


@dataclass(frozen=True)
class Band:
    """``j - i <= d`` (upper) or ``j - i >= d`` (lower): j the index on ``ka``, i on ``qa``."""

    qa: int
    ka: int
    rank: int
    upper: bool
    d: object


@dataclass(frozen=True)
class Const:
    """A tensor of rank ``rank`` holding one value everywhere."""

    value: object
    rank: int


@dataclass(frozen=True)
class KeyPadding:
    """A term read from data whose shape is (B | 1, 1, ..., 1, Nk): a key-padding mask."""

    node: fx.Node


TRUE = "true"


class Unproved(Exception):
    pass


_CMP = {operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
        torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt"}
_CMP_METHODS = {"le": "le", "lt": "lt", "ge": "ge", "gt": "gt",
                "__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt"}
_AND = (operator.and_, torch.logical_and, torch.bitwise_and)
_AND_METHODS = ("__and__", "logical_and", "bitwise_and", "__rand__")


def prove_mask(mask: fx.Node, nq, nk) -> tuple[str | None, str, fx.Node | None]:
    """(CAUSAL | NO_MASK | None, reason, key-padding node or None) for an SDPA ``attn_mask``
    node, q length nq, k length nk. The key-padding node is a term of the mask read from data,
    (B | 1, 1, 1, Nk) bool: the kernels mask those keys element-wise."""
    ev = example_value(mask)
    if not isinstance(ev, torch.Tensor) or ev.dtype != torch.bool:
        return None, "attn_mask is not a boolean mask built in the graph (an additive bias or data)", None
    try:
        terms = _flatten(_term(mask))
        pads = [t.node for t in terms if isinstance(t, KeyPadding)]
        if len(pads) > 1:
            raise Unproved("more than one key-padding term")
        kind, why = _classify([t for t in terms if not isinstance(t, KeyPadding)], ev.dim(), nq, nk)
        if pads:
            why += " and a key-padding mask"
        return kind, why, (pads[0] if pads else None)
    except Unproved as e:
        return None, f"attn_mask not proved causal: {e}", None


def _classify(terms: list, rank: int, nq, nk) -> tuple[str | None, str]:
    terms = [TRUE if isinstance(t, Const) and t.value is True else t for t in terms]
    bands = [t for t in terms if isinstance(t, Band)]
    if any(not isinstance(t, Band) and t != TRUE for t in terms):
        raise Unproved("a term is not a comparison of positions")
    if not bands:
        return NO_MASK, "attn_mask is all true (proved from its construction)"
    for b in bands:
        if (b.qa - b.rank, b.ka - b.rank) != (-2, -1):
            raise Unproved("a comparison is not between the query and the key axis")
    bands = [b for b in bands if not _always_true(b, nq, nk)]
    if not bands:
        return NO_MASK, "attn_mask is all true at these lengths (proved from its construction)"
    if len(bands) != 1 or not bands[0].upper:
        raise Unproved("a lower bound on key - query position (a sliding window or an anti-causal mask) "
                       "is not supported")
    d = bands[0].d
    if _known_true(d == 0):
        return CAUSAL, "attn_mask proved causal from its construction"
    raise Unproved(f"causal band offset {d} (bottom-right aligned with q_len != kv_len, or shifted)")


def _always_true(b: Band, nq, nk) -> bool:
    """j - i ranges over [-(nq - 1), nk - 1]: a band wider than that holds everywhere (a sliding
    window longer than the sequence)."""
    return _known_true(b.d >= nk - 1) if b.upper else _known_true(b.d <= 1 - nq)


def _known_true(x) -> bool:
    """A comparison that holds; on symbolic sizes deciding it installs a guard."""
    try:
        return bool(x)
    except Exception:
        return False


def _flatten(v) -> list:
    return [x for t in v for x in _flatten(t)] if isinstance(v, tuple) else [v]


def _value(n):
    """The abstract value of node ``n`` (Index, Band, TRUE or a tuple: a conjunction)."""
    if not isinstance(n, fx.Node):
        raise Unproved(f"unexpected constant {n!r}")
    if n.op == "placeholder":
        raise Unproved(f"it reads the input {n.name} (data, e.g. a padding mask)")
    if n.op not in ("call_function", "call_method"):
        raise Unproved(f"{n.op} {n.target}")
    target, args, kwargs = n.target, n.args, n.kwargs
    for rule in _RULES:
        v = rule(n, target, args, kwargs)
        if v is not None:
            return v
    raise Unproved(f"{getattr(target, '__name__', target)} ({n.name})")


def _arange(n, target, args, kwargs):
    if target is not torch.arange or kwargs.get("step", 1) != 1 or len(args) > 2:
        return None
    start = args[0] if len(args) == 2 else kwargs.get("start", 0)
    return Index(0, 1, start)


def _shift(n, target, args, kwargs):
    if target not in (operator.add, operator.sub, torch.add, torch.sub) and target not in ("add", "sub"):
        return None
    a, b = args[0], args[1]
    sign = -1 if target in (operator.sub, torch.sub, "sub") else 1
    if isinstance(a, fx.Node) and _is_scalar(b):
        x = _value(a)
        if isinstance(x, Index):
            return Index(x.axis, x.rank, x.offset + sign * _scalar(b))
        if isinstance(x, Const):
            return Const(x.value + sign * _scalar(b), x.rank)
    elif isinstance(b, fx.Node) and _is_scalar(a) and sign == 1:
        x = _value(b)
        if isinstance(x, Index):
            return Index(x.axis, x.rank, x.offset + _scalar(a))
    raise Unproved(f"arithmetic on positions ({n.name})")


def _same_value(n, target, args, kwargs):
    """.to / .contiguous / .expand / clone: the same values (expand may add leading axes)."""
    if target not in ("to", "contiguous", "expand", "clone", "type_as") and target is not torch.clone:
        return None
    x, ev, evx = args[0], example_value(n), example_value(args[0])
    if not (isinstance(ev, torch.Tensor) and isinstance(evx, torch.Tensor)) or ev.dtype != evx.dtype:
        raise Unproved(f"a cast of the mask ({n.name})")
    return _with_rank(_value(x), ev.dim())


def _reindex(n, target, args, kwargs):
    """x[None, :, None] / x[:, :1] / unsqueeze / x[b_idx, q_idx] (a gather by index tensors)."""
    if target is operator.getitem and isinstance(args[1], tuple):
        if all(isinstance(i, fx.Node) for i in args[1]):
            return _gather(_value(args[0]), [_value(i) for i in args[1]], example_value(n).dim())
        return _getitem(_value(args[0]), args[1], example_value(args[0]).dim())
    if target in ("unsqueeze", torch.unsqueeze):
        x, d = _value(args[0]), args[1]
        r = example_value(args[0]).dim()
        d = d + r + 1 if d < 0 else d
        return _move(x, lambda a: a + (a >= d), r + 1)
    return None


def _gather(x, idx: list, rank: int):
    """x[i0, i1, ...] with index tensors: the value of x at the positions they hold."""
    if isinstance(x, Const):
        return Const(x.value, rank)
    if not isinstance(x, Index) or len(idx) != x.rank or not all(isinstance(i, Index) for i in idx):
        raise Unproved("a gather that is not of positions by positions")
    i = _with_rank(idx[x.axis], rank)
    return Index(i.axis, rank, i.offset + x.offset)


def _getitem(x, idx: tuple, r: int):
    if sum(i is Ellipsis for i in idx) > 1:
        raise Unproved("indexing with two ellipses")
    n_used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, src, mapping, first = 0, 0, {}, None
    for i in idx:
        if i is None:
            out += 1
        elif i is Ellipsis:
            for _ in range(r - n_used):
                mapping[src], src, out = out, src + 1, out + 1
        elif isinstance(i, slice) and i.step in (None, 1) and i.start in (None, 0) and i.stop in (None, 1):
            if i.stop == 1:
                first = src
            mapping[src], src, out = out, src + 1, out + 1
        else:
            raise Unproved(f"indexing with {i!r}")
    for _ in range(r - src):
        mapping[src], src, out = out, src + 1, out + 1
    if isinstance(x, Index) and first == x.axis:   # x[..., :1]: the first position only
        return Const(x.offset, out)
    return _move(x, lambda a: mapping[a], out)


def _diff(n, target, args, kwargs):
    """torch.diff of positions along their axis: 1 everywhere (with prepend = first - 1)."""
    if target is not torch.diff:
        return None
    x = _value(args[0])
    dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
    if kwargs.get("n", 1) != 1 or kwargs.get("append") is not None or not isinstance(x, Index):
        raise Unproved(f"a diff ({n.name})")
    if (dim + x.rank if dim < 0 else dim) != x.axis:
        raise Unproved(f"a diff across positions ({n.name})")
    pre = kwargs.get("prepend")
    if pre is not None:
        p = _value(pre)
        if not (isinstance(p, Const) and _known_true(p.value == x.offset - 1)):
            raise Unproved(f"a diff with another prepend ({n.name})")
    return Const(1, x.rank)


def _const_ops(n, target, args, kwargs):
    """eq / ne / cumsum on constants (the packed-sequence term of transformers' masks)."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name == "cumsum":
        x = _value(args[0])
        if isinstance(x, Const) and x.value in (0, False):
            return Const(0, x.rank)
        raise Unproved(f"a cumulative sum ({n.name})")
    if name not in ("eq", "ne", "__eq__", "__ne__"):
        return None
    a, b = (_value(x) if isinstance(x, fx.Node) else Const(x, 0) for x in args[:2])
    if isinstance(a, Const) and isinstance(b, Const):
        same = _known_true(a.value == b.value)
        return Const(same if name in ("eq", "__eq__") else not same, max(a.rank, b.rank))
    raise Unproved(f"an equality of positions ({n.name})")


def _compare(n, target, args, kwargs):
    op = _CMP.get(target) if not isinstance(target, str) else _CMP_METHODS.get(target)
    if op is None:
        return None
    a, b = (_value(x) if isinstance(x, fx.Node) else x for x in args[:2])
    if isinstance(a, Index) and _is_scalar(args[1]):   # position >= c: true everywhere if offset >= c
        c = _scalar(args[1])
        if op in ("ge", "gt") and _known_true(a.offset >= c if op == "ge" else a.offset > c):
            return Const(True, a.rank)
        raise Unproved(f"a bound on a position ({n.name})")
    if not (isinstance(a, Index) and isinstance(b, Index)):
        raise Unproved(f"a comparison that is not position against position ({n.name})")
    r = max(a.rank, b.rank)
    a, b = _with_rank(a, r), _with_rank(b, r)
    if a.axis == b.axis:
        raise Unproved(f"positions compared along one axis ({n.name})")
    # a op b  with a = pa + oa, b = pb + ob; write it as (a_pos - b_pos) op (ob - oa)
    c = b.offset - a.offset
    if op in ("lt", "gt"):
        c = c - 1 if op == "lt" else c + 1
    upper = op in ("le", "lt")
    if a.axis > b.axis:           # a is the key index: j - i <= c (or >= c)
        return Band(b.axis, a.axis, r, upper, c)
    return Band(a.axis, b.axis, r, not upper, -c)   # i - j op c  <=>  j - i (flipped) -c


def _conj(n, target, args, kwargs):
    if target not in _AND and target not in _AND_METHODS:
        return None
    r = example_value(n).dim()
    return tuple(_with_rank(_term(x), r) for x in args[:2])


def _term(x):
    try:
        return _value(x)
    except Unproved:
        ev = example_value(x) if isinstance(x, fx.Node) else None
        if isinstance(ev, torch.Tensor) and ev.dtype == torch.bool and ev.dim() == 4 \
                and ev.shape[-2] == 1 and ev.shape[-1] != 1 and ev.shape[1] == 1:
            return KeyPadding(x)
        raise


def _true(n, target, args, kwargs):
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    ev = example_value(n)
    if name in ("new_ones", "ones", "ones_like") and isinstance(ev, torch.Tensor) and ev.dtype == torch.bool:
        return TRUE
    if name in ("full", "new_full") and args[-1] is True:
        return TRUE
    return None


_RULES = (_arange, _shift, _same_value, _reindex, _diff, _const_ops, _compare, _conj, _true)


def _with_rank(x, r: int):
    """Broadcast to rank r (leading axes added)."""
    if x == TRUE or isinstance(x, KeyPadding):
        return x
    if isinstance(x, tuple):
        return tuple(_with_rank(t, r) for t in x)
    if x.rank > r:
        raise Unproved("rank decreased")
    return _move(x, lambda a: a + (r - x.rank), r)


def _move(x, f, rank: int):
    if x == TRUE or isinstance(x, KeyPadding):
        return x
    if isinstance(x, tuple):
        return tuple(_move(t, f, rank) for t in x)
    if isinstance(x, Index):
        return Index(f(x.axis), rank, x.offset)
    if isinstance(x, Const):
        return Const(x.value, rank)
    return Band(f(x.qa), f(x.ka), rank, x.upper, x.d)


def _is_scalar(x) -> bool:
    if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
        return True
    return isinstance(x, fx.Node) and isinstance(example_value(x), (int, torch.SymInt))


def _scalar(x):
    return example_value(x) if isinstance(x, fx.Node) else x


_ADD = (operator.add, torch.add, "add", "__add__", "__radd__")


def additive_mask(n: fx.Node):
    """``n = scores + m`` with ``m = where(cond, 0, very negative)``: (scores node, cond node), else None.

    transformers' eager attention adds such a mask (``finfo.min`` where hidden) to the scores.
    """
    if n.op not in ("call_function", "call_method") or n.target not in _ADD or len(n.args) != 2:
        return None
    for x, m in (n.args, n.args[::-1]):
        cond = _where_mask(m)
        if cond is not None and isinstance(x, fx.Node):
            return x, cond
    return None


def _where_mask(m):
    """cond of ``where(cond, 0, v)`` with v <= -1e30 (or -inf), through casts; else None."""
    while isinstance(m, fx.Node) and m.op == "call_method" and m.target in ("to", "type_as", "contiguous"):
        m = m.args[0]
    if not (isinstance(m, fx.Node) and m.target in (torch.where, "where") and len(m.args) == 3):
        return None
    cond, zero, neg = m.args
    zero, neg = (_number(x) for x in (zero, neg))
    if zero == 0 and neg is not None and neg <= -1e30:
        return cond
    return None


def _number(x):
    if isinstance(x, fx.Node):
        ev = example_value(x)
        if isinstance(ev, torch.Tensor) and ev.numel() == 1 and x.target in (torch.zeros, torch.full,
                                                                               torch.tensor):
            return 0 if x.target is torch.zeros else (x.args[-1] if x.target is torch.full else None)
        return None
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None
