"""Run-time compilation of the CUDA C++ kernels in this folder (NVRTC) and their launch (CUDA driver API).

Why NVRTC and not an nvcc-built extension: CUDA builds of PyTorch ship the NVRTC library (that is how
PyTorch's own jiterator compiles), so a user with ``pip install torch`` has everything needed, with no
CUDA toolkit, no compiler and no build step; the kernel is compiled for the GPU it runs on (``sm_90a`` on
Hopper), once per process and configuration. Both libraries are reached through ``ctypes``: NVRTC found
as below, the driver as ``libcuda.so.1`` (present wherever a CUDA GPU is). On a machine without a GPU the
compiler alone still works (``compile_cubin``): that is how the tests check the kernels build, and with
which registers and spills, for sm_80 and sm_90a.

Compiled kernels are cached on disk (``$PISCES_FAST_CACHE_DIR`` or ``~/.cache/pisces_fast``, ``nvrtc/``), keyed by
the source text, kernel, architecture, options and NVRTC version: a new process loads the cubin instead of
compiling (about a second per row count); written atomically, so concurrent processes never read a partial file.
``PISCES_FAST_CACHE_DIR=""`` turns the disk cache off.

Where NVRTC is looked for, in order: ``PISCES_FAST_NVRTC`` (a path to the library), the copy PyTorch
loads, ``libnvrtc.so.<major>`` on the loader's path, then ``nvidia/*/lib`` of every ``sys.path`` entry
(the ``nvidia-cuda-nvrtc`` wheels). ``nvrtc_library()`` raises ``NvrtcUnavailable`` saying what it tried.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import json
import os
import sys
import tempfile
import threading
from typing import Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library could be loaded (the message lists what was tried)."""


def _candidates() -> list:
    out = []
    env = os.environ.get("PISCES_FAST_NVRTC")
    if env:
        out.append(env)
    majors = []
    if torch.version.cuda:
        majors.append(torch.version.cuda.split(".")[0])
    majors += [m for m in ("13", "12") if m not in majors]
    out += [f"libnvrtc.so.{m}" for m in majors] + ["libnvrtc.so"]
    for base in sys.path:
        for pattern in ("nvidia/cuda_nvrtc/lib/libnvrtc.so*", "nvidia/cu*/lib/libnvrtc.so*"):
            out += sorted(p for p in glob.glob(os.path.join(base, pattern)) if "builtins" not in p and ".alt." not in p)
    return out


@functools.lru_cache(maxsize=None)
def nvrtc_library() -> ctypes.CDLL:
    """The NVRTC shared library (cached)."""
    errors = []
    if torch.version.cuda and not os.environ.get("PISCES_FAST_NVRTC"):
        try:  # the copy PyTorch itself uses (private helper: tried, never required)
            from torch.cuda._utils import _get_gpu_rtc_library

            return _get_gpu_rtc_library()
        except Exception as exc:  # noqa: BLE001 - fall through to the explicit search
            errors.append(f"torch's NVRTC: {exc}")
    for name in _candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise NvrtcUnavailable("no NVRTC library found (install a CUDA build of torch, or the nvidia-cuda-nvrtc wheel, "
                           "or set PISCES_FAST_NVRTC to the library's path); tried: " + "; ".join(errors))


def nvrtc_version() -> tuple:
    lib = nvrtc_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check_nvrtc(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


def _check_nvrtc(lib, code: int, what: str = "NVRTC call") -> None:
    if code != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what} failed: {lib.nvrtcGetErrorString(code).decode()}")


def read_source(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def cache_dir() -> Optional[str]:
    """The on-disk cubin cache (None: off)."""
    root = os.environ.get("PISCES_FAST_CACHE_DIR")
    if root is None:
        root = os.path.join(os.path.expanduser("~"), ".cache", "pisces_fast")
    return os.path.join(root, "nvrtc") if root else None


def _options(arch: str, extra_options: Sequence[str]) -> list:
    return [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v", *extra_options]


def _cache_paths(source: bytes, kernel: str, options: Sequence[str]) -> Optional[tuple]:
    root = cache_dir()
    if root is None:
        return None
    key = hashlib.sha256(json.dumps([source.decode(), kernel, list(options), nvrtc_version()]).encode()).hexdigest()
    base = os.path.join(root, key[:32])
    return base + ".cubin", base + ".json"


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def compile_cubin(source_name: str, kernel: str, arch: str, extra_options: Sequence[str] = ()) -> tuple:
    """Compile ``kernel`` (a name expression, e.g. ``pisces::sinkhorn_onchip<40, 256, false>``) of the source
    file ``source_name`` for ``arch`` (``"sm_90a"``, ``"sm_80"``, ...). Returns (cubin bytes, lowered name,
    compiler log). Compiler errors raise RuntimeError with the log. Cached per process and on disk
    (``cache_dir``; a cache entry that cannot be read is recompiled and rewritten)."""
    src = read_source(source_name).encode()
    options = _options(arch, extra_options)
    paths = _cache_paths(src, kernel, options)
    if paths is not None:
        try:
            with open(paths[1], encoding="utf-8") as f:
                meta = json.load(f)
            with open(paths[0], "rb") as f:
                cubin = f.read()
            if len(cubin) == meta["size"] and hashlib.sha256(cubin).hexdigest() == meta["sha256"]:
                return cubin, meta["lowered"], meta["log"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    cubin, lowered, log = _compile(src, source_name, kernel, arch, options)
    if paths is not None:
        try:
            _write_atomic(paths[0], cubin)  # the cubin first: the metadata names its hash
            meta = dict(lowered=lowered, log=log, size=len(cubin), sha256=hashlib.sha256(cubin).hexdigest())
            _write_atomic(paths[1], json.dumps(meta).encode())
        except OSError:
            pass  # a read-only home is not an error: the kernel is compiled per process then
    return cubin, lowered, log


def _compile(src: bytes, source_name: str, kernel: str, arch: str, opts: Sequence[str]) -> tuple:
    lib = nvrtc_library()
    prog = ctypes.c_void_p()
    _check_nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, source_name.encode(), 0, None, None),
                 "nvrtcCreateProgram")
    try:
        _check_nvrtc(lib, lib.nvrtcAddNameExpression(prog, kernel.encode()), "nvrtcAddNameExpression")
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        log_text = log.value.decode(errors="replace")
        if res != 0:
            raise RuntimeError(f"NVRTC could not compile {kernel} for {arch}:\n{log_text}")
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = ctypes.c_char_p()
        _check_nvrtc(lib, lib.nvrtcGetLoweredName(prog, kernel.encode(), ctypes.byref(lowered)), "nvrtcGetLoweredName")
        return cubin.raw, lowered.value.decode(), log_text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# --- CUDA driver API -------------------------------------------------------------------------------------

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check_cu(code: int, what: str) -> None:
    if code != 0:
        lib = _driver()
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(code, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {code} ({msg.value.decode() if msg.value else '?'})")


@functools.lru_cache(maxsize=None)
def _primary_context(index: int) -> int:
    """The primary context of device ``index`` (the one PyTorch uses), retained for the process."""
    lib = _driver()
    _check_cu(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check_cu(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check_cu(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    return ctx.value


@contextlib.contextmanager
def _context(index: int):
    """Device ``index``'s primary context current on this thread for the block. On a thread where no context
    is current yet, or another device's is, the module load or the launch would fail with an invalid-context
    error; the context is pushed and popped again, so the runtime's current device (PyTorch's) is unchanged."""
    lib = _driver()
    primary = _primary_context(index)
    current = ctypes.c_void_p()
    _check_cu(lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    if current.value == primary:
        yield
        return
    _check_cu(lib.cuCtxPushCurrent(ctypes.c_void_p(primary)), "cuCtxPushCurrent")
    try:
        yield
    finally:
        popped = ctypes.c_void_p()
        _check_cu(lib.cuCtxPopCurrent(ctypes.byref(popped)), "cuCtxPopCurrent")


def device_arch(device: torch.device) -> str:
    """NVRTC's target for ``device``: ``sm_90a`` on Hopper (its own instructions), else ``sm_<major><minor>``."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{'a' if (major, minor) == (9, 0) else ''}"


class Kernel:
    """A compiled kernel loaded into the current CUDA context of one device."""

    def __init__(self, cubin: bytes, lowered: str, device: torch.device):
        lib = _driver()
        torch.cuda.current_stream(device)  # initialises PyTorch's CUDA state for the device
        with _context(device.index):
            self.module = ctypes.c_void_p()
            _check_cu(lib.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            self.function = ctypes.c_void_p()
            _check_cu(lib.cuModuleGetFunction(ctypes.byref(self.function), self.module, lowered.encode()),
                      "cuModuleGetFunction")
        self.device = device
        self.shared_limit = 0
        self._lock = threading.Lock()

    def launch(self, grid: int, block: int, shared_bytes: int, args: Sequence, stream: Optional[int] = None) -> None:
        """Launch on ``stream`` (default: PyTorch's current stream of the device). ``args``: ctypes values in the
        kernel's parameter order (tensors as ``ctypes.c_void_p(t.data_ptr())``)."""
        lib = _driver()
        if stream is None:
            stream = torch.cuda.current_stream(self.device).cuda_stream
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        with _context(self.device.index):
            with self._lock:
                if shared_bytes > self.shared_limit:
                    _check_cu(lib.cuFuncSetAttribute(self.function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                     shared_bytes), "cuFuncSetAttribute(max dynamic shared memory)")
                    self.shared_limit = shared_bytes
            _check_cu(lib.cuLaunchKernel(self.function, grid, 1, 1, block, 1, 1, shared_bytes,
                                         ctypes.c_void_p(stream), ptrs, None), "cuLaunchKernel")


_KERNELS: dict = {}


def load_kernel(source_name: str, kernel: str, device: torch.device) -> Kernel:
    """``kernel`` of ``source_name`` compiled for ``device`` and loaded there (cached per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (source_name, kernel, index)
    cached = _KERNELS.get(key)
    if cached is None:
        dev = torch.device("cuda", index)
        cubin, lowered, _ = compile_cubin(source_name, kernel, device_arch(dev))
        cached = _KERNELS[key] = Kernel(cubin, lowered, dev)
    return cached
