"""Backend selection: which implementation runs an op for given tensors.

``backend="auto"`` picks Triton for CUDA tensors, the C++ extension for CPU tensors when it was
built, and the reference otherwise. The environment variable ``PISCES_FAST_BACKEND`` overrides
``"auto"`` (not an explicit choice). Asking for a backend that cannot run on the given tensors is an
error, never a silent fallback: a benchmark or test that asked for a kernel must get that kernel.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("reference", "cpp", "triton")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_error(module: str):
    """None if ``module`` imports, else the error message (cached: imports are slow)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    return None


def cpp_available() -> bool:
    return _import_error("pisces_fast._C") is None


def triton_available() -> bool:
    return _import_error("triton") is None


def _unavailable_reason(backend: str, device: torch.device):
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"backend='cpp' runs on CPU tensors only, got tensors on {device}"
        err = _import_error("pisces_fast._C")
        if err is not None:
            return (
                "backend='cpp' is not built in this install "
                f"({err}); reinstall with `pip install --no-build-isolation -e .` where a C++ compiler is present"
            )
        return None
    if backend == "triton":
        err = _import_error("triton")
        if err is not None:
            return f"backend='triton' needs the triton package ({err})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        return (
            f"backend='triton' needs CUDA tensors (got {device}); on CPU it runs only under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing pisces_fast)"
        )
    raise AssertionError(backend)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; raises ValueError if it can't run there."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}, got {type(backend).__name__}")
    if backend == "auto":
        override = os.environ.get("PISCES_FAST_BACKEND", "auto")
        if override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"PISCES_FAST_BACKEND must be one of {('auto',) + BACKENDS}, got {override!r}")
            backend = override
        elif device.type == "cuda" and _unavailable_reason("triton", device) is None:
            return "triton"
        elif device.type == "cpu" and _unavailable_reason("cpp", device) is None:
            return "cpp"
        else:
            return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(reason)
    return backend


def available_backends(device: torch.device) -> tuple:
    """The backends that can run on ``device`` in this install."""
    return tuple(b for b in BACKENDS if _unavailable_reason(b, torch.device(device)) is None)
