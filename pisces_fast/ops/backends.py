"""Backend selection: which implementation runs an op for given tensors.

``backend="auto"`` picks Triton for CUDA tensors, the C++ extension for CPU tensors when it was
built, and the reference otherwise. The environment variable ``PISCES_FAST_BACKEND`` overrides
``"auto"`` (not an explicit choice). Asking for a backend that cannot run on the given tensors is an
error, never a silent fallback: a benchmark or test that asked for a kernel must get that kernel.

``auto`` on CPU falls back to the reference when the C++ extension is missing; where it was
expected (a C++ compiler is on PATH, or this is a source checkout with ``csrc/``), the first such
dispatch warns once, naming the fix. :func:`backend_report` says, per backend, why it is unavailable.
"""
from __future__ import annotations

import importlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch

BACKENDS = ("reference", "cpp", "triton")
CPP_FIX = "pip install --no-build-isolation -e ."
_CPP_MISSING_WARNED = False


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_IMPORT_ERRORS: Dict[str, Optional[str]] = {}


def _import_error(module: str) -> Optional[str]:
    """None if ``module`` imports, else the error message (cached in a plain dict: imports are slow,
    and a dict lookup traces under ``torch.compile``)."""
    if module not in _IMPORT_ERRORS:
        try:
            importlib.import_module(module)
            _IMPORT_ERRORS[module] = None
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            _IMPORT_ERRORS[module] = f"{type(exc).__name__}: {exc}"
    return _IMPORT_ERRORS[module]


def cpp_expected() -> bool:
    """Whether this install should have the C++ backend: a C++ compiler is on PATH, or the package
    runs from a source checkout (``csrc/`` beside it), where the build would have produced it."""
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if any(c and shutil.which(c) for c in compilers):
        return True
    return (Path(__file__).resolve().parents[2] / "csrc").is_dir()


def _warn_cpp_missing_once() -> None:
    global _CPP_MISSING_WARNED
    if _CPP_MISSING_WARNED or torch.compiler.is_compiling():
        return
    _CPP_MISSING_WARNED = True
    if not cpp_expected():
        return
    warnings.warn(
        "pisces_fast: backend='auto' on CPU runs the PyTorch reference (~50x slower) because the C++ "
        f"extension pisces_fast._C is missing ({_import_error('pisces_fast._C')}); a C++ compiler is "
        f"available, so rebuild it with `{CPP_FIX}` (see `python -m pisces_fast.info`)",
        RuntimeWarning,
        stacklevel=4,
    )


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
                f"({err}); reinstall with `{CPP_FIX}` where a C++ compiler is present"
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
            if device.type == "cpu":
                _warn_cpp_missing_once()
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


def backend_report(device="cpu") -> Dict[str, Optional[str]]:
    """Per backend: None if it can run on ``device`` in this install, else the reason (with the fix)."""
    device = torch.device(device)
    return {b: _unavailable_reason(b, device) for b in BACKENDS}
