"""The torch.compile backend "sparge": rewrite every attention it can prove plain to the sparse op.

    model = torch.compile(model, backend="sparge", options={"topk": 0.05, "min_seq_len": 0})
    be = sparge_compile.backend(config=SpargeConfig(...), inner="aot_eager")   # advanced use
    model = torch.compile(model, backend=be); be.set_config(topk=0.1)         # no recompile
    print(sparge_compile.explain(model, x))   # runs model(x) first: compilation is lazy

The pass runs on Dynamo's FX graph, before AOTAutograd, so training traces the sparse op's own
autograd formula; the rewritten graph then goes to Inductor (or ``aot_eager``/``eager``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import weakref

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .config import DEFAULT_CONFIG, SpargeConfig
from .passes import sparsify_graph
from .passes.report import GraphReport, Report, log_graph_report
from .passes.shield import shield_softmax_axes
from .plan import resolve_plan
from .validate import check_flag

log = logging.getLogger("sparge_compile.backend")

INNERS = ("inductor", "aot_eager", "eager")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SpargeConfig))
EXTRA_OPTIONS = ("inner", "plan", "inductor", "record_masks")
RUNTIME_FIELDS = ("topk", "topp", "mode", "theta")   # change without a recompile (read by the mask op)

_LIVE: "weakref.WeakSet[SpargeBackend]" = weakref.WeakSet()   # every backend object alive (explain)
_LOCK = threading.Lock()
_COUNT = [0]
_SERIAL = itertools.count()   # graphs in compile order, across backends


def _current_code():
    """The code object of the frame Dynamo is compiling (names sites after a graph break)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return None if tx is None else tx.f_code
    except Exception:
        return None


def _graph_name() -> str:
    try:
        cid = torch._guards.CompileContext.current_compile_id()
        if cid is not None:
            return str(cid)
    except Exception:
        pass
    with _LOCK:
        _COUNT[0] += 1
        return f"g{_COUNT[0]}"


def _parameters(gm: torch.fx.GraphModule, example_inputs):
    """(the graph's parameters, the first placeholder that holds one, that parameter): which model
    a graph belongs to. Dynamo lifts parameters to inputs (or keeps them as attributes of ``gm``)."""
    params = [p for p in gm.parameters()]
    owner = owner_param = None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.nn.Parameter):
            params.append(x)
            if owner is None and not is_traceable_wrapper_subclass(x):   # a torchao weight: not an owner
                owner, owner_param = node, x
    return [weakref.ref(p) for p in params], owner, owner_param


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
    plan = resolve_plan(options["plan"]) if "plan" in options else plan
    extra = options.get("inductor")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(k, str) for k in extra)):
        raise TypeError(f"sparge: option 'inductor' must be a dict of Inductor config patches "
                        f"(name -> value), got {type(extra).__name__}")
    if "record_masks" in options:
        check_flag("sparge option 'record_masks'", options["record_masks"])
    inductor_opts = dict(inductor_opts or {}, **(extra or {}))
    return config, inner, plan, inductor_opts


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
            the path of a saved one), or per-site decisions: a dict ``{site id:
            SpargeConfig | dict of fields | "dense" | None}`` (key "*" for the rest) or a
            callable ``plan(site_report) -> SpargeConfig | None``.
    record_masks: keep each site's last mask for the report's measured sparsity (default). Set
            False under CUDA graphs (``mode="reduce-overhead"``): their memory pool may hold no
            untracked tensors. Note that CUDA graphs also freeze topk/topp/mode at capture time:
            :meth:`set_config` then needs a new capture (``torch._dynamo.reset()`` and a new call).

    The backend owns what it collects (the reports, each rewritten site's run-time state and
    last mask): they are released with the backend, or by :meth:`reset` (which
    ``torch._dynamo.reset()`` calls, dropping the compiled code too).
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
        self.plan = resolve_plan(plan)
        self.inductor_options: dict = {}
        self.graphs: list[GraphReport] = []
        self.capture = False   # calibrate(): sites become the dense capture op; see capturing()
        self._hook = None
        self.__name__ = "sparge"
        _LIVE.add(self)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None,
                 **kwargs):
        opts = dict(options or {}, **kwargs)
        config, inner, plan, ind = _apply_options(self.config, self.inner, self.plan, self.inductor_options,
                                                  opts)
        name, code = _graph_name(), _current_code()
        params, owner, owner_param = _parameters(gm, example_inputs)
        gr = sparsify_graph(gm, config, plan, graph_name=name, code=code, capture=self.capture, owner=owner,
                            owner_param=owner_param)
        gr.code, gr.params, gr.serial = code, params, next(_SERIAL)
        gr.inner = inner if isinstance(inner, str) else getattr(inner, "__name__", "custom")
        record = bool(opts.get("record_masks", self.record_masks))
        for s in gr.sites:
            if s.state is not None:
                s.state.record, s.state.hook = record, self._hook
        with _LOCK:
            self.graphs.append(gr)
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
        state["graphs"], state["_hook"] = [], None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        _LIVE.add(self)

    def _states(self):
        return [s.state for g in self.graphs for s in g.sites if s.state is not None]

    def set_config(self, **changes) -> None:
        """Change topk / topp / mode / theta of every site this backend rewrote, at run time, no recompile.

        Block sizes and min_seq_len shape the compiled graph: change them by compiling again.
        """
        bad = sorted(set(changes) - set(RUNTIME_FIELDS))
        if bad:
            raise ValueError(f"sparge: {bad} cannot change at run time (only {list(RUNTIME_FIELDS)}); "
                             "compile again with a new config")
        fixed = sorted({"mode", "theta"} & set(changes))
        if fixed and any(st.native for st in self._states()):
            raise ValueError(f"sparge: {fixed} are fixed at compile time in sites that launch from "
                             "Inductor's code (CUDA); compile again, or set SPARGE_NATIVE=0 before compiling")
        self.config = self.config.replace(**changes)
        for st in self._states():
            st.config = st.config.replace(**changes)
            if st.knobs is not None:
                from .kernels.mask import pack_knobs

                pack_knobs(st.config.topk, st.config.topp, st.counter, out=st.knobs)
            if st.per_owner is not None:
                st.per_owner.replace(**changes)

    @contextlib.contextmanager
    def capturing(self, fn):
        """Within: this backend's capture sites call ``fn(site_key, q, k, v, scale, is_causal)``,
        which returns the attention output (or None for plain dense attention)."""
        prev, self._hook = self._hook, fn
        for st in self._states():
            st.hook = fn
        try:
            yield self
        finally:
            self._hook = prev
            for st in self._states():
                st.hook = prev

    def report(self) -> Report:
        return Report(self.graphs)

    def reset(self):
        """Forget this backend's reports and site states (``torch._dynamo.reset()`` calls it, and
        drops the compiled code with them); code compiled before and still run raises."""
        self.graphs.clear()


_DEFAULT = SpargeBackend()   # the backend behind backend="sparge"


def backend(config: SpargeConfig | None = None, inner="inductor", plan=None,
            record_masks: bool = True) -> SpargeBackend:
    """A sparge backend callable for ``torch.compile(model, backend=...)`` (see :class:`SpargeBackend`)."""
    return SpargeBackend(config=config, inner=inner, plan=plan, record_masks=record_masks)


def sparge_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None,
                   **kwargs):
    """The ``backend="sparge"`` entry point: ``options`` are SpargeConfig fields plus ``inner``,
    ``plan``, ``inductor`` (Inductor config patches) and ``record_masks``; unknown keys raise."""
    return _DEFAULT(gm, example_inputs, options=options, mode=mode, **kwargs)


sparge_backend.reset = _DEFAULT.reset   # torch._dynamo.reset() calls it


def _codes_of(obj) -> set:
    codes = set()
    fn = getattr(obj, "_torchdynamo_orig_callable", None)
    if fn is not None and not isinstance(obj, torch.nn.Module):
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


def _by_code(graphs, obj) -> list:
    """Graphs whose compiled code is ``obj``'s (or a resume function in the same file)."""
    codes = _codes_of(obj)
    files = {c.co_filename for c in codes}
    return [g for g in graphs if g.code is not None and (
        g.code in codes or (g.code.co_name.startswith("torch_dynamo_resume_in_")
                            and g.code.co_filename in files))]


def _runs(g: GraphReport, ids: set, ptrs: set) -> bool:
    """The graph was compiled from these parameters, or a model holding them ran it."""
    return (any(id(r()) in ids for r in g.params if r() is not None)
            or any(st.tags & ptrs for st in (s.state for s in g.sites) if st is not None))


def _of_module(graphs, root: torch.nn.Module) -> list:
    params = list(root.parameters())
    if not params:
        return _by_code(graphs, root)
    ids, ptrs = {id(p) for p in params}, {p.data_ptr() for p in params}
    paramless = {id(g) for g in _by_code([g for g in graphs if not g.params], root)}
    return [g for g in graphs if _runs(g, ids, ptrs) or id(g) in paramless]


def explain(obj=None, *args, **kwargs) -> Report:
    """The report of every attention site the sparge backend found.

    obj: a model or function returned by ``torch.compile(..., backend="sparge")`` (the graphs it
    runs: those compiled from its parameters or run with them, and parameter-free graphs of its
    code), a :class:`SpargeBackend` (the graphs it compiled), or None (every live backend's).
    args/kwargs: if given, ``obj(*args, **kwargs)`` is run first (compiling it), so the report
    also has the measured sparsity. ``str(report)`` is a table; ``report.sites`` the entries.
    """
    if args or kwargs:
        obj(*args, **kwargs)
    if isinstance(obj, SpargeBackend):
        return obj.report()
    graphs = sorted((g for be in list(_LIVE) if not be.capture for g in be.graphs), key=lambda g: g.serial)
    if obj is None:
        return Report(graphs)
    root = getattr(obj, "_orig_mod", obj)
    if isinstance(root, torch.nn.Module):
        return Report(_of_module(graphs, root))
    return Report(_by_code(graphs, obj))


__all__ = ["SpargeBackend", "backend", "explain", "sparge_backend"]
