"""Build the native extension of pisces_fast (metadata and dependencies are in pyproject.toml).

The CPU kernels in ``csrc/`` compile into ``pisces_fast._C`` (a torch C++ extension, ninja + OpenMP) against the
torch that is already installed, so install with ``pip install --no-build-isolation ...``. The extension builds
the same way under every install path: a plain wheel, a PEP 660 editable install (``pip install -e``, any pip)
and the legacy ``setup.py develop``.

It is never dropped silently:
- no C++ compiler on the machine: a pure-Python package is installed and ``backend="cpp"`` reports itself
  unavailable (``python -m pisces_fast.info`` says why);
- a compiler but no importable torch at build time (pip's build isolation hides the installed torch), or a compiler
  error: the install fails with a message naming the fix. ``PISCES_FAST_NO_EXT=1`` installs without the extension
  on purpose.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.develop import develop

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "pisces_fast._C"
NO_EXT_HINT = "set PISCES_FAST_NO_EXT=1 to install without the C++ backend (every op then runs on the reference path)"


def _compile_flags() -> list[str]:
    # No -std flag: BuildExtension picks the standard this torch's headers need (C++20 for 2.13).
    # -ffp-contract=fast: let the vector kernels use FMA (ISO C++ mode would otherwise forbid it);
    # -fno-math-errno: lets sqrt vectorize (the kernels never read errno).
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if os.environ.get("PISCES_FAST_PORTABLE") != "1":
        flags.append("-march=native")
    return flags


class TorchMissingBuildExt(build_ext):
    """A compiler exists but torch is not importable here: fail loudly instead of installing without `_C`."""

    def run(self):
        raise SystemExit(
            "pisces_fast: cannot build the C++ backend: torch is not importable in the build environment "
            f"({sys.executable}). This happens under pip's build isolation: install torch first, then run "
            "`pip install --no-build-isolation ...`; or " + NO_EXT_HINT + ".")


def native_extensions():
    """Return (ext_modules, cmdclass) for the C++ CPU backend."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("PISCES_FAST_NO_EXT") == "1" or not sources:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("pisces_fast: no C++ compiler found; installing without the C++ backend", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # Declared anyway so that building it (and only building it; metadata and sdists work) fails loudly.
        return [Extension(EXT_NAME, sources=sources)], {"build_ext": TorchMissingBuildExt}

    class LoudBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - re-raised with the way out
                raise SystemExit(f"pisces_fast: the C++ backend failed to compile ({exc}); fix the compiler error "
                                 f"above, or {NO_EXT_HINT}.") from exc

    ext = CppExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=_compile_flags(),
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": LoudBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


class DevelopWithoutIsolation(develop):
    """`setup.py develop` on setuptools >= 80 re-runs `pip install -e .` with build isolation, where torch cannot be
    imported. Run that pip without isolation so the legacy path builds `_C` against the installed torch too."""

    def run(self):
        if hasattr(develop, "install_for_development"):  # setuptools < 80: the real develop, builds in place
            return super().run()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "-e", HERE]
        if getattr(self, "no_deps", False):
            cmd.append("--no-deps")
        if getattr(self, "user", False):
            cmd.append("--user")
        if getattr(self, "prefix", None):
            cmd += ["--prefix", self.prefix]
        subprocess.check_call(cmd)


ext_modules, cmdclass = native_extensions()
cmdclass["develop"] = DevelopWithoutIsolation

setup(ext_modules=ext_modules, cmdclass=cmdclass, zip_safe=False)
