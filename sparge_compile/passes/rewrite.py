"""Replace matched attention sites by calls of the sparse op, then dead-code elimination."""
from __future__ import annotations

import torch
from torch import fx

from .. import site_ops
from ..config import SpargeConfig
from .canonical import example_value
from .matcher import AttentionMatch, Operand


def _operand(graph: fx.Graph, op: Operand, resolve) -> fx.Node:
    node = resolve(op.node)
    if op.perm is None:
        return node
    return graph.call_method("permute", (node, *op.perm))


def _device_buffers(site: AttentionMatch, config: SpargeConfig, state) -> None:
    """Give a site on a device in NATIVE_DEVICES its knobs and counter (the native path's)."""
    ev = example_value(site.q.node) if site.q is not None else None
    if state is not None and isinstance(ev, torch.Tensor) and ev.device.type in site_ops.NATIVE_DEVICES:
        from ..native_ops import device_buffers

        state.knobs, state.counter = device_buffers(config.topk, config.topp, ev.device)


def rewrite_site(gm: fx.GraphModule, site: AttentionMatch, config: SpargeConfig, key: str,
                 replaced: dict | None = None, capture: bool = False,
                 owner: fx.Node | None = None, state=None, linear=None) -> fx.Node:
    """Insert the sparse call before the site's anchor and route the anchor's users to it.

    replaced: anchors rewritten earlier -> their replacement (a site may read another's output).
    capture: call the calibration capture op (dense attention, q/k/v reported) instead.
    owner: a placeholder holding a parameter of the compiled model (tags the site's calls).
    state: the site's SiteState (its native-path buffers are made here).
    linear: the site's paired :class:`~sparge_compile.passes.linear.Branch` (sparse + linear
    attention with its parameters), or None.
    """
    graph = gm.graph
    anchor = site.anchor
    replaced = {} if replaced is None else replaced

    def resolve(x):
        return fx.node.map_arg(x, lambda n: replaced.get(n, n))

    with graph.inserting_before(anchor):
        if site.kind == "mha":
            a = site.mha_args
            new = graph.call_function(site_ops.mha_forward, resolve((
                a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"],
                a["out_proj_weight"], a["out_proj_bias"], a["use_separate_proj_weight"], a["q_proj_weight"],
                a["k_proj_weight"], a["v_proj_weight"], config.block_q, config.block_k, key)),
                {"capture": capture, "is_causal": site.is_causal})
        else:
            q, k, v = (_operand(graph, o, resolve) for o in (site.q, site.k, site.v))
            fn = site_ops.site_capture_attention if capture else site_ops.site_attention
            args = (q, k, v, resolve([tuple(p) for p in site.scale_parts]), site.is_causal, config.block_q,
                    config.block_k, key, owner)
            kwargs = {}
            if linear is not None and not capture:   # the Python ops: no device buffers
                fn, args = site_ops.site_linear_attention, args + linear.args()
            elif not capture:
                _device_buffers(site, config, state)
            if site.key_padding is not None:
                kwargs["kv_keep"] = resolve(site.key_padding)
            new = graph.call_function(fn, args, kwargs or None)
            if site.out_perm is not None:
                new = graph.call_method("permute", (new, *site.out_perm))
    new.meta.update({k: v for k, v in anchor.meta.items() if k in ("stack_trace", "nn_module_stack",
                                                                  "source_fn_stack")})
    anchor.replace_all_uses_with(new)
    replaced[anchor] = new
    return new


def finish(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
