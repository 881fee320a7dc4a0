"""Triton kernels of the stem backends. Importing this package imports triton: only import it
lazily, from code that has already checked that triton is installed."""

from __future__ import annotations

_PATCHED = False


def interpreter_compat() -> None:
    """Make Triton's CPU interpreter (TRITON_INTERPRET=1) accept data-dependent loop bounds.

    Under the interpreter every scalar is a 1-element numpy array and ``range(0, n)`` calls
    ``int(array)``, which numpy >= 2.4 refuses for 1-D arrays ("only 0-dimensional arrays can be
    converted to Python scalars"; seen with triton 3.6 + numpy 2.4). We wrap the interpreter's
    tensor patching so that ``__index__`` reads the single element. No effect on compiled kernels;
    applied only when the interpreter is on.
    """
    global _PATCHED
    if _PATCHED:
        return
    from triton import knobs

    if not knobs.runtime.interpret:
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    _PATCHED = True
