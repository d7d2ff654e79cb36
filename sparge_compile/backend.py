"""The torch.compile backend "sparge": rewrite every attention it can prove plain to the sparse op.

    model = torch.compile(model, backend="sparge", options={"topk": 0.05, "min_seq_len": 0})
    be = sparge_compile.backend(config=SpargeConfig(...), inner="aot_eager")   # advanced use
    model = torch.compile(model, backend=be); be.set_config(topk=0.1)         # no recompile
    print(sparge_compile.explain(model))

The pass runs on Dynamo's FX graph, before AOTAutograd, so training traces the sparse op's own
autograd formula; the rewritten graph then goes to Inductor (or ``aot_eager``/``eager``).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import weakref

import torch

from .config import DEFAULT_CONFIG, SpargeConfig
from .passes import sparsify_graph
from .passes import runtime
from .passes.shield import shield_softmax_axes
from .passes.report import GraphReport, Report, log_graph_report
from .plan import SpargePlan
from .validate import check_flag

log = logging.getLogger("sparge_compile.backend")

INNERS = ("inductor", "aot_eager", "eager")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SpargeConfig))
EXTRA_OPTIONS = ("inner", "plan", "inductor", "record_masks")
RUNTIME_FIELDS = ("topk", "topp", "mode")   # change without a recompile (read by the mask op)

_GRAPHS: list[GraphReport] = []
_LOCK = threading.Lock()


def _current_frame():
    """(code, module) of the frame Dynamo is compiling (to attribute reports to a compiled model)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        if tx is None:
            return None, None
        owner = tx.f_locals.get("self") if isinstance(tx.f_locals, dict) else None
        return tx.f_code, owner if isinstance(owner, torch.nn.Module) else None
    except Exception:
        return None, None


def _graph_name() -> str:
    try:
        cid = torch._guards.CompileContext.current_compile_id()
        if cid is not None:
            return str(cid)
    except Exception:
        pass
    return f"g{len(_GRAPHS)}"


def _check_inner(inner):
    if callable(inner) or inner in INNERS:
        return inner
    raise ValueError(f"sparge: inner must be one of {INNERS} or a backend callable, got {inner!r}")


def _apply_options(config: SpargeConfig, inner, plan, inductor_opts, options: dict | None):
    """Split ``torch.compile(options=...)`` into SpargeConfig fields and backend settings."""
    if not options:
        return config, inner, plan, inductor_opts
    if not isinstance(options, dict):
        raise TypeError(f"sparge: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(CONFIG_FIELDS) - set(EXTRA_OPTIONS))
    if unknown:
        raise ValueError(f"sparge: unknown option(s) {unknown}; valid options are the SpargeConfig fields "
                         f"{list(CONFIG_FIELDS)} and {list(EXTRA_OPTIONS)}")
    fields = {k: v for k, v in options.items() if k in CONFIG_FIELDS}
    if fields:
        config = config.replace(**fields)
    inner = _check_inner(options.get("inner", inner))
    plan = options.get("plan", plan)
    extra = options.get("inductor")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(k, str) for k in extra)):
        raise TypeError(f"sparge: option 'inductor' must be a dict of Inductor config patches "
                        f"(name -> value), got {type(extra).__name__}")
    if "record_masks" in options:
        check_flag("sparge option 'record_masks'", options["record_masks"])
    inductor_opts = dict(inductor_opts or {}, **(extra or {}))
    return config, inner, _check_plan(plan), inductor_opts


def _check_plan(plan):
    """A plan as the pass takes it: a SpargePlan (also from a saved path or its dict), a dict or
    a callable."""
    plan = SpargePlan.coerce(plan)
    if plan is not None and not (callable(plan) or isinstance(plan, (dict, SpargePlan))):
        raise TypeError(f"sparge: plan must be a SpargePlan, a dict or a callable, got {type(plan).__name__}")
    return plan


def _compile_inner(inner, gm, example_inputs, mode=None, inductor_opts=None):
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if mode and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(inductor_opts or {})
    return compile_fx(gm, example_inputs, config_patches=patches or None)


class SpargeBackend:
    """A torch.compile backend callable with its own config, inner compiler and site plan.

    config: the SpargeConfig for every site (default: ``SpargeConfig()``).
    inner:  "inductor" (default), "aot_eager", "eager", or a backend callable for the rewritten graph.
    plan:   None (rewrite every qualifying site), a :class:`SpargePlan` from ``calibrate`` (or
            the path of a saved one), or per-site decisions: a dict ``{site id or name:
            SpargeConfig | dict of fields | "dense" | None}`` (key "*" for the rest) or a
            callable ``plan(site_report) -> SpargeConfig | None``.
    record_masks: keep each site's last mask for the report's measured sparsity (default). Set
            False under CUDA graphs (``mode="reduce-overhead"``): their memory pool may hold no
            untracked tensors. Note that CUDA graphs also freeze topk/topp/mode at capture time:
            :meth:`set_config` then needs a new capture (``torch._dynamo.reset()`` and a new call).
    """

    def __init__(self, config: SpargeConfig | None = None, inner="inductor", plan=None,
                 record_masks: bool = True):
        if config is None:
            config = DEFAULT_CONFIG
        if not isinstance(config, SpargeConfig):
            raise TypeError(f"sparge: config must be a SpargeConfig, got {type(config).__name__}")
        self.config = config
        self.inner = _check_inner(inner)
        self.record_masks = check_flag("sparge: record_masks", record_masks)
        self.plan = _check_plan(plan)
        self.inductor_options: dict = {}
        self.graphs: list[GraphReport] = []
        self.capture = False   # calibrate(): sites become the dense capture op; reports stay private
        self.__name__ = "sparge"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None,
                 **kwargs):
        opts = dict(options or {}, **kwargs)
        config, inner, plan, ind = _apply_options(self.config, self.inner, self.plan, self.inductor_options,
                                                  opts)
        name = _graph_name()
        code, owner = _current_frame()
        gr = sparsify_graph(gm, config, plan, graph_name=name, code=code, capture=self.capture)
        gr.code, gr.owner = code, (weakref.ref(owner) if owner is not None else None)
        record = bool(opts.get("record_masks", self.record_masks))
        for s in gr.sites:
            if s.state is not None:
                s.state.record = record
        gr.inner = inner if isinstance(inner, str) else getattr(
            inner, "__name__", "custom")
        with _LOCK:
            self.graphs.append(gr)
            if not self.capture:
                _GRAPHS.append(gr)
        if gr.sites:
            log_graph_report(gr)
        else:
            log.info("sparge: graph %s has no attention site", name)
        if inner == "inductor":
            shield_softmax_axes(gm)   # Inductor's attention fusion misreads softmax(dim != -1)
        return _compile_inner(inner, gm, example_inputs, mode, ind)

    def __getstate__(self):
        """Pickle the settings, not what the backend collected (reports hold code objects)."""
        state = dict(self.__dict__)
        state["graphs"] = []
        return state

    def set_config(self, **changes) -> None:
        """Change topk / topp / mode of every site this backend rewrote, at run time, no recompile.

        Block sizes and min_seq_len shape the compiled graph: change them by compiling again.
        """
        bad = sorted(set(changes) - set(RUNTIME_FIELDS))
        if bad:
            raise ValueError(f"sparge: {bad} cannot change at run time (only {list(RUNTIME_FIELDS)}); "
                             "compile again with a new config")
        self.config = self.config.replace(**changes)
        for gr in self.graphs:
            for s in gr.sites:
                st = s.state
                if st is not None:
                    st.config = st.config.replace(**changes)

    def report(self) -> Report:
        return Report(self.graphs)

    def reset(self):
        """Called by torch._dynamo.reset(): forget this backend's reports."""
        self.graphs.clear()


def backend(config: SpargeConfig | None = None, inner="inductor", plan=None,
            record_masks: bool = True) -> SpargeBackend:
    """A sparge backend callable for ``torch.compile(model, backend=...)`` (see :class:`SpargeBackend`)."""
    return SpargeBackend(config=config, inner=inner, plan=plan, record_masks=record_masks)


def sparge_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None,
                   **kwargs):
    """The ``backend="sparge"`` entry point: ``options`` are SpargeConfig fields plus ``inner``,
    ``plan`` and ``inductor`` (Inductor config patches); unknown keys raise ValueError."""
    return SpargeBackend()(gm, example_inputs, options=options, mode=mode, **kwargs)


def _codes_of(obj) -> set:
    codes = set()
    orig = getattr(obj, "_orig_mod", None)
    if orig is not None:
        obj = orig
    fn = getattr(obj, "_torchdynamo_orig_callable", None)
    if fn is not None:
        obj = fn
    if isinstance(obj, torch.nn.Module):
        for m in obj.modules():
            for attr in ("forward", "_call_impl", "__call__"):
                f = getattr(type(m), attr, None)
                if f is not None and hasattr(f, "__code__"):
                    codes.add(f.__code__)
    else:
        f = getattr(obj, "__func__", obj)
        if hasattr(f, "__code__"):
            codes.add(f.__code__)
    return codes


def explain(obj=None, *args, **kwargs) -> Report:
    """The report of every attention site the sparge backend found.

    obj: a model or function returned by ``torch.compile(..., backend="sparge")`` (its graphs),
    a :class:`SpargeBackend` (the graphs it compiled), or None (every graph compiled so far).
    args/kwargs: if given, ``obj(*args, **kwargs)`` is run first (compiling it), so the report
    also has the measured sparsity. ``str(report)`` is a table; ``report.sites`` the entries.
    """
    if args or kwargs:
        obj(*args, **kwargs)
    if obj is None:
        return Report(list(_GRAPHS))
    if isinstance(obj, SpargeBackend):
        return obj.report()
    codes = _codes_of(obj)
    files = {c.co_filename for c in codes}
    root = getattr(obj, "_orig_mod", obj)
    mods = {id(m) for m in root.modules()} if isinstance(root, torch.nn.Module) else None
    graphs = [g for g in _GRAPHS if g.code is not None and (
        g.code in codes or (g.code.co_name.startswith("torch_dynamo_resume_in_")
                            and g.code.co_filename in files))
        and (mods is None or g.owner is None or (g.owner() is not None and id(g.owner()) in mods))]
    return Report(graphs)


__all__ = ["SpargeBackend", "backend", "explain", "sparge_backend"]
