"""The Triton CPU interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels), patched.

Kernels whose loops have data-dependent bounds call ``patch_if_interpreted()`` once, where
they are defined (``unified.py``, ``decode.py``, ``layers/kernels/skinny_gemm.py``); on a GPU
it does nothing.
"""

from __future__ import annotations

import os


def patch_if_interpreted() -> None:
    """Apply the patches below when Triton runs in its interpreter (idempotent)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        patch_scalar_index()


def patch_scalar_index() -> None:
    """Let the Triton interpreter use data-dependent loop bounds under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and implements ``range(tensor)`` through
    ``int(array)``, which numpy 2.4 turned into a TypeError; ``.item()`` works on every numpy.
    Only the CPU interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels) is touched.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    if getattr(original, "__name__", "") != patch_lang_tensor.__name__:
        interpreter._patch_lang_tensor = patch_lang_tensor
