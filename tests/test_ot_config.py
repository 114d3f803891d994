"""OTConfig (the one OT configuration type), the valid input domain, value-check policy and the backend report."""
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from pisces_fast.ops import (
    OTAttention,
    OTConfig,
    available_backends,
    backend_report,
    ot_attention,
    sinkhorn_unbalanced,
    video_token_positions,
)
from pisces_fast.ops import backends as backends_mod
from pisces_fast.ops import config as cfg_mod
from pisces_fast.ops._checks import value_checks_enabled
from pisces_fast.ops.backends import triton_available, triton_interpreter_enabled

# Rejections happen before any kernel runs, so the Triton backend's answer is checkable on CPU by
# letting dispatch accept it (TRITON_INTERPRET=1 for the duration of a test).
REJECT_BACKENDS = ["reference", "cpp", "triton"]
RUN_BACKENDS = [b for b in ("reference", "cpp", "triton") if b in available_backends("cpu")]


def _dispatchable(backend, monkeypatch):
    if backend == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend} is not available here")


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    t, s = video_token_positions(2, 2, 2)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g),
               torch.randn(1, 2, 8, 4, generator=g))
    return q, k, v, t, s


# ---------------------------------------------------------------------------------------------
# The type


def test_defaults_are_the_papers_and_the_config_is_frozen():
    c = OTConfig()
    assert (c.eps, c.mass, c.gamma, c.eta, c.max_iter, c.tol) == (0.05, 0.9, 0.2, 0.2, 100, 1e-5)
    assert (c.domain, c.kernel_dtype, c.check_inputs) == ("auto", "auto", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.eps = 0.1
    d = c.replace(eps=1, max_iter=7)
    assert d.eps == 1.0 and isinstance(d.eps, float) and d.max_iter == 7 and c.eps == 0.05
    with pytest.raises(TypeError, match=r"OTConfig has no field\(s\) \['path'\]"):
        c.replace(path="log")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(eps=0.0), ValueError, "eps must be finite and > 0"),
        (dict(eps=1e-45), ValueError, r"eps must be in \[1e-06, 1000\]"),
        (dict(eps=1e4), ValueError, r"eps must be in \[1e-06, 1000\]"),
        (dict(eps="0.05"), TypeError, "eps must be a real number"),
        (dict(mass=1.5), ValueError, r"mass must be in \(0, 1\]"),
        (dict(max_iter=2**63), ValueError, r"max_iter must be <= 1000000"),
        (dict(max_iter=True), TypeError, "max_iter must be an int"),
        (dict(tol=math.inf), ValueError, "tol must be finite"),
        (dict(tol=1e30), ValueError, r"tol must be in \[0, 1000\]"),
        (dict(gamma=1e300), ValueError, r"gamma must be in \[0, 1000\]"),
        (dict(eta=-1.0), ValueError, "eta must be finite and >= 0"),
        (dict(fuse_eps=1e30), ValueError, r"fuse_eps must be in \[1e-30, 1000\]"),
        (dict(fuse_eps=1e-45), ValueError, r"fuse_eps must be in \[1e-30, 1000\]"),
        (dict(domain="fast"), ValueError, r"domain must be one of \('auto', 'scaling', 'log'\)"),
        (dict(domain=1), TypeError, "domain must be a str"),
        (dict(kernel_dtype="int8"), ValueError, "kernel_dtype must be one of"),
        (dict(domain="log", kernel_dtype="float16"), ValueError, "scaling domain only"),
        (dict(check_inputs="yes"), TypeError, "check_inputs must be None"),
    ],
)
def test_every_field_is_validated_once_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        OTConfig(**kwargs)


def test_rewards_config_is_the_ops_type():
    from pisces_fast.rewards import POTConfig

    pot = POTConfig(mass=1.0, backend="reference")
    assert isinstance(pot, OTConfig)
    with pytest.raises(ValueError, match=r"eps must be in \[1e-06, 1000\]"):  # the same validator
        POTConfig(eps=1e-45)
    with pytest.raises(ValueError, match="POTConfig.backend must be one of"):
        POTConfig(backend="gpu")
    core = pot.make_core()
    assert isinstance(core, OTAttention) and core.config.mass == 1.0 and core.backend == "reference"
    assert dataclasses.replace(pot, enabled=False).enabled is False


def test_keywords_and_config_are_the_same_call():
    cost = torch.rand(2, 5, 7, dtype=torch.float64)
    a = sinkhorn_unbalanced(cost, eps=0.1, mass=0.7, max_iter=30, backend="reference")
    b = sinkhorn_unbalanced(cost, config=OTConfig(eps=0.1, mass=0.7, max_iter=30), backend="reference")
    c = sinkhorn_unbalanced(cost, config=OTConfig(eps=0.1, mass=0.7, max_iter=5), max_iter=30, backend="reference")
    assert torch.equal(a, b) and torch.equal(a, c)
    q, k, v, t, s = _attention_inputs()
    layer = OTAttention(OTConfig(gamma=0.5), backend="reference", max_iter=9)
    assert layer.config == OTConfig(gamma=0.5, max_iter=9)
    assert torch.equal(layer(q, k, v, t, s), ot_attention(q, k, v, t, s, gamma=0.5, max_iter=9, backend="reference"))
    with pytest.raises(TypeError, match="config must be a pisces_fast.ops.OTConfig"):
        sinkhorn_unbalanced(cost, config=dict(eps=0.1))


# ---------------------------------------------------------------------------------------------
# The valid domain: one clear error, the same on every backend (issue 15 item 5)


ISSUE_CASES = [
    ("sinkhorn", dict(eps=1e-45), r"eps must be in \[1e-06, 1000\]"),
    ("sinkhorn", dict(cost_scale=3e38), r"\|C\|/eps = .* exceeds 1e\+06"),
    ("sinkhorn", dict(max_iter=2**63), r"max_iter must be <= 1000000"),
    ("attention", dict(gamma=1e300), r"gamma must be in"),
    ("attention", dict(fuse_eps=1e30), r"fuse_eps must be in \[1e-30, 1000\]"),
    ("attention", dict(eps=1e-45), r"eps must be in \[1e-06, 1000\]"),
    ("attention", dict(coords_scale=1e7), r"coords has entries of magnitude 1e\+07 > 1e\+06"),
    ("attention", dict(q_scale=1e20), r"q has entries of magnitude .* > 1e\+15"),
    ("attention", dict(scale=1e30), r"scores q·k·scale may reach"),
]


@pytest.mark.parametrize("backend", REJECT_BACKENDS)
@pytest.mark.parametrize("op,kwargs,match", ISSUE_CASES)
def test_out_of_domain_is_the_same_clear_error_on_every_backend(op, kwargs, match, backend, monkeypatch):
    _dispatchable(backend, monkeypatch)
    kwargs = dict(kwargs)
    if op == "sinkhorn":
        cost = torch.rand(2, 4, 6) * kwargs.pop("cost_scale", 1.0)
        call = lambda: sinkhorn_unbalanced(cost, backend=backend, **kwargs)  # noqa: E731
    else:
        q, k, v, t, s = _attention_inputs()
        q = q * kwargs.pop("q_scale", 1.0)
        s = s * kwargs.pop("coords_scale", 1.0)
        call = lambda: ot_attention(q, k, v, t, s, backend=backend, **kwargs)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend", REJECT_BACKENDS)
def test_masks_are_type_checked_before_their_device(backend, monkeypatch):
    _dispatchable(backend, monkeypatch)
    cost = torch.rand(3, 7)
    for bad, got in ((np.ones(7, bool), "ndarray"), ([True] * 7, "list")):
        with pytest.raises(TypeError, match=f"col_mask must be a bool torch.Tensor .*got {got}"):
            sinkhorn_unbalanced(cost, col_mask=bad, backend=backend)
    q, k, v, t, s = _attention_inputs()
    with pytest.raises(TypeError, match="key_padding_mask must be a bool torch.Tensor"):
        ot_attention(q, k, v, t, s, key_padding_mask=[[True] * 8], backend=backend)
    with pytest.raises(TypeError, match="frame_idx must be a torch.Tensor, got list"):
        ot_attention(q, k, v, list(range(8)), s, backend=backend)


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_the_edges_of_the_domain_give_finite_plans_that_agree(backend):
    """At eps = 1e-6 with unit costs (|C|/eps = 1e6, the bound) and at the largest eps, float32 backends
    agree with the float64 reference. The costs are range-normalized per problem (min 0, max 1), as
    ot_attention builds them: an unbalanced plan scales like exp(-c·min C/eps), so a cost far from 0
    has a plan below float32's range, where 0 is the correctly rounded answer (docs/numerics.md)."""
    if backend == "triton" and not triton_interpreter_enabled():
        pytest.skip("triton on CPU needs the interpreter")
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(2, 6, 9, generator=g)
    lo, hi = cost.amin((-2, -1), keepdim=True), cost.amax((-2, -1), keepdim=True)
    cost = (cost - lo) / (hi - lo)
    for eps, tol_rel in ((1e-6, 2e-4), (1e3, 1e-5)):
        # float32 kernel storage: this checks the domain's edges; 16-bit storage has its own tests
        kw = dict(eps=eps, mass=0.9, max_iter=50, tol=0.0, kernel_dtype="float32")
        want = sinkhorn_unbalanced(cost.double(), backend="reference", **kw)
        got = sinkhorn_unbalanced(cost, backend=backend, **kw)
        assert torch.isfinite(got).all()
        assert float((got.double() - want).abs().max() / want.abs().max()) < tol_rel


# ---------------------------------------------------------------------------------------------
# Value checks: when they run


def test_value_check_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert value_checks_enabled(None, cpu) and not value_checks_enabled(None, cuda)
    assert value_checks_enabled(True, cuda) and not value_checks_enabled(False, cpu)
    cost = torch.rand(2, 3, 4)
    cost[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="cost contains NaN"):
        sinkhorn_unbalanced(cost, backend="reference")
    # Opted out: no error (the caller vouches for the values); structure is still checked.
    sinkhorn_unbalanced(cost, backend="reference", check_inputs=False)
    with pytest.raises(ValueError, match="cost must have at least 2 dimensions"):
        sinkhorn_unbalanced(cost[0, 0], check_inputs=False)
    everything_padded = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="col_mask marks every token"):
        sinkhorn_unbalanced(torch.rand(2, 3, 4), col_mask=everything_padded, backend="reference")


def test_documented_bounds_are_the_enforced_ones():
    lo, hi = cfg_mod.EPS_RANGE
    OTConfig(eps=lo), OTConfig(eps=hi), OTConfig(max_iter=cfg_mod.MAX_ITER_LIMIT)
    with pytest.raises(ValueError):
        OTConfig(max_iter=cfg_mod.MAX_ITER_LIMIT + 1)
    numerics = open("docs/numerics.md", encoding="utf-8").read()
    for text in ("1e-6", "1e3", "1e6", "1e15", "1e30", "check_inputs"):
        assert text in numerics.split("## Valid inputs")[1]


# ---------------------------------------------------------------------------------------------
# Backend report and the missing-extension warning (contract C7)


def test_backend_report_names_each_reason():
    report = backend_report("cpu")
    assert set(report) == {"reference", "cpp", "triton"}
    assert report["reference"] is None
    assert (report["cpp"] is None) == ("cpp" in available_backends("cpu"))
    assert "CPU tensors only" in backend_report("meta")["cpp"]


@pytest.fixture
def missing_cpp(monkeypatch):
    """Pretend the extension failed to import (as after a build that silently dropped it)."""
    monkeypatch.setitem(backends_mod._IMPORT_ERRORS, "pisces_fast._C", "ImportError: No module named 'pisces_fast._C'")
    monkeypatch.setattr(backends_mod, "_CPP_MISSING_WARNED", False)
    monkeypatch.delenv("PISCES_FAST_BACKEND", raising=False)


def test_auto_warns_once_when_the_expected_cpp_backend_is_missing(missing_cpp, monkeypatch):
    monkeypatch.setattr(backends_mod, "cpp_expected", lambda: True)
    report = backend_report("cpu")
    assert "not built" in report["cpp"] and "pip install --no-build-isolation -e ." in report["cpp"]
    with pytest.warns(RuntimeWarning, match=r"pip install --no-build-isolation -e \."):
        assert backends_mod.resolve_backend("auto", torch.device("cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends_mod.resolve_backend("auto", torch.device("cpu")) == "reference"  # once only
        sinkhorn_unbalanced(torch.rand(2, 3))
    with pytest.raises(ValueError, match="backend='cpp' is not built"):
        backends_mod.resolve_backend("cpp", torch.device("cpu"))


def test_no_warning_where_no_cpp_backend_was_expected(missing_cpp, monkeypatch):
    monkeypatch.setattr(backends_mod, "cpp_expected", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends_mod.resolve_backend("auto", torch.device("cpu")) == "reference"
