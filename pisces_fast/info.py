"""What this install of pisces_fast has: versions, the native extension, and which backends run where (and why not).

    python -m pisces_fast.info            # human-readable
    python -m pisces_fast.info --json     # the same as JSON

Attach its output to bug reports. It imports only torch and pisces_fast.ops (package versions are read from the
installed metadata, not by importing them).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Optional

# Distributions reported (import name differs for some: metadata is looked up by distribution name).
OPTIONAL = ("numpy", "triton", "diffusers", "transformers", "peft", "deepspeed", "safetensors", "pyyaml", "tqdm", "av",
            "imageio", "matplotlib", "scipy", "pot", "ninja", "pybind11", "setuptools", "pytest")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return path
    return f"{path}: {out.splitlines()[0]}" if out else path


def _nvrtc() -> str:
    """NVRTC, which compiles the on-chip CUDA Sinkhorn (pisces_fast/ops/cuda) at run time: its version, or why not."""
    from pisces_fast.ops.cuda import nvrtc

    try:
        major, minor = nvrtc.nvrtc_version()
    except (nvrtc.NvrtcUnavailable, RuntimeError, OSError, AttributeError) as exc:
        return f"unavailable: {exc}"
    return f"{major}.{minor} (on-chip CUDA Sinkhorn: backend='triton', 16-bit kernel storage, CUDA devices)"


def collect() -> dict:
    import torch

    import pisces_fast
    from pisces_fast.ops import backends

    spec = importlib.util.find_spec("pisces_fast._C")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "pisces_fast": {"version": pisces_fast.__version__, "location": os.path.dirname(os.path.abspath(pisces_fast.__file__))},
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "threads": torch.get_num_threads(), "openmp": torch.backends.openmp.is_available()},
        "native_extension": spec.origin if spec is not None else None,
        "nvrtc": _nvrtc(),
        "cxx_compiler": _compiler(),
        "packages": {name: _version(name) for name in OPTIONAL},
        "env": {k: os.environ[k] for k in ("PISCES_FAST_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS") if k in os.environ},
        # None = the backend runs on that device; otherwise why not, with the fix.
        "backends": {dev: backends.backend_report(dev) for dev in devices},
    }


def format_report(info: dict) -> str:
    t = info["torch"]
    lines = [
        f"pisces_fast {info['pisces_fast']['version']}  ({info['pisces_fast']['location']})",
        f"python      {info['python']}",
        f"platform    {info['platform']}",
        f"torch       {t['version']}  cuda={t['cuda']} available={t['cuda_available']} {', '.join(t['devices'])}".rstrip()
        + f"  threads={t['threads']} openmp={t['openmp']}",
        f"_C          {info['native_extension'] or 'not built'}",
        f"compiler    {info['cxx_compiler'] or 'none on PATH'}",
        f"nvrtc       {info['nvrtc']}",
        "packages    " + ", ".join(f"{k} {v}" if v else f"{k} -" for k, v in info["packages"].items()),
    ]
    if info["env"]:
        lines.append("env         " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    for dev, report in info["backends"].items():
        lines.append(f"backends on {dev}:")
        for name, reason in report.items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pisces_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
