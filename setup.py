"""Build and install pisces_fast.

The CPU kernels in ``csrc/`` are compiled into ``pisces_fast._C`` (a torch C++ extension, built
with ninja and OpenMP) when torch and a C++ compiler are present at build time. When they are not,
or the build fails, a pure-Python package is installed and ``backend="cpp"`` reports itself as
unavailable; every op still runs on the reference path.

Install with ``pip install --no-build-isolation -e .`` so the build sees the torch you already have
(build isolation would fetch a second, multi-GB torch just to compile against).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    """Return (ext_modules, cmdclass) for the C++ CPU backend, or ([], {}) when it can't be built."""
    if os.environ.get("PISCES_FAST_NO_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("pisces_fast: torch not importable at build time; installing without the C++ backend", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("pisces_fast: no C++ compiler found; installing without the C++ backend", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed native build must not fail the install: the reference path still works."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "no native backend"
                print(f"pisces_fast: C++ backend build failed ({exc}); installing without it", file=sys.stderr)

    # No -std flag: BuildExtension picks the standard this torch's headers need (C++20 for 2.13).
    # -ffp-contract=fast: let the vector kernels use FMA (ISO C++ mode would otherwise forbid it);
    # -fno-math-errno: lets sqrt vectorize (the kernels never read errno).
    extra = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if os.environ.get("PISCES_FAST_PORTABLE") != "1":
        extra.append("-march=native")
    ext = CppExtension(
        name="pisces_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="pisces_fast",
    version="0.1.0",
    description="Kernel-accelerated OT-aligned reward post-training (PISCES) and DF-DPO for text-to-video diffusion",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pisces_fast", "pisces_fast.*"]),
    package_data={"pisces_fast": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "numpy>=1.24",
        "packaging>=23.0",
        "diffusers>=0.32",
        "transformers>=4.46",
        "peft>=0.13",
        "deepspeed>=0.15",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "imageio>=2.31",
        "av>=12.0",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "pybind11>=2.12",
        "ninja>=1.11",
    ],
    extras_require={
        # Triton ships inside CUDA torch wheels; on CPU machines it is only needed for the interpreter tests.
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8.0", "pot>=0.9.4", "triton>=3.0"],
        "flash": ["flash-attn>=2.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
