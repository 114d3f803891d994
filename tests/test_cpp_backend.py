"""backend="cpp" (the C++/OpenMP CPU kernels) against the reference, on fresh random inputs.

float64: the kernels must agree with the reference to 1e-10 (relative to the largest plan entry /
output); both compute the same iteration and differ only in rounding. float32: both the kernel and
the float32 reference are compared with the float64 reference on the same (float32-rounded)
inputs; the kernel's error must be of the same order as the float32 reference's own (see
``_fp32_bound``), i.e. the kernel loses no precision the reference keeps.

The native (ctest) test in csrc/tests/ checks the kernels against a naive double loop as well.
"""
import math
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pisces_fast import ot_attention, sinkhorn_unbalanced
from pisces_fast.ops import reference, video_token_positions
from pisces_fast.ops.backends import cpp_available
from sinkhorn_checks import random_masks as _masks

pytestmark = pytest.mark.skipif(not cpp_available(), reason="pisces_fast._C (the C++ backend) is not built")

if cpp_available():
    from pisces_fast.ops import cpp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float((a - b).abs().max() / scale)


def _fp32_bound(ref32_err: float) -> float:
    """Allowed float32 error of the kernel vs the float64 reference.

    The float32 reference itself is off by ref32_err (~1e-6 on the plan at 40 x 2049, 100
    iterations: the log-kernel entries -C/eps carry an absolute rounding of |C/eps|*6e-8 that exp()
    turns into relative error, and the iteration accumulates it). The kernel runs the same
    iteration in another order (and in the scaling domain), so its error is of the same size —
    measured 0.9x-1.7x the reference's over eps in [1e-3, 1] and both paths. We allow 3x plus 1e-6
    (~16 float32 ulps of the largest entry, for draws where the reference happens to be lucky).
    """
    return 3.0 * ref32_err + 1e-6


# ---------------------------------------------------------------------------------------------
# Sinkhorn

SINKHORN_CASES = [
    # (P, N, M, eps, mass, max_iter, tol, masked)
    (4, 7, 37, 0.05, 0.9, 60, 0.0, True),  # M not a multiple of any vector width
    (2, 1, 1, 0.05, 0.9, 10, 0.0, False),
    (3, 1, 50, 0.05, 0.9, 40, 0.0, True),
    (3, 50, 1, 0.05, 0.9, 40, 0.0, True),
    (2, 9, 131, 1e-3, 0.9, 40, 0.0, True),  # small eps: log domain
    (2, 9, 131, 1.0, 1.0, 40, 0.0, True),  # large eps, balanced
    (2, 9, 131, 0.05, 1.0, 80, 0.0, False),  # balanced
    (2, 9, 131, 0.05, 0.01, 40, 0.0, True),  # almost no transport
    (5, 11, 77, 0.05, 0.9, 500, 1e-6, True),  # early stop, per problem
]


@pytest.mark.parametrize("path", ["auto", "scaling", "log"])
@pytest.mark.parametrize("p,n,m,eps,mass,max_iter,tol,masked", SINKHORN_CASES)
def test_sinkhorn_float64_matches_reference(p, n, m, eps, mass, max_iter, tol, masked, path):
    if path == "scaling" and not cpp.scaling_domain_is_safe(1.0, eps, n, m, torch.float64):
        pytest.skip("the scaling domain is not valid at this eps (auto never picks it)")
    cost = torch.rand(p, n, m, dtype=torch.float64)
    rows, cols = _masks(p, n, m) if masked else (None, None)
    kw = dict(eps=eps, mass=mass, max_iter=max_iter, tol=tol, row_mask=rows, col_mask=cols)
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, return_potentials=True, **kw)
    plan, n_iter, scaling = cpp.sinkhorn_unbalanced(cost, domain=path, return_info=True, **kw)
    assert _rel(plan, ref) < 1e-10
    assert torch.equal(n_iter, ref_iter)
    if masked:
        valid = rows[:, :, None] & cols[:, None, :]
        assert torch.all(plan[~valid] == 0)
    if path != "auto":
        assert bool(scaling.all()) == (path == "scaling")


def test_sinkhorn_paper_size():
    cost = torch.rand(2, 40, 2049, dtype=torch.float64)
    kw = dict(eps=0.05, mass=0.9, max_iter=15, tol=0.0)
    assert _rel(cpp.sinkhorn_unbalanced(cost, **kw), reference.sinkhorn_unbalanced(cost, **kw)) < 1e-10


def test_sinkhorn_tol0_runs_exactly_max_iter_and_tol_stops_early():
    cost = torch.rand(6, 8, 45, dtype=torch.float64)
    # Balanced OT converges at a cost-dependent rate: nearly constant costs stop much earlier,
    # which exercises the per-problem freezing of a batch.
    cost[3:] *= 0.02
    kw = dict(eps=0.05, mass=1.0)
    _, n0, _ = cpp.sinkhorn_unbalanced(cost, max_iter=37, tol=0.0, return_info=True, **kw)
    assert torch.all(n0 == 37)
    plan, n1, _ = cpp.sinkhorn_unbalanced(cost, max_iter=1000, tol=1e-7, return_info=True, **kw)
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, max_iter=1000, tol=1e-7, return_potentials=True, **kw)
    assert torch.equal(n1, ref_iter)
    assert int(n1.max()) < 1000 and int(n1[3:].max()) < int(n1[:3].min())
    assert _rel(plan, ref) < 1e-10


def test_sinkhorn_auto_path_switch():
    cost = torch.rand(2, 6, 40, dtype=torch.float32)
    *_, s = cpp.sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=5, tol=0.0, return_info=True)
    assert bool(s.all())
    *_, s = cpp.sinkhorn_unbalanced(cost, eps=1e-3, mass=0.9, max_iter=5, tol=0.0, return_info=True)
    assert not bool(s.any())
    # The rule is per problem and looks at the range of the valid costs: a wide-range problem next
    # to a [0, 1] one takes the log domain alone.
    wide = cost.clone()
    wide[1] *= 100.0
    *_, s = cpp.sinkhorn_unbalanced(wide, eps=0.05, mass=0.9, max_iter=5, tol=0.0, return_info=True)
    assert s.tolist() == [True, False]
    assert cpp.scaling_domain_is_safe(1.0, 0.05, 40, 2049, torch.float32)
    assert not cpp.scaling_domain_is_safe(1.0, 0.012, 40, 2049, torch.float32)
    assert cpp.scaling_domain_is_safe(1.0, 0.002, 40, 2049, torch.float64)


def test_sinkhorn_constant_and_shifted_costs():
    cost = torch.full((2, 5, 23), 0.7, dtype=torch.float64)
    kw = dict(eps=0.05, mass=0.9, max_iter=50, tol=0.0)
    assert _rel(cpp.sinkhorn_unbalanced(cost, **kw), reference.sinkhorn_unbalanced(cost, **kw)) < 1e-10
    # Costs far from [0, 1] (the public API accepts any finite cost): the scaling kernel is
    # anchored at the minimum valid cost, so a large offset changes nothing but rounding.
    shifted = torch.rand(2, 5, 23, dtype=torch.float64) * 0.5 + 40.0
    assert _rel(cpp.sinkhorn_unbalanced(shifted, **kw), reference.sinkhorn_unbalanced(shifted, **kw)) < 1e-10


@pytest.mark.parametrize("eps,mass,tol", [(0.05, 0.9, 0.0), (0.02, 0.95, 0.0), (1e-3, 0.9, 0.0), (0.05, 1.0, 0.0)])
def test_sinkhorn_float32(eps, mass, tol):
    p, n, m = 4, 40, 301
    cost32 = torch.rand(p, n, m, dtype=torch.float32)
    rows, cols = _masks(p, n, m)
    kw = dict(eps=eps, mass=mass, max_iter=100, tol=tol)
    ref64 = reference.sinkhorn_unbalanced(cost32.double(), row_mask=rows, col_mask=cols, **kw)
    ref32 = reference.sinkhorn_unbalanced(cost32, row_mask=rows, col_mask=cols, **kw)
    # The float32 kernel matrix: "auto" may store it in float16 (tested against its own bound below).
    got = cpp.sinkhorn_unbalanced(cost32, row_mask=rows, col_mask=cols, kernel_dtype="float32", **kw)
    assert got.dtype == torch.float32
    assert _rel(got.double(), ref64) <= _fp32_bound(_rel(ref32.double(), ref64))


def test_sinkhorn_public_api_batch_dims_and_dtypes():
    cost = torch.rand(2, 3, 6, 29)
    rows = torch.rand(2, 3, 6) > 0.3
    rows[..., 0] = True
    kw = dict(eps=0.05, mass=0.9, max_iter=40, tol=0.0, row_mask=rows)
    got = sinkhorn_unbalanced(cost.double(), backend="cpp", **kw)
    ref = sinkhorn_unbalanced(cost.double(), backend="reference", **kw)
    assert got.shape == cost.shape and got.dtype == torch.float64
    assert _rel(got, ref) < 1e-10
    half = sinkhorn_unbalanced(cost.to(torch.bfloat16), backend="cpp", **kw)  # computed in float32
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


def test_sinkhorn_bad_domain():
    with pytest.raises(ValueError, match="domain"):
        cpp.sinkhorn_unbalanced(torch.rand(1, 2, 3), eps=0.05, mass=0.9, max_iter=1, tol=0.0, domain="fast")


# ---------------------------------------------------------------------------------------------
# OT attention


def _attention_inputs(b, h, n, d, dv, frames, height, width, prefix, dtype, q_scale=1.0, masked=True):
    frame_idx, coords = video_token_positions(frames, height, width, prefix_tokens=prefix, dtype=dtype)
    m = frame_idx.shape[0]
    q = (torch.randn(b, h, n, d, dtype=dtype) * q_scale).requires_grad_()
    k = torch.randn(b, h, m, d, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, m, dv, dtype=dtype).requires_grad_()
    kpm = qpm = None
    if masked:
        qpm, kpm = _masks(b, n, m)
    return q, k, v, frame_idx, coords, kpm, qpm


ATTENTION_CASES = [
    # (B, H, N, D, Dv, frames, height, width, prefix, q_scale, eps, mass, masked)
    (2, 2, 6, 16, 8, 2, 3, 5, 1, 1.0, 0.05, 0.9, True),  # prefix token, M = 31
    (1, 3, 1, 8, 8, 3, 4, 4, 0, 1.0, 0.05, 0.9, True),  # N = 1
    (2, 1, 5, 8, 3, 1, 1, 1, 0, 1.0, 0.05, 0.9, False),  # M = 1: every cost term degenerate
    (1, 2, 7, 8, 9, 2, 4, 4, 1, 30.0, 0.05, 0.9, True),  # huge q: near one-hot attention
    (1, 2, 7, 8, 9, 2, 4, 4, 1, 1e-3, 0.05, 0.9, True),  # tiny q: uniform attention
    (1, 2, 5, 8, 8, 2, 3, 3, 0, 1.0, 1e-3, 0.9, True),  # small eps (log domain)
    (1, 2, 5, 8, 8, 2, 3, 3, 0, 1.0, 1.0, 1.0, True),  # large eps, balanced
    (1, 2, 5, 8, 8, 2, 3, 3, 0, 1.0, 0.05, 0.01, False),
    (1, 1, 40, 64, 64, 8, 16, 16, 1, 1.0, 0.05, 0.9, False),  # the paper's 40 x 2049 problem
]


@pytest.mark.parametrize("b,h,n,d,dv,frames,height,width,prefix,q_scale,eps,mass,masked", ATTENTION_CASES)
def test_ot_attention_float64_forward_and_grads(b, h, n, d, dv, frames, height, width, prefix, q_scale, eps, mass,
                                                masked):
    q, k, v, t, s, kpm, qpm = _attention_inputs(b, h, n, d, dv, frames, height, width, prefix, torch.float64,
                                                q_scale, masked)
    kw = dict(gamma=0.2, eta=0.3, eps=eps, mass=mass, max_iter=30, tol=0.0, fuse_eps=1e-8, scale=1 / math.sqrt(d),
              key_padding_mask=kpm, query_padding_mask=qpm)
    out_ref, plan_ref = reference.ot_attention(q, k, v, t, s, **kw)
    out, plan = cpp.ot_attention(q, k, v, t, s, **kw)
    assert _rel(plan, plan_ref) < 1e-10
    assert _rel(out, out_ref) < 1e-10
    assert not plan.requires_grad
    if qpm is not None:
        assert torch.all(out.detach().transpose(1, 2)[~qpm] == 0)
    grad = torch.randn_like(out_ref)
    g_ref = torch.autograd.grad(out_ref, (q, k, v), grad)
    g_cpp = torch.autograd.grad(out, (q, k, v), grad)
    for a, r in zip(g_cpp, g_ref):
        assert _rel(a, r) < 1e-10


def test_ot_attention_float32():
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 2, 12, 32, 16, 4, 6, 6, 1, torch.float32)
    kw = dict(gamma=0.2, eta=0.2, eps=0.05, mass=0.9, max_iter=100, tol=0.0, fuse_eps=1e-8, scale=1 / math.sqrt(32),
              key_padding_mask=kpm, query_padding_mask=qpm)
    as64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out64, plan64 = reference.ot_attention(*as64, t.double(), s.double(), **kw)
    out32, plan32 = reference.ot_attention(q, k, v, t, s, **kw)
    out, plan = cpp.ot_attention(q, k, v, t, s, kernel_dtype="float32", **kw)
    assert out.dtype == plan.dtype == torch.float32
    assert _rel(plan.double(), plan64) <= _fp32_bound(_rel(plan32.double(), plan64))
    assert _rel(out.double(), out64) <= _fp32_bound(_rel(out32.double(), out64))
    grad = torch.randn_like(out32)
    g64 = torch.autograd.grad(out64, as64, grad.double())
    g32 = torch.autograd.grad(out32, (q, k, v), grad)
    got = torch.autograd.grad(out, (q, k, v), grad)
    for a, r32, r64 in zip(got, g32, g64):
        assert _rel(a.double(), r64) <= _fp32_bound(_rel(r32.double(), r64))


def test_ot_attention_public_api_and_early_stop():
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 2, 5, 8, 8, 2, 4, 4, 1, torch.float64)
    kw = dict(eps=0.05, mass=0.9, max_iter=300, tol=1e-6, key_padding_mask=kpm, query_padding_mask=qpm,
              return_plan=True)
    out, plan = ot_attention(q, k, v, t, s, backend="cpp", **kw)
    out_ref, plan_ref = ot_attention(q, k, v, t, s, backend="reference", **kw)
    assert _rel(plan, plan_ref) < 1e-10 and _rel(out, out_ref) < 1e-10
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ---------------------------------------------------------------------------------------------
# Determinism, threads, torch.compile


def test_deterministic_across_runs_and_thread_counts():
    cost = torch.rand(7, 40, 333)
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 3, 9, 16, 16, 2, 4, 4, 1, torch.float32)
    kw = dict(gamma=0.2, eta=0.2, eps=0.05, mass=0.9, max_iter=50, tol=1e-5, fuse_eps=1e-8, scale=0.25,
              key_padding_mask=kpm, query_padding_mask=qpm)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 1, 2):
            torch.set_num_threads(n_threads)
            plan = cpp.sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=50, tol=1e-5)
            out, aplan = cpp.ot_attention(q, k, v, t, s, **kw)
            results.append((plan, out.detach(), aplan))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    cost = torch.rand(3, 4, 19)
    rows, cols = _masks(3, 4, 19)
    torch.library.opcheck(torch.ops.pisces_fast.cpp_sinkhorn.default, (cost, rows, cols, 0.05, 0.9, 10, 0.0, "auto", "auto"))
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 1, 3, 8, 4, 2, 2, 3, 1, torch.float64)
    args = (q, k, v, t, s, kpm, qpm, 0.2, 0.2, 0.05, 0.9, 10, 0.0, 1e-8, 0.35, "auto", "auto")
    torch.library.opcheck(torch.ops.pisces_fast.cpp_ot_attention.default, args)
    _, plan, row_stats = torch.ops.pisces_fast.cpp_ot_attention(*args)
    grad = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    bargs = (q.detach(), k.detach(), v.detach(), plan, grad, kpm, qpm, 0.35, 1e-8)
    torch.library.opcheck(torch.ops.pisces_fast.cpp_ot_attention_backward.default, bargs)
    torch.library.opcheck(torch.ops.pisces_fast.cpp_ot_attention_backward.default, bargs + (row_stats,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_kernel_matches_its_torch_math(dtype):
    # D and Dv not multiples of the vector width; padding on both sides; the plan is any fixed tensor.
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 3, 7, 21, 13, 2, 3, 5, 1, dtype)
    q, k, v = q.detach(), k.detach(), v.detach()
    plan = torch.rand(2, 3, 7, k.shape[2], dtype=dtype) * 1e-3
    grad = torch.randn(2, 3, 7, 13, dtype=dtype)
    ref = cpp.ot_attention_backward_reference_math(q, k, v, plan, grad, kpm, qpm, 0.3, 1e-8)
    # Without row statistics (A recomputed from scratch) and with them (one pass from lse and Z, the
    # path autograd takes): both are the reference's math.
    col = kpm[:, None, None, :]
    scores = ((q @ k.transpose(-1, -2)) * 0.3).masked_fill(~col, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    z = ((scores - lse[..., None]).exp() + 1e-8).mul(plan + 1e-8).masked_fill(~col, 0.0).sum(-1)
    stats = torch.stack([lse, z], dim=-1).contiguous()
    for extra in ((), (stats,)):
        got = torch.ops.pisces_fast.cpp_ot_attention_backward(q, k, v, plan, grad, kpm, qpm, 0.3, 1e-8, *extra)
        for a, r in zip(got, ref):
            assert _rel(a, r) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_forward_row_stats_are_the_backward_s():
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 2, 6, 16, 8, 2, 3, 5, 1, torch.float64)
    args = (q.detach(), k.detach(), v.detach(), t, s, kpm, qpm, 0.2, 0.2, 0.05, 0.9, 20, 0.0, 1e-8, 0.25, "auto",
            "auto")
    _, plan, stats = torch.ops.pisces_fast.cpp_ot_attention(*args)
    scores = ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(~kpm[:, None, None, :], -math.inf).detach()
    lse = torch.logsumexp(scores, dim=-1)
    z = ((scores - lse[..., None]).exp() + 1e-8).mul(plan + 1e-8).masked_fill(~kpm[:, None, None, :], 0.0).sum(-1)
    real = qpm[:, None, :].expand_as(lse)
    assert torch.allclose(stats[..., 0][real], lse[real], rtol=1e-12, atol=1e-12)
    assert torch.allclose(stats[..., 1][real], z[real], rtol=1e-12, atol=0)
    assert torch.all(stats[..., 0][~real] == 0) and torch.all(stats[..., 1][~real] == 1)


class _TinyCrossAttention(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * dim)

    def forward(self, text, video, frame_idx, coords, key_padding_mask):
        b, n, c = text.shape
        q = self.q(text).view(b, n, 2, c // 2).transpose(1, 2)
        k, v = self.kv(video).view(b, video.shape[1], 2, 2, c // 2).permute(2, 0, 3, 1, 4)
        out = ot_attention(q, k, v, frame_idx, coords, max_iter=20, tol=0.0, key_padding_mask=key_padding_mask,
                           backend="cpp")
        return out.transpose(1, 2).reshape(b, n, c)


def test_torch_compile():
    torch._dynamo.reset()
    model = _TinyCrossAttention(16)
    t, s = video_token_positions(2, 3, 3, prefix_tokens=1)
    text, video = torch.randn(2, 5, 16), torch.randn(2, t.shape[0], 16)
    kpm = torch.ones(2, t.shape[0], dtype=torch.bool)
    kpm[1, -4:] = False
    eager = model(text, video, t, s, kpm)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(text, video, t, s, kpm)
    out.square().sum().backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 16-bit kernel storage (docs/numerics.md, "16-bit kernel storage")


def _entry_rel(got: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |got/ref - 1| over the entries that are normal float32 numbers (what the bound is about)."""
    keep = ref64 > 1e-30
    return float(((got.double() - ref64).abs()[keep] / ref64[keep]).max())


@pytest.mark.parametrize("p,n,m,max_iter,masked", [(1, 40, 2049, 40, False), (3, 7, 37, 100, True),
                                                    (2, 33, 301, 100, True)])
def test_sinkhorn_16bit_kernel_within_its_bound(p, n, m, max_iter, masked):
    cost = torch.rand(p, n, m)
    rows, cols = _masks(p, n, m) if masked else (None, None)
    kw = dict(eps=0.05, mass=0.9, max_iter=max_iter, tol=0.0, row_mask=rows, col_mask=cols)
    ref64 = reference.sinkhorn_unbalanced(cost.double(), **kw)
    full_err = _entry_rel(cpp.sinkhorn_unbalanced(cost, kernel_dtype="float32", **kw), ref64)
    for kernel_dtype in ("bfloat16", "float16"):
        got = cpp.sinkhorn_unbalanced(cost, kernel_dtype=kernel_dtype, **kw)
        err, bound = _entry_rel(got, ref64), cpp.kernel16_plan_error_bound(0.9, kernel_dtype)
        assert err <= bound, kernel_dtype  # the bound holds after any number of iterations
        # It did store 16 bits: the error is the format's, far above float32 rounding (measured 2e-3 bf16,
        # 3e-4 fp16 at this setting; the bound is 7.3e-2 / 8.8e-3).
        assert err > 20 * full_err, kernel_dtype
        if masked:
            assert torch.all(got[~(rows[:, :, None] & cols[:, None, :])] == 0)


def test_kernel_dtype_auto_rule_and_errors():
    f32, f64 = torch.float32, torch.float64
    assert cpp.kernel_storage(1.0, 0.05, 0.9, 40, 2049, f32) == "float16"  # the paper's setting
    assert cpp.kernel_storage(1.0, 0.05, 0.95, 40, 2049, f32) == "float32"  # bound 1.9e-2 > 1e-2
    assert cpp.kernel_storage(1.0, 0.05, 1.0, 40, 2049, f32) == "float32"  # balanced: no bound
    assert cpp.kernel_storage(1.0, 0.04, 0.9, 40, 2049, f32) == "float32"  # range/eps 25 > 20.79
    assert cpp.kernel_storage(1.0, 0.05, 0.9, 40, 2049, f64) == "float32"  # float64 keeps float64
    assert cpp.kernel_storage(1.0, 0.04, 0.9, 40, 2049, f32, "bfloat16") == "bfloat16"
    assert cpp.kernel16_plan_error_bound(0.9, "float16") <= cpp.KERNEL16_AUTO_PLAN_RTOL
    assert cpp.kernel16_plan_error_bound(1.0, "float16") == math.inf
    cost = torch.rand(2, 5, 40)
    kw = dict(mass=0.9, max_iter=5, tol=0.0)
    with pytest.raises(ValueError, match="float16.*normal float16"):
        cpp.sinkhorn_unbalanced(cost, eps=0.04, kernel_dtype="float16", **kw)
    with pytest.raises(ValueError, match="float32 inputs"):
        cpp.sinkhorn_unbalanced(cost.double(), eps=0.05, kernel_dtype="bfloat16", **kw)
    with pytest.raises(ValueError, match="log domain"):
        cpp.sinkhorn_unbalanced(cost, eps=1e-3, kernel_dtype="bfloat16", **kw)
    # auto on the same inputs: float16 where allowed, float32 elsewhere, never an error.
    auto = cpp.sinkhorn_unbalanced(cost, eps=0.05, **kw)
    assert torch.equal(auto, cpp.sinkhorn_unbalanced(cost, eps=0.05, kernel_dtype="float16", **kw))
    assert torch.equal(cpp.sinkhorn_unbalanced(cost, eps=0.04, **kw),
                       cpp.sinkhorn_unbalanced(cost, eps=0.04, kernel_dtype="float32", **kw))


def test_ot_attention_16bit_kernel_within_its_bound():
    q, k, v, t, s, kpm, qpm = _attention_inputs(2, 2, 12, 32, 16, 4, 6, 6, 1, torch.float32)
    kw = dict(gamma=0.2, eta=0.2, eps=0.05, mass=0.9, max_iter=100, tol=0.0, fuse_eps=1e-8, scale=1 / math.sqrt(32),
              key_padding_mask=kpm, query_padding_mask=qpm)
    as64 = [x.detach().double() for x in (q, k, v)]
    out64, plan64 = reference.ot_attention(*as64, t.double(), s.double(), **kw)
    bound = cpp.kernel16_plan_error_bound(0.9, "float16")
    out, plan = cpp.ot_attention(q, k, v, t, s, kernel_dtype="float16", **kw)
    assert _entry_rel(plan, plan64) <= bound
    # out = F v with F = (A+fe)(P+fe) / Z: a relative plan error e moves F by <= 2e (relative), out by
    # <= 2e max|v|.
    assert float((out.detach().double() - out64).abs().max()) <= 2 * bound * float(v.detach().abs().max())
    grad = torch.randn_like(out)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out, (q, k, v), grad))


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def test_long_solve_is_interruptible():
    # The child solves for minutes unless SIGINT stops it; it reports how long it was inside the solve.
    code = textwrap.dedent("""
        import sys, time, torch
        from pisces_fast.ops import cpp
        cost = torch.rand(4, 40, 2049)
        cpp.sinkhorn_unbalanced(cost[:1], eps=0.05, mass=0.9, max_iter=2, tol=0.0)  # warm
        print("solving", flush=True)
        t0 = time.perf_counter()
        try:
            cpp.sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=10**8, tol=0.0)
        except KeyboardInterrupt:
            print(f"interrupted {time.perf_counter() - t0:.3f}", flush=True)
            sys.exit(0)
        print("finished", flush=True)
        sys.exit(1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "solving"
        time.sleep(1.0)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        latency = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    word, inside = out.split()
    assert word == "interrupted" and float(inside) >= 0.9  # it was inside the C++ solve
    assert latency < 5.0  # polled every 50 ms; generous for a loaded CI machine
