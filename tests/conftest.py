"""Test configuration and fixtures shared by all test files.

Triton kernels run under the interpreter on machines without CUDA. The flag must be set before
any kernel is decorated, i.e. before pisces_fast's Triton modules are imported, so it is set here,
at collection time, ahead of every test module.

Shared fixtures: `one_thread` (tiny models are latency-bound: a second intra-op thread only adds sync cost,
10x on a busy 2-core machine; use it with `pytestmark = pytest.mark.usefixtures("one_thread")`),
`repo_root`, `run_train` (train.py in a subprocess) and `tiny_config` (a validated tiny config in tmp_path).
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws fresh but reproducible random inputs."""
    torch.manual_seed(1234)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")
    config.addinivalue_line("markers", "distributed: launches several processes (deepspeed/torchrun)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards so other tests are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def repo_root() -> str:
    return ROOT


@pytest.fixture(scope="session")
def load_repo_module():
    """`load_repo_module("scripts/pretrain_world_vlm.py")`: a script or benchmark of the repository (not a package)
    imported as a module, without running its main()."""
    import importlib.util

    def load(relative_path: str):
        path = os.path.join(ROOT, relative_path)
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def run_train():
    """`run_train(args, env_extra=None, timeout=300)`: `python train.py ARGS` from the repository root, one thread
    per process, output captured (a CompletedProcess)."""

    def run(args, env_extra=None, timeout=300):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
        return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(mode="cd", **overrides)`: configs/tiny_{mode}.yaml as one plain-torch process writing into
    tmp_path/mode, tiny sizes, no validation / export / periodic checkpoints unless overridden (a section given
    as a dict is merged into the defaults here)."""
    from pisces_fast.training.config import load_config

    def make(mode="cd", **over):
        base = {"deepspeed": None, "output_dir": str(tmp_path / mode), "checkpoint_every": 0, "export_lora": False,
                "validation": {"every": 0}}
        for k, v in over.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return load_config(os.path.join(ROOT, "configs", f"tiny_{mode}.yaml"), base)

    return make
