"""``torch.compile(fullgraph=True)`` over the public ``ot_attention`` and ``OTAttention`` (issue 13 item 4).

A graph break would mean a host sync or Python-side data-dependent branch on the hot path: the value
checks are skipped while compiling, the config is a frozen dataclass Dynamo traces, and the fused
backends are ``torch.library`` custom ops with fake implementations.
"""
import pytest
import torch

from pisces_fast.ops import OTAttention, OTConfig, available_backends, ot_attention, video_token_positions

# Triton joins under the interpreter (TRITON_INTERPRET=1, as its own test file runs): same custom-op path.
BACKENDS = [b for b in ("reference", "cpp", "triton") if b in available_backends("cpu")]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = 2, 2, 5, 8
    t, s = video_token_positions(2, 3, 3, prefix_tokens=1)
    m = t.shape[0]
    q = torch.randn(b, h, n, d, generator=g, requires_grad=True)
    k = torch.randn(b, h, m, d, generator=g, requires_grad=True)
    v = torch.randn(b, h, m, d, generator=g, requires_grad=True)
    kpm = torch.ones(b, m, dtype=torch.bool)
    kpm[1, -4:] = False
    qpm = torch.ones(b, n, dtype=torch.bool)
    qpm[0, -1] = False
    return q, k, v, t, s, kpm, qpm


def _fwd_bwd(fn, q, k, v, *rest):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, *rest)
    out.square().sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_attention_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v, t, s, kpm, qpm = _inputs()

    def fn(q, k, v, t, s, kpm, qpm):
        # keyword hyper-parameters: an OTConfig is built (and validated) while tracing, without a break
        return ot_attention(q, k, v, t, s, mass=0.8, max_iter=12, tol=1e-5, key_padding_mask=kpm,
                            query_padding_mask=qpm, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want = _fwd_bwd(fn, q, k, v, t, s, kpm, qpm)
    got = _fwd_bwd(compiled, q, k, v, t, s, kpm, qpm)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # same op path as above; the interpreter is slow
def test_ot_attention_module_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v, t, s, kpm, qpm = _inputs(1)
    layer = OTAttention(OTConfig(max_iter=10, tol=0.0), backend=backend)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")

    def run(f):
        return lambda q, k, v: f(q, k, v, t, s, key_padding_mask=kpm, query_padding_mask=qpm)

    want = _fwd_bwd(run(layer), q, k, v)
    got = _fwd_bwd(run(compiled), q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_value_checks_are_skipped_while_compiling_not_in_eager():
    # Eager: a NaN query is refused. Compiled: no host read, so the check is skipped (documented);
    # the same call therefore traces as one graph instead of breaking on the check.
    torch._dynamo.reset()
    q, k, v, t, s, kpm, _ = _inputs(2)
    q = q.detach().clone()
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        ot_attention(q, k.detach(), v.detach(), t, s, max_iter=3, backend="reference")
    compiled = torch.compile(
        lambda q: ot_attention(q, k.detach(), v.detach(), t, s, max_iter=3, backend="reference"),
        fullgraph=True, backend="aot_eager",
    )
    assert compiled(q).shape == (2, 2, 5, 8)
