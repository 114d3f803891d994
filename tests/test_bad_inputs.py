"""Every bad input to the public ops fails loudly, naming the argument and what was expected."""
import math

import numpy as np
import pytest
import torch

from pisces_fast import fuse_attention, ot_attention, sinkhorn_unbalanced, spatiotemporal_cost, video_token_positions


def attention_inputs(b=2, h=2, n=3, m=8, d=4):
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    fi, co = video_token_positions(2, 2, 2)
    return q, k, v, fi, co


def call_attention(**overrides):
    q, k, v, fi, co = attention_inputs()
    args = dict(q=q, k=k, v=v, frame_idx=fi, coords=co)
    args.update(overrides)
    return ot_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("frame_idx"), args.pop("coords"), **args)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(q=torch.randn(2, 3, 4)), ValueError, "q must have 4 dimensions"),
        (dict(k=torch.randn(2, 2, 8, 5)), ValueError, r"k must have shape \(B, H, M, D\)"),
        (dict(v=torch.randn(2, 2, 7, 4)), ValueError, r"v must have shape \(B, H, M, Dv\)"),
        (dict(q=torch.randint(0, 3, (2, 2, 3, 4))), TypeError, "q must be a floating-point tensor"),
        (dict(q=torch.randn(2, 2, 3, 4).double()), TypeError, "q, k, v must share a dtype"),
        (dict(q=torch.full((2, 2, 3, 4), math.nan)), ValueError, "q contains NaN or Inf"),
        (dict(v=torch.full((2, 2, 8, 4), math.inf)), ValueError, "v contains NaN or Inf"),
        (dict(q=torch.randn(2, 2, 0, 4)), ValueError, "q must not be empty"),
        (dict(frame_idx=torch.zeros(7)), ValueError, r"frame_idx must have shape \(M,\) = \(8,\)"),
        (dict(coords=torch.zeros(8, 3)), ValueError, r"coords must have shape \(M, 2\)"),
        (dict(coords=torch.full((8, 2), math.nan)), ValueError, "coords contains NaN"),
        (dict(eps=0.0), ValueError, "eps must be finite and > 0"),
        (dict(eps=-1.0), ValueError, "eps must be finite and > 0"),
        (dict(mass=0.0), ValueError, r"mass must be in \(0, 1\]"),
        (dict(mass=1.5), ValueError, r"mass must be in \(0, 1\]"),
        (dict(max_iter=0), ValueError, "max_iter must be >= 1"),
        (dict(max_iter=2.5), TypeError, "max_iter must be an int"),
        (dict(tol=-1e-3), ValueError, "tol must be finite and >= 0"),
        (dict(gamma=-0.1), ValueError, "gamma must be finite and >= 0"),
        (dict(fuse_eps=0.0), ValueError, "fuse_eps must be finite and > 0"),
        (dict(scale=math.nan), ValueError, "scale must be finite"),
        (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(2, 8\)"),
        (dict(query_padding_mask=torch.ones(2, 3)), TypeError, "query_padding_mask must have dtype torch.bool"),
        (dict(key_padding_mask=torch.tensor([[True] * 8, [False] * 8])), ValueError, "key_padding_mask marks every token"),
        (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
        (dict(gamma=1e300), ValueError, r"gamma must be in \[0, 1000\]"),
        (dict(fuse_eps=1e30), ValueError, r"fuse_eps must be in \[1e-30, 1000\]"),
        (dict(coords=torch.full((8, 2), 1e7)), ValueError, "coords has entries of magnitude"),
        (dict(key_padding_mask=[[True] * 8] * 2), TypeError, "key_padding_mask must be a bool torch.Tensor"),
        (dict(return_plan=1), TypeError, "return_plan must be a bool"),
    ],
)
def test_ot_attention_rejects(overrides, error, match):
    with pytest.raises(error, match=match):
        call_attention(**overrides)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from pisces_fast.ops.backends import resolve_backend

    with pytest.raises(ValueError, match="backend='triton'"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on CPU tensors only"):
        resolve_backend("cpp", torch.device("meta"))


def test_env_override(monkeypatch):
    from pisces_fast.ops.backends import resolve_backend

    monkeypatch.setenv("PISCES_FAST_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("PISCES_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PISCES_FAST_BACKEND must be one of"):
        resolve_backend("auto", torch.device("cpu"))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(cost=torch.rand(5)), ValueError, "cost must have at least 2 dimensions"),
        (dict(cost=torch.ones(3, 4, dtype=torch.long)), TypeError, "cost must be a floating-point"),
        (dict(cost=torch.tensor([[0.0, math.nan]])), ValueError, "cost contains NaN"),
        (dict(cost=torch.rand(0, 4)), ValueError, "cost must not be empty"),
        (dict(cost=torch.rand(3, 4), eps=math.inf), ValueError, "eps must be finite"),
        (dict(cost=torch.rand(3, 4), mass=-0.5), ValueError, "mass must be in"),
        (dict(cost=torch.rand(3, 4), mass="0.9"), TypeError, "mass must be a real number"),
        (dict(cost=torch.rand(2, 3, 4), row_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "row_mask has shape"),
        (dict(cost=torch.rand(2, 3, 4), col_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "col_mask marks every token"),
        (dict(cost=[[0.1, 0.2]]), TypeError, "cost must be a torch.Tensor"),
        # type before device: an array or a list is named as such, not compared as a device
        (dict(cost=torch.rand(3, 7), col_mask=np.ones(7, bool)), TypeError, "col_mask must be a bool torch.Tensor .*ndarray"),
        (dict(cost=torch.rand(3, 7), col_mask=[True] * 7), TypeError, "col_mask must be a bool torch.Tensor .*list"),
        (dict(cost=torch.rand(3, 4), eps=1e-45), ValueError, r"eps must be in \[1e-06, 1000\]"),
        (dict(cost=torch.rand(3, 4) * 3e38), ValueError, r"\|C\|/eps = .* exceeds"),
        (dict(cost=torch.rand(3, 4), max_iter=2**63), ValueError, "max_iter must be <= 1000000"),
        (dict(cost=torch.rand(3, 4), domain="fast"), ValueError, "domain must be one of"),
    ],
)
def test_sinkhorn_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        sinkhorn_unbalanced(**kwargs)


def test_cost_and_fusion_reject():
    q, k, attn = torch.randn(3, 4), torch.randn(5, 4), torch.softmax(torch.randn(3, 5), -1)
    fi, co = video_token_positions(5, 1, 1)
    with pytest.raises(ValueError, match="q and k must share the feature dim"):
        spatiotemporal_cost(q, torch.randn(5, 3), attn, fi, co)
    with pytest.raises(ValueError, match=r"attn must end in \(N, M\) = \(3, 5\)"):
        spatiotemporal_cost(q, k, attn.T, fi, co)
    with pytest.raises(ValueError, match="frame_idx must have shape"):
        spatiotemporal_cost(q, k, attn, fi[:4], co)
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        spatiotemporal_cost(q, k, attn, fi, co, eta=-1.0)
    with pytest.raises(ValueError, match="attn and plan must have the same shape"):
        fuse_attention(attn, attn.T)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        fuse_attention(attn, attn, eps=0.0)
    with pytest.raises(ValueError, match="plan contains NaN"):
        fuse_attention(attn, torch.full_like(attn, math.nan))


def test_device_mismatch_is_named():
    q, k, v, fi, co = attention_inputs()
    with pytest.raises(ValueError, match="frame_idx is on meta"):
        ot_attention(q, k, v, fi.to("meta"), co)
