"""``python -m bench <name> [options]``: one command line for every benchmark and tool.

Each name maps to a module with ``add_args(parser)`` (its options) and ``run(args)`` (runs it,
writes its files under ``args.out``, returns the result dict). Every command also takes
``--out``, ``--quick`` and ``--traceback`` (:func:`bench.common.add_common_args`), except
``report``, which only reads earlier runs. ``python -m bench.<module>`` runs the same code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from bench import common as C
from bench import output as O

# name -> (module, one line for `python -m bench --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "kernels": ("bench.kernels", "kernel speed: sparge vs SDPA (cuDNN, FlashAttention) and Flex, same mask"),
    "accuracy": ("bench.accuracy", "attention error vs sparsity per mask rule (top-k, top-p, hybrid)"),
    "e2e": ("bench.e2e", 'a Wan2.1-1.3B-sized DiT stack compiled with "inductor" vs "sparge"'),
    "calibrate": ("bench.calibrate", "sc.calibrate's per-site plan vs one global (topk, topp)"),
    "distill": ("bench.distill", "distillation recovers quality at ~95% sparsity (small DiT, own data)"),
    "quality": ("bench.quality", "rules, SLA's sparse + linear, filters at 95/97%: before/after distill"),
    "models": ("bench.model_steps", "diffusers DiT-L/2, Flux, Wan2.1-1.3B: dense vs sparge step"),
    "dit": ("bench.dit", 'diffusers\' DiTTransformer2DModel through backend="sparge" vs inductor'),
    "masks": ("bench.masks", "masked models (Llama causal prefill, BERT with padding) vs inductor"),
    "all": ("bench.suite", "kernels, accuracy and e2e in one run, then report.md and summary.json"),
    "report": ("bench.report", "merge the JSON of several runs (folders) into one report"),
    "tune": ("bench.tools.tune_kernels", "GPU tool: time kernel variants and launch settings against Flex"),
    "profile": ("bench.tools.profile_kernels", "GPU tool: per-kernel profile, host cost, compiler report"),
    "headdim": ("bench.tools.headdim", "GPU tool: kernel times at head dims 64/128 and padded 72/80"),
    "lowbit": ("bench.tools.lowbit", "GPU tool: the FP8/INT8 forward's errors and times vs the bf16 kernel"),
    "linear": ("bench.tools.linear", "GPU tool: sparse + linear branch (SLA) vs the sparse kernel alone"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m bench <name> [options]      (python -m bench <name> --help: its options)",
             "", "names:"]
    lines += [f"  {name.ljust(width)}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "Every benchmark takes --out DIR (default bench-results) and --quick (tiny, CPU, seconds)."]
    return "\n".join(lines)


def parser(name: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser of command ``name`` and its module."""
    module = importlib.import_module(COMMANDS[name][0])
    p = argparse.ArgumentParser(prog=prog or f"python -m bench {name}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if getattr(module, "COMMON_ARGS", True):
        C.add_common_args(p)
    module.add_args(p)
    return p, module


def run_command(name: str, argv: list[str], prog: str | None = None) -> int:
    """Parse ``argv`` for command ``name``, run it, print its tables."""
    p, module = parser(name, prog)
    args = p.parse_args(argv)
    C.apply_common_args(args)
    result = module.run(args)
    if hasattr(module, "markdown") and isinstance(result, dict):
        O.print_sections(module.markdown(result))
    return 0


def module_main(module_name: str, argv=None) -> int:
    """``python -m bench.<module>``: the command that module implements."""
    name = next(n for n, (m, _) in COMMANDS.items() if m == module_name)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(name, argv, prog=f"python -m {module_name}")


def module_entry(module_name: str):
    """The ``main(argv=None) -> int`` of a command's module (``python -m bench.<module>``)."""
    def main(argv=None) -> int:
        return module_main(module_name, argv)
    main.__doc__ = f"python -m {module_name} [options]: the command {module_name} implements"
    return main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m bench: unknown name {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(name, rest)
