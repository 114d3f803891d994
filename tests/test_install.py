"""Packaging: lean core dependencies, the kernels import without the training stack, the native extension is built
(or the install fails loudly) on every install path, and `python -m pisces_fast.info` explains the backends."""
import json
import os
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a kernel user must not need: the training / rewards / benchmark stacks and the build tools.
HEAVY = ("diffusers", "transformers", "peft", "deepspeed", "safetensors", "yaml", "tqdm", "imageio", "av", "matplotlib",
         "scipy", "ot", "pybind11", "ninja", "packaging", "triton", "accelerate", "huggingface_hub")


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def names(requirements):
    import re

    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_are_torch_and_numpy_only():
    meta = pyproject()
    assert names(meta["project"]["dependencies"]) == {"torch", "numpy"}
    extras = meta["project"]["optional-dependencies"]
    assert {"diffusers", "transformers", "peft", "deepspeed", "safetensors", "pyyaml", "tqdm", "imageio", "av",
            "matplotlib"} <= names(extras["training"])
    assert {"transformers", "safetensors"} <= names(extras["rewards"])
    assert {"scipy", "pot", "matplotlib"} <= names(extras["bench"])
    assert "pytest" in names(extras["test"])
    assert extras["all"] == ["pisces_fast[rewards,training,bench,test]"]
    for extra in extras.values():  # build tools are build requirements only
        assert not names(extra) & {"pybind11", "ninja"}
    build = meta["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"  # pip takes PEP 517/660, never `setup.py develop`
    assert {"setuptools", "wheel", "ninja", "pybind11"} <= names(build["requires"])


def test_readme_installs_everything():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert 'pip install --no-build-isolation -e ".[all]"' in readme


def test_kernels_import_and_run_without_the_heavy_dependencies():
    script = textwrap.dedent(f"""
        import sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # any import of it raises ImportError
        import torch
        import pisces_fast
        from pisces_fast import ot_attention, sinkhorn_unbalanced, video_token_positions, OTAttention
        from pisces_fast.ops import backends
        plan = sinkhorn_unbalanced(torch.rand(2, 5, 7), eps=0.1, mass=0.9, max_iter=20, tol=0, backend="reference")
        assert plan.shape == (2, 5, 7) and bool(torch.isfinite(plan).all())
        frame_idx, coords = video_token_positions(2, 2, 2, prefix_tokens=1)
        q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
        out = ot_attention(q, k, v, frame_idx, coords, backend="reference")
        assert out.shape == (1, 2, 3, 8)
        from pisces_fast import info
        info.main([])
        heavy = sorted(m for m in {HEAVY!r} if sys.modules.get(m) is not None)
        assert not heavy, heavy
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-3000:]
    assert "backends on cpu:" in r.stdout


def test_rewards_import_with_only_the_rewards_extra():
    extra = names(pyproject()["project"]["optional-dependencies"]["rewards"]) | {"yaml"}
    blocked = [m for m in HEAVY if m not in extra]
    script = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
              "import pisces_fast.rewards, pisces_fast.rewards.ot_map\nprint('OK')")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_info_reports_versions_and_why_each_backend_is_unavailable():
    r = subprocess.run([sys.executable, "-m", "pisces_fast.info", "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    import torch

    import pisces_fast
    from pisces_fast.ops.backends import backend_report

    assert info["pisces_fast"]["version"] == pisces_fast.__version__ and info["torch"]["version"] == torch.__version__
    cpu = info["backends"]["cpu"]
    assert set(cpu) == {"reference", "cpp", "triton"} and cpu["reference"] is None
    assert cpu["triton"] and "TRITON_INTERPRET=1" in cpu["triton"]  # unavailable, and the reason names the way out
    assert (cpu["cpp"] is None) == (info["native_extension"] is not None)
    assert cpu["cpp"] == backend_report("cpu")["cpp"]


# ----------------------------------------------------------------------------------------------------------
# setup.py: the extension is built on every path, or the install fails naming the fix


def run_setup_probe(body: str, env_extra=None):
    """Import setup.py with `setuptools.setup` captured, then run `body` (ext_modules / cmdclass in scope)."""
    script = textwrap.dedent("""
        import sys, setuptools
        captured = {}
        setuptools.setup = lambda **kw: captured.update(kw)
        BLOCK
        sys.argv = ["setup.py"]
        ns = {"__file__": "setup.py", "__name__": "setup_probe"}
        exec(compile(open("setup.py").read(), "setup.py", "exec"), ns)
        ext_modules, cmdclass = captured.get("ext_modules", []), captured.get("cmdclass", {})
    """).replace("BLOCK", (env_extra or {}).pop("block", "")) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env_extra or {})})


@pytest.mark.skipif(not any(os.access(os.path.join(p, "c++"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="no C++ compiler: a pure-Python install is the documented outcome")
def test_setup_declares_the_extension_and_fails_loudly_without_torch():
    r = run_setup_probe("""
        assert [e.name for e in ext_modules] == ["pisces_fast._C"], ext_modules
        from torch.utils.cpp_extension import BuildExtension
        assert issubclass(cmdclass["build_ext"], BuildExtension)
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    # Under pip's build isolation torch is not importable: building must fail with the fix, not drop `_C`.
    r = run_setup_probe("""
        assert [e.name for e in ext_modules] == ["pisces_fast._C"], ext_modules
        from setuptools.dist import Distribution
        cmd = cmdclass["build_ext"](Distribution({"ext_modules": ext_modules}))
        cmd.run()
    """, {"block": "sys.modules['torch'] = None"})
    assert r.returncode != 0
    assert "torch is not importable" in r.stderr and "--no-build-isolation" in r.stderr and "PISCES_FAST_NO_EXT=1" in r.stderr


def test_legacy_develop_keeps_the_installed_torch_visible():
    """setuptools >= 80 turns `setup.py develop` into `pip install -e .` with build isolation, where torch is not
    importable (the extension was silently dropped): ours runs that pip without isolation."""
    r = run_setup_probe("""
        import subprocess
        calls = []
        subprocess.check_call = lambda cmd, *a, **k: calls.append(cmd)
        from setuptools.dist import Distribution
        from setuptools.command.develop import develop as stock
        cmd = cmdclass["develop"](Distribution())
        cmd.initialize_options(); cmd.finalize_options()
        if hasattr(stock, "install_for_development"):
            print("OLD-SETUPTOOLS")  # the real develop: builds in place with the installed torch
        else:
            cmd.run()
            assert len(calls) == 1 and "--no-build-isolation" in calls[0] and "-e" in calls[0], calls
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
