"""Combine functions for ``tl.reduce``: the kernels write ``tl.reduce(x, axis, SUM)`` instead of ``tl.sum``.

For float32/float64 tensors ``tl.sum``/``tl.max``/``tl.min`` are exactly ``tl.reduce`` with these
combine functions. Calling ``tl.reduce`` directly matters only for the Triton interpreter (CPU CI):
``tl.sum`` is itself a jitted function and every device-function call costs the interpreter ~1 ms
of re-patching, while ``tl.reduce`` with Triton's own combine functions maps straight to NumPy.
If a Triton release renames its private combine functions we define equivalent ones (correct
everywhere, only the interpreter gets slower).
"""
import triton
import triton.language as tl
from triton.language import standard as _standard


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


SUM = getattr(_standard, "_sum_combine", _add)
MAX = getattr(_standard, "_elementwise_max", _maximum)
MIN = getattr(_standard, "_elementwise_min", _minimum)
