"""Test configuration shared by all test files.

Triton kernels run under the interpreter on machines without CUDA. The flag must be set before
any kernel is decorated, i.e. before pisces_fast's Triton modules are imported, so it is set here,
at collection time, ahead of every test module.
"""
import os

import pytest
import torch

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
