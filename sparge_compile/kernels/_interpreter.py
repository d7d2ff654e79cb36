"""Speed shim for Triton's CPU interpreter (TRITON_INTERPRET=1; tests and CI only).

The interpreter re-patches the whole of ``triton.language`` on every call of a device
function (``tl.sum``, ``tl.max``, ``tl.cumsum`` ... are ``@triton.jit`` functions), about
2-3 ms each time; a kernel with a bisection loop makes hundreds of such calls per program.
The launch (``GridExecutor``) already patches ``triton.language`` for the whole run of the
grid, and the per-call patches of ``triton.language.core`` are never undone, so after a
device function's first call its next calls need no patch. This shim patches once per
device function. Numerics are unchanged; it is installed only
when the interpreter is on, and silently does nothing on Triton versions without this layout.
"""
from __future__ import annotations

import os

_installed = False


def install() -> None:
    global _installed
    if _installed or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    _installed = True
    try:
        from triton.runtime import interpreter as _i
    except Exception:  # pragma: no cover
        return
    cls = getattr(_i, "InterpretedFunction", None)
    if cls is None or not hasattr(cls, "rewrite"):
        return

    patched = set()

    def __call__(self, *args, **kwargs):  # a device-function call inside a running grid
        if self.fn not in patched:
            _i._patch_lang(self.fn)
            patched.add(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _i.InterpreterError(repr(e)) from e

    cls.__call__ = __call__
