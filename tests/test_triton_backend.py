"""backend="triton" (fused Triton kernels) against the reference, on fresh random inputs.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is set
before anything imports the kernels; tests/conftest.py does the same). The interpreter pays per
program and per op, so the shapes are small and the iteration counts modest; GPU-only tests
(bf16 inputs, paper-sized shapes) run when CUDA is there.

float64: kernel and reference compute the same iteration and differ only in rounding, so they must
agree to ~1e-10 relative to the largest entry. float32: the kernel and the float32 reference are
both compared with the float64 reference; the kernel may be off by at most ~10x the float32
reference's own error plus a few float32 ulps (see ``_fp32_bound``).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pisces_fast import ot_attention, sinkhorn_unbalanced  # noqa: E402
from pisces_fast.ops import reference, video_token_positions  # noqa: E402
from pisces_fast.ops.backends import available_backends, triton_available  # noqa: E402
from sinkhorn_checks import plan_entry_error as _plan_entry_error  # noqa: E402
from sinkhorn_checks import random_masks as _masks  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    # The interpreter evaluates masked-out lanes too (log 0 for padding rows, later discarded).
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

if triton_available():
    from pisces_fast.ops import triton as tb
    from pisces_fast.ops.triton.attention import force_blocks, ot_attention_forward
    from pisces_fast.ops.triton.sinkhorn import sinkhorn_forward


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((a - b).abs().max() / scale)


def _fp32_bound(ref32_err: float) -> float:
    """Allowed float32 error vs the float64 reference: 10x the float32 reference's own + 2e-6."""
    return 10.0 * ref32_err + 2e-6


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


# ---------------------------------------------------------------------------------------------
# Sinkhorn

SINKHORN_CASES = [
    # (P, N, M, eps, mass, max_iter, tol, masked, cost)
    (3, 5, 37, 0.05, 0.9, 30, 0.0, True, "rand"),  # M not a multiple of any block
    (2, 1, 20, 1e-3, 0.9, 20, 0.0, True, "rand"),  # N = 1, small eps: log domain
    (2, 6, 45, 1.0, 1.0, 20, 0.0, False, "rand"),  # large eps, balanced
    (2, 6, 45, 0.05, 0.01, 20, 0.0, True, "rand"),  # almost no transport
    (2, 7, 3, 0.05, 0.9, 20, 0.0, True, "rand"),  # M < N
    (2, 4, 19, 0.05, 0.9, 10, 0.0, True, "const"),  # constant cost
    (2, 5, 24, 0.2, 0.9, 20, 0.0, False, "wide"),  # cost far from [0, 1]: range/eps = 100 -> log
    (3, 6, 33, 0.05, 0.9, 150, 1e-6, True, "rand"),  # early stop, per problem
    (2, 5, 70, 0.0175, 0.9, 25, 0.0, True, "rand"),  # range/eps up to 57: the scaling shift near its bound
    (2, 3, 40, 0.0175, 1.0, 25, 0.0, False, "rand"),  # the same, balanced (tau = 1)
]


def test_scaling_domain_rule():
    """The documented domain rule (sinkhorn.scaling_domain_ok), as the kernels apply it per problem."""
    from pisces_fast.ops.triton.sinkhorn import scaling_domain_ok

    assert scaling_domain_ok(20.0, 0.9, 40, 2049, torch.float32)  # the paper's setting
    assert scaling_domain_ok(60.0, 1.0, 1024, 2049, torch.float32)
    assert not scaling_domain_ok(61.0, 0.5, 40, 2049, torch.float32)  # past the exponent range
    assert not scaling_domain_ok(60.0, 1.0, 1024, 10**8, torch.float32)  # past the underflow budget
    assert scaling_domain_ok(600.0, 1.0, 1024, 10**6, torch.float64)


def _cost(kind, p, n, m, dtype=torch.float64):
    if kind == "const":
        return torch.full((p, n, m), 0.37, dtype=dtype)
    if kind == "wide":
        return 5.0 + 20.0 * torch.rand(p, n, m, dtype=dtype)
    return torch.rand(p, n, m, dtype=dtype)


@pytest.mark.parametrize("p,n,m,eps,mass,max_iter,tol,masked,kind", SINKHORN_CASES)
def test_sinkhorn_matches_reference(p, n, m, eps, mass, max_iter, tol, masked, kind):
    cost = _cost(kind, p, n, m)
    rows, cols = _masks(p, n, m) if masked else (None, None)
    kw = dict(eps=eps, mass=mass, max_iter=max_iter, tol=tol, row_mask=rows, col_mask=cols)
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, return_potentials=True, **kw)
    c64, r, c = _dev(cost, rows, cols)
    plan, n_iter = sinkhorn_forward(c64, r, c, eps, mass, max_iter, tol, return_n_iter=True)
    assert plan.dtype == torch.float64 and plan.shape == cost.shape
    assert _rel(plan, ref) < 1e-10
    assert torch.equal(n_iter.cpu(), ref_iter)  # Algorithm 3's stopping rule, problem by problem
    if masked:
        valid = rows[:, :, None] & cols[:, None, :]
        assert bool((plan.cpu()[~valid] == 0).all())  # padding carries exactly zero mass

    ref32 = reference.sinkhorn_unbalanced(cost.float(), **kw)
    plan32 = sinkhorn_forward(c64.float(), r, c, eps, mass, max_iter, tol)
    assert plan32.dtype == torch.float32
    assert _rel(plan32, ref) < _fp32_bound(_rel(ref32, ref))


def test_sinkhorn_log_domain_forced_matches_scaling_domain():
    """The same problems through both paths (auto picks scaling at eps=0.05)."""
    cost = torch.rand(2, 6, 29, dtype=torch.float64)
    rows, cols = _masks(2, 6, 29)
    kw = dict(eps=0.05, mass=0.9, max_iter=25, tol=0.0, row_mask=rows, col_mask=cols)
    ref = reference.sinkhorn_unbalanced(cost, **kw)
    c64, r, c = _dev(cost, rows, cols)
    auto = sinkhorn_forward(c64, r, c, 0.05, 0.9, 25, 0.0, domain=0)
    log = sinkhorn_forward(c64, r, c, 0.05, 0.9, 25, 0.0, domain=1)
    assert _rel(auto, ref) < 1e-10 and _rel(log, ref) < 1e-10


def test_sinkhorn_public_api_batch_dims_and_half_precision():
    cost = torch.rand(2, 2, 4, 17, device=DEVICE)
    rows = torch.ones(2, 2, 4, dtype=torch.bool, device=DEVICE)
    rows[..., -1] = False
    kw = dict(eps=0.05, mass=0.9, max_iter=15, tol=0.0, row_mask=rows)
    plan = sinkhorn_unbalanced(cost, backend="triton", kernel_dtype="float32", **kw)
    ref = sinkhorn_unbalanced(cost.double(), backend="reference", **kw)
    assert plan.shape == cost.shape and plan.dtype == torch.float32
    assert _rel(plan, ref) < 1e-5
    # The default kernel_dtype="auto" stores float16 at m = 0.9 (bound 8.8e-3, docs/numerics.md).
    auto = sinkhorn_unbalanced(cost, backend="triton", **kw)
    assert 1e-5 < _rel(auto, ref) < 8.8e-3
    half = sinkhorn_unbalanced(cost.bfloat16(), backend="triton", **kw)
    assert half.dtype == torch.bfloat16
    assert _rel(half, ref) < 2e-2  # bf16 output rounding (the solve runs in float32)


# ---------------------------------------------------------------------------------------------
# 16-bit kernel storage (kernel_dtype), on chip and streamed

KERNEL16_CASES = [
    # (P, N, M, eps, mass, max_iter, tol, masked, span): cost entries in [0, span), or [1, 1 - span) if span < 0
    (2, 7, 37, 0.05, 0.9, 40, 0.0, True, 1.0),  # odd shape, padding both sides
    (2, 33, 301, 0.05, 0.8, 25, 0.0, True, 1.0),  # rows past a power of two
    (2, 1, 20, 0.05, 0.5, 20, 0.0, False, 1.0),  # N = 1
    (2, 5, 45, 0.05, 0.9, 40, 0.0, True, 1.035),  # T = 20.7: float16's smallest entries at its normal limit
    (2, 6, 33, 0.05, 0.9, 150, 1e-6, True, 1.0),  # early stop, per problem
    (2, 4, 19, 0.05, 0.01, 15, 0.0, True, 1.0),  # almost no transport
    (2, 6, 26, 0.05, 0.9, 30, 0.0, True, -1.0),  # costs in [1, 2): min C / eps = 20, plan entries ~1e-9
]


@pytest.mark.parametrize("kernel_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("p,n,m,eps,mass,max_iter,tol,masked,span", KERNEL16_CASES)
def test_sinkhorn_16bit_kernel_within_documented_bound(kernel_dtype, p, n, m, eps, mass, max_iter, tol, masked, span):
    """16-bit K (float32 sums and potentials) vs the float64 reference: every plan entry within
    ``kernel16_plan_error_bound`` (+ the tolerance: with tol > 0 the perturbed iteration may stop a
    few iterations earlier or later), and really 16-bit (error far above float32 storage's). The
    sweep is the on-chip one (sinkhorn_path's choice at these sizes); the streaming one differs only
    in its loads' cache policy (test_sinkhorn_16bit_on_chip_and_streaming_agree_bitwise)."""
    from pisces_fast.ops.triton.sinkhorn import KERNEL_CODES, kernel16_plan_error_bound, sinkhorn_path

    cost = abs(span) * torch.rand(p, n, m, dtype=torch.float64) + (1.0 if span < 0 else 0.0)
    rows, cols = _masks(p, n, m) if masked else (torch.ones(p, n, dtype=torch.bool), torch.ones(p, m, dtype=torch.bool))
    kw = dict(eps=eps, mass=mass, max_iter=max_iter, tol=tol, row_mask=rows, col_mask=cols)
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, return_potentials=True, **kw)
    valid = rows[:, :, None] & cols[:, None, :]
    c32, r, c = _dev(cost.float(), rows, cols)
    bound = kernel16_plan_error_bound(mass, kernel_dtype) + 4 * tol
    plan32 = sinkhorn_forward(c32, r, c, eps, mass, max_iter, tol, kernel_dtype="float32")
    err32 = _plan_entry_error(plan32, ref, valid)
    assert sinkhorn_path(n, m, torch.float32, kernel_dtype, mass, eps, DEVICE)["sweep"] in ("l1", "shared")
    plan, n_iter, storage = sinkhorn_forward(c32, r, c, eps, mass, max_iter, tol, kernel_dtype=kernel_dtype,
                                             return_n_iter=True, return_storage=True)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    assert storage.cpu().tolist() == [KERNEL_CODES[kernel_dtype]] * p
    assert bool((plan.cpu()[~valid] == 0).all())  # padding carries exactly zero mass
    err = _plan_entry_error(plan, ref, valid)
    assert err < bound, (err, bound)
    if tol == 0.0:
        assert torch.equal(n_iter.cpu(), ref_iter)
        if mass >= 0.5:  # the storage's rounding shows (m = 0.01 barely iterates: errors ~ u/100)
            assert err > 20 * err32, (err, err32)


@pytest.mark.parametrize("kernel_dtype", ["float32", "float16"])
def test_sinkhorn_stops_exactly_where_the_reference_does(kernel_dtype):
    """Algorithm 3's stopping rule pinned (stop keeps the previous potentials; n_iter counts accepted updates): with
    tol between two consecutive changes of the reference's potentials (tests/sinkhorn_checks.py) the kernel stops at the
    reference's iteration and returns the reference's plan at it (the other tests allow tol's slack)."""
    from pisces_fast.ops.triton.sinkhorn import kernel16_plan_error_bound
    from sinkhorn_checks import tol_between_changes

    cost = torch.rand(1, 12, 200, dtype=torch.float64)
    tol = tol_between_changes(cost, 0.05, 0.9)
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=100, tol=tol,
                                                        return_potentials=True)
    (c32,) = _dev(cost.float())
    plan, n_iter = sinkhorn_forward(c32, None, None, 0.05, 0.9, 100, tol, kernel_dtype=kernel_dtype,
                                    return_n_iter=True)
    assert int(n_iter[0]) == int(ref_iter[0])
    bound = kernel16_plan_error_bound(0.9, "float16") if kernel_dtype == "float16" else 1e-4
    assert _plan_entry_error(plan, ref, torch.ones(1, 12, 200, dtype=torch.bool)) < bound


def test_sinkhorn_bfloat16_kernel_at_the_scaling_domains_edge():
    """bfloat16 keeps float32's exponent range: T ~ 57 (eps = 0.0175, near SCALING_MAX_EXPONENT_FP32 =
    60, where float16 cannot store the kernel) still runs in 16 bits and within the bound."""
    from pisces_fast.ops.triton.sinkhorn import KERNEL_CODES, kernel16_plan_error_bound

    cost = torch.rand(2, 5, 70, dtype=torch.float64)
    rows, cols = _masks(2, 5, 70)
    kw = dict(eps=0.0175, mass=0.9, max_iter=30, tol=0.0, row_mask=rows, col_mask=cols)
    ref = reference.sinkhorn_unbalanced(cost, **kw)
    c32, r, c = _dev(cost.float(), rows, cols)
    plan, storage = sinkhorn_forward(c32, r, c, 0.0175, 0.9, 30, 0.0, kernel_dtype="bfloat16", return_storage=True)
    assert storage.cpu().tolist() == [KERNEL_CODES["bfloat16"]] * 2
    valid = rows[:, :, None] & cols[:, None, :]
    assert _plan_entry_error(plan, ref, valid) < kernel16_plan_error_bound(0.9, "bfloat16")


def test_sinkhorn_16bit_on_chip_and_streaming_agree_bitwise():
    """The on-chip path differs from the streaming one only in where the operand is cached."""
    cost = torch.rand(2, 9, 70, device=DEVICE)
    a = sinkhorn_forward(cost, None, None, 0.05, 0.9, 30, 0.0, kernel_dtype="float16", sweep="l1")
    b = sinkhorn_forward(cost, None, None, 0.05, 0.9, 30, 0.0, kernel_dtype="float16", sweep="stream")
    assert torch.equal(a, b)


@pytest.mark.parametrize("kernel_dtype", ["float32", "auto"])
def test_sinkhorn_two_pass_launch_matches_the_single_one(kernel_dtype):
    """The two-pass launch (scaling-domain problems first, the others deferred to a log-domain pass; on a
    GPU each pass has its own blocks) gives every problem the same plan (bitwise where the blocks are the
    same), iteration count and storage code as the single launch, on a batch that mixes float16, float32-scaling and log-domain problems,
    with masks; and the log-domain problems really took the second pass (within float32 of the reference)."""
    base = torch.rand(5, 7, 37, dtype=torch.float64)
    # T ~ 20 (float16 under auto), ~ 30 (float32 scaling), ~ 1000 (log), ~ 20, ~ 1000
    cost = torch.stack([base[0], 1.5 * base[1], 50.0 * base[2], base[3], 50.0 * base[4]])
    rows, cols = _masks(5, 7, 37)
    kw = dict(eps=0.05, mass=0.9, max_iter=25, tol=0.0, row_mask=rows, col_mask=cols)
    ref = reference.sinkhorn_unbalanced(cost, **kw)
    c32, r, c = _dev(cost.float(), rows, cols)
    one = sinkhorn_forward(c32, r, c, 0.05, 0.9, 25, 0.0, kernel_dtype=kernel_dtype, return_n_iter=True,
                           return_storage=True, two_pass=False)
    two = sinkhorn_forward(c32, r, c, 0.05, 0.9, 25, 0.0, kernel_dtype=kernel_dtype, return_n_iter=True,
                           return_storage=True, two_pass=True)
    # Same blocks under the interpreter: bitwise. On a GPU the scaling pass runs 4 warps where the single
    # launch runs 8, so its sums are reduced in another order: float32 rounding apart.
    if c32.is_cuda:
        assert _rel(two[0], one[0]) < 1e-5
    else:
        assert torch.equal(two[0], one[0])
    assert torch.equal(two[1], one[1]) and torch.equal(two[2], one[2])
    assert two[2].cpu().tolist()[2] == two[2].cpu().tolist()[4] == 1  # KERNEL_NATIVE, never left "deferred"
    assert _rel(two[0][[2, 4]], ref[[2, 4]]) < 1e-5
    with pytest.raises(ValueError, match="two_pass needs domain=0"):
        sinkhorn_forward(c32, r, c, 0.05, 0.9, 2, 0.0, domain=1, two_pass=True)


def test_sinkhorn_16bit_per_problem_choice_and_refusals():
    """auto: float16 per problem only where it applies (scaling domain, T <= 20.79), else float32 —
    recorded per problem; an explicit 16-bit request a problem cannot honour is a ValueError."""
    from pisces_fast.ops.triton.sinkhorn import KERNEL_CODES

    base = torch.rand(3, 6, 29, dtype=torch.float64)
    cost = torch.stack([base[0], 1.5 * base[1], 0.05 * base[2] / 1e-3])  # T ~ 20, ~30 (scaling), ~1000 (log)
    rows, cols = _masks(3, 6, 29)
    kw = dict(eps=0.05, mass=0.9, max_iter=40, tol=0.0, row_mask=rows, col_mask=cols)
    ref = reference.sinkhorn_unbalanced(cost, **kw)
    c32, r, c = _dev(cost.float(), rows, cols)
    plan, storage = sinkhorn_forward(c32, r, c, 0.05, 0.9, 40, 0.0, kernel_dtype="auto", return_storage=True)
    assert storage.cpu().tolist() == [KERNEL_CODES["float16"], KERNEL_CODES["float32"], KERNEL_CODES["float32"]]
    valid = rows[:, :, None] & cols[:, None, :]
    assert _plan_entry_error(plan[:1], ref[:1], valid[:1]) < 8.8e-3
    assert _rel(plan[1:], ref[1:]) < 1e-5  # the float32 paths, exact to float32 rounding
    plan, storage = sinkhorn_forward(c32[:2], r[:2], c[:2], 0.05, 0.9, 40, 0.0, kernel_dtype="bfloat16",
                                     return_storage=True)
    assert storage.cpu().tolist() == [KERNEL_CODES["bfloat16"]] * 2  # bfloat16 has float32's exponent range
    with pytest.raises(ValueError, match=r"kernel_dtype='float16' needs \(max C - min C\)/eps <= 20.79.*problem 1"):
        sinkhorn_forward(c32, r, c, 0.05, 0.9, 40, 0.0, kernel_dtype="float16")
    with pytest.raises(ValueError, match="kernel_dtype='bfloat16' needs the scaling-domain iteration.*problem 2"):
        sinkhorn_forward(c32, r, c, 0.05, 0.9, 40, 0.0, kernel_dtype="bfloat16")
    with pytest.raises(ValueError, match="needs float32 inputs"):
        sinkhorn_forward(c32.double(), r, c, 0.05, 0.9, 40, 0.0, kernel_dtype="float16")
    with pytest.raises(ValueError, match="scaling domain only"):
        tb.sinkhorn_unbalanced(c32, eps=0.05, mass=0.9, max_iter=1, tol=0.0, domain="log", kernel_dtype="bfloat16")
    # auto keeps float32 where the bound exceeds 1e-2 (m = 0.95) and for float64 inputs
    for mass, x in ((0.95, c32), (0.9, c32.double())):
        _, storage = sinkhorn_forward(x[:1], r[:1], c[:1], 0.05, mass, 5, 0.0, kernel_dtype="auto", return_storage=True)
        assert storage.cpu().tolist() == [KERNEL_CODES["float32"]]
    q = torch.rand(1, 1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="ot_attention cannot store the kernel matrix as kernel_dtype='float16'"):
        tb.ot_attention(q, q, q, torch.zeros(2, device=DEVICE), torch.zeros(2, 2, device=DEVICE), gamma=0.2, eta=0.2,
                        eps=0.05, mass=0.9, max_iter=1, tol=0.0, fuse_eps=1e-8, scale=1.0, kernel_dtype="float16")


def test_sinkhorn_16bit_public_api():
    cost = torch.rand(2, 3, 5, 31, device=DEVICE)
    kw = dict(eps=0.05, mass=0.9, max_iter=30, tol=0.0)
    ref = sinkhorn_unbalanced(cost.double(), backend="reference", **kw)
    for kd, bound in (("bfloat16", 7.3e-2), ("float16", 8.8e-3)):
        plan = sinkhorn_unbalanced(cost, backend="triton", kernel_dtype=kd, **kw)
        assert plan.shape == cost.shape and 1e-5 < _rel(plan, ref) < bound


def test_sinkhorn_on_chip_decision():
    """The on-chip path is chosen from the footprint, explicitly: the paper shape fits sm_90's budget
    and not sm_80's; wider problems stream; float32 storage never claims it."""
    from pisces_fast.ops.triton import sinkhorn as sk

    cpu = torch.device("cpu")
    paper = sk.sinkhorn_path(40, 2049, torch.float32, "auto", 0.9, 0.05, cpu)
    assert paper == dict(kernel16="float16", sweep="l1", footprint=40 * 2176 * 2 + 2 * 2176 * 4, why="not a CUDA device")
    assert paper["footprint"] > sk.ONCHIP_BYTES[8]
    assert sk.sinkhorn_path(40, 4097, torch.float32, "bfloat16", 0.9, 0.05, cpu)["sweep"] == "stream"
    assert sk.sinkhorn_path(40, 2049, torch.float32, "float32", 0.9, 0.05, cpu)["sweep"] is None
    assert sk.sinkhorn_path(40, 2049, torch.float32, "auto", 1.0, 0.05, cpu)["kernel16"] is None  # balanced: no bound


def test_kernel16_bound_is_the_cpp_backends():
    from pisces_fast.ops.triton.sinkhorn import kernel16_plan_error_bound, unbalanced_exponent

    if "cpp" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    from pisces_fast.ops import cpp

    for mass in (0.01, 0.5, 0.9, 0.95, 1.0):
        for kd in ("float32", "bfloat16", "float16"):
            want = cpp.kernel16_plan_error_bound(mass, kd)
            got = kernel16_plan_error_bound(unbalanced_exponent(0.05, mass), kd)
            assert got == pytest.approx(want, rel=1e-12) or (math.isinf(got) and math.isinf(want))


def test_sinkhorn_is_deterministic():
    cost = torch.rand(2, 5, 40, device=DEVICE)
    a = sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=12, tol=0.0, backend="triton")
    b = sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=12, tol=0.0, backend="triton")
    assert torch.equal(a, b)


def test_backend_module_rejects_what_it_cannot_run():
    with pytest.raises(TypeError, match="float32/float64"):
        tb.sinkhorn_unbalanced(torch.rand(1, 2, 3).half(), eps=0.05, mass=0.9, max_iter=1, tol=0.0)
    with pytest.raises(ValueError, match="at most 1024 rows"):
        tb.sinkhorn_unbalanced(torch.rand(1, 1025, 2), eps=0.05, mass=0.9, max_iter=1, tol=0.0)
    q = torch.rand(1, 1, 2, 200)
    with pytest.raises(ValueError, match="head dims up to 128"):
        tb.ot_attention(q, q, q, torch.zeros(2), torch.zeros(2, 2), gamma=0.2, eta=0.2, eps=0.05, mass=0.9,
                        max_iter=1, tol=0.0, fuse_eps=1e-8, scale=1.0)


# ---------------------------------------------------------------------------------------------
# OT attention

ATTN_CASES = [
    # (B, H, N, D, Dv, (frames, height, width, prefix), eps, mass, max_iter, tol, key_mask, query_mask)
    (1, 2, 5, 16, 16, (2, 3, 4, 1), 0.05, 0.9, 20, 0.0, False, False),  # prefix token, M = 25
    (2, 1, 6, 8, 11, (2, 3, 3, 1), 0.05, 0.9, 60, 1e-4, True, True),  # padding both sides, early stop
    (1, 1, 1, 8, 8, (1, 4, 5, 0), 1e-3, 0.9, 15, 0.0, True, False),  # N = 1, one frame, log domain
    (1, 2, 4, 16, 16, (3, 2, 3, 0), 1.0, 1.0, 15, 0.0, False, True),  # large eps, balanced
    (1, 1, 3, 8, 8, (2, 2, 2, 0), 0.05, 0.01, 15, 0.0, False, False),  # mass 0.01
    (1, 1, 3, 8, 8, (1, 1, 1, 0), 0.05, 0.9, 5, 0.0, False, False),  # M = 1: every component constant
]


def _attn_inputs(b, h, n, d, dv, grid, key_mask, query_mask):
    frames, height, width, prefix = grid
    m = prefix + frames * height * width
    frame_idx, coords = video_token_positions(frames, height, width, prefix_tokens=prefix, dtype=torch.float64)
    q = torch.randn(b, h, n, d, dtype=torch.float64)
    k = torch.randn(b, h, m, d, dtype=torch.float64)
    v = torch.randn(b, h, m, dv, dtype=torch.float64)
    kpm = qpm = None
    if key_mask:
        kpm = torch.rand(b, m) > 0.3
        kpm[:, 0] = True
    if query_mask:
        qpm = torch.rand(b, n) > 0.3
        qpm[:, -1] = True
    return q, k, v, frame_idx, coords, kpm, qpm


def _reference_fwd_bwd(q, k, v, fi, co, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, plan = reference.ot_attention(*leaves, fi, co, **kw)
    (out * dout).sum().backward()
    return out.detach(), plan, [t.grad for t in leaves]


def _triton_fwd_bwd(q, k, v, fi, co, dout, dtype, **kw):
    kw = dict(kw)
    kpm, qpm = _dev(kw.pop("key_padding_mask"), kw.pop("query_padding_mask"))
    leaves = [t.detach().to(device=DEVICE, dtype=dtype).clone().requires_grad_() for t in (q, k, v)]
    fi, co = _dev(fi.to(dtype), co.to(dtype))
    out, plan = tb.ot_attention(*leaves, fi, co, key_padding_mask=kpm, query_padding_mask=qpm, **kw)
    assert not plan.requires_grad  # the plan is a detached prior
    (out * dout.to(device=DEVICE, dtype=dtype)).sum().backward()
    return out.detach(), plan, [t.grad for t in leaves]


@pytest.mark.parametrize("b,h,n,d,dv,grid,eps,mass,max_iter,tol,key_mask,query_mask", ATTN_CASES)
def test_ot_attention_matches_reference(b, h, n, d, dv, grid, eps, mass, max_iter, tol, key_mask, query_mask):
    _check_attention(b, h, n, d, dv, grid, eps, mass, max_iter, tol, key_mask, query_mask)


@pytest.mark.parametrize("rows,stats_rows", [(16, 16), (16, 32), (32, 16)])
def test_ot_attention_several_row_and_key_blocks(rows, stats_rows):
    """Small tiles force 2 row blocks (range partials combined across blocks, dq per row block) in the stats /
    cost or the fuse / backward kernels or both, and 3 key blocks (dk/dv per key block) — the interpreter
    otherwise runs whole-problem tiles. The stats /
    cost kernels' row blocks (whose partials the solve combines) may differ from the other kernels' (the
    GPU runs 64-row stats / cost blocks and 32-row fuse / backward blocks where heads are <= 64 wide)."""
    with force_blocks(rows=rows, cols=16, stats_rows=stats_rows):
        _check_attention(2, 1, 20, 16, 8, (2, 3, 6, 1), 0.05, 0.9, 15, 0.0, True, True)


def _check_attention(b, h, n, d, dv, grid, eps, mass, max_iter, tol, key_mask, query_mask):
    q, k, v, fi, co, kpm, qpm = _attn_inputs(b, h, n, d, dv, grid, key_mask, query_mask)
    kw = dict(gamma=0.2, eta=0.3, eps=eps, mass=mass, max_iter=max_iter, tol=tol, fuse_eps=1e-8,
              scale=1.0 / math.sqrt(d), key_padding_mask=kpm, query_padding_mask=qpm)
    dout = torch.randn(b, h, n, dv, dtype=torch.float64)
    out_ref, plan_ref, grads_ref = _reference_fwd_bwd(q, k, v, fi, co, dout, **kw)

    out, plan, grads = _triton_fwd_bwd(q, k, v, fi, co, dout, torch.float64, **kw)
    assert _rel(out, out_ref) < 1e-10
    assert _rel(plan, plan_ref) < 1e-10
    # Gradients: relative to |dout|·|v|-sized intermediates, not to the gradient itself, which can be
    # tiny (e.g. where the plan dominates the fusion); 1e-10 of O(1) terms is float64 rounding.
    for g, g_ref in zip(grads, grads_ref):
        assert float((g.cpu() - g_ref).abs().max()) < 1e-10 * max(1.0, float(g_ref.abs().max()))
    if qpm is not None:
        assert bool((out.cpu()[~qpm[:, None, :].expand(b, h, n)] == 0).all())  # padded queries output 0
    if kpm is not None:
        padded = ~kpm[:, None, :].expand(b, h, -1)
        assert bool((plan.cpu().transpose(-1, -2)[padded] == 0).all())
        assert bool((grads[1].cpu()[padded] == 0).all()) and bool((grads[2].cpu()[padded] == 0).all())

    # float32 inputs vs the float64 reference, judged against the float32 reference's own error.
    out32_ref, plan32_ref, grads32_ref = _reference_fwd_bwd(
        q.float(), k.float(), v.float(), fi.float(), co.float(), dout.float(), **kw
    )
    out32, plan32, grads32 = _triton_fwd_bwd(q, k, v, fi, co, dout, torch.float32, **kw)
    assert out32.dtype == torch.float32
    assert _rel(out32, out_ref) < _fp32_bound(_rel(out32_ref, out_ref))
    assert _rel(plan32, plan_ref) < _fp32_bound(_rel(plan32_ref, plan_ref))
    for g, g32_ref, g_ref in zip(grads32, grads32_ref, grads_ref):
        scale = max(1.0, float(g_ref.abs().max()))
        ref_err = float((g32_ref.double() - g_ref).abs().max()) / scale
        assert float((g.cpu().double() - g_ref).abs().max()) / scale < _fp32_bound(ref_err)


def test_ot_attention_log_domain_forced_matches():
    q, k, v, fi, co, kpm, qpm = _attn_inputs(1, 2, 4, 8, 8, (2, 2, 3, 1), True, True)
    kw = dict(gamma=0.2, eta=0.2, eps=0.05, mass=0.9, max_iter=20, tol=0.0, fuse_eps=1e-8, scale=0.3,
              key_padding_mask=kpm, query_padding_mask=qpm)
    out_ref, plan_ref = reference.ot_attention(q, k, v, fi, co, **kw)
    args = [*_dev(q, k, v, fi, co, kpm, qpm), 0.2, 0.2, 0.05, 0.9, 20, 0.0, 1e-8, 0.3, True]
    out, plan, *_ = ot_attention_forward(*args, domain=1)
    assert _rel(out, out_ref) < 1e-10 and _rel(plan, plan_ref) < 1e-10


def test_ot_attention_public_api_and_return_plan():
    q, k, v, fi, co, kpm, qpm = _attn_inputs(2, 2, 3, 8, 8, (2, 2, 2, 1), True, True)
    q, k, v, fi, co, kpm, qpm = _dev(q.float(), k.float(), v.float(), fi.float(), co.float(), kpm, qpm)
    kw = dict(max_iter=12, tol=0.0, key_padding_mask=kpm, query_padding_mask=qpm)
    out_only = ot_attention(q, k, v, fi, co, backend="triton", **kw)
    out, plan = ot_attention(q, k, v, fi, co, backend="triton", return_plan=True, **kw)
    assert isinstance(out_only, torch.Tensor) and out_only.shape == (2, 2, 3, 8)
    assert torch.equal(out_only, out)
    assert plan.shape == (2, 2, 3, k.shape[2]) and not plan.requires_grad
    # The backend skips materializing the plan when it is not asked for.
    out_np, plan_np = tb.ot_attention(q, k, v, fi, co, gamma=0.2, eta=0.2, eps=0.05, mass=0.9, max_iter=12, tol=0.0,
                                      fuse_eps=1e-8, scale=1 / math.sqrt(8), key_padding_mask=kpm,
                                      query_padding_mask=qpm, return_plan=False)
    assert plan_np is None and torch.equal(out_np, out)
    # bf16 inputs: the API upcasts, the output comes back in bf16.
    out_bf16 = ot_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), fi, co, backend="triton", **kw)
    assert out_bf16.dtype == torch.bfloat16
    assert _rel(out_bf16, out) < 5e-2


def test_ot_attention_is_deterministic():
    q, k, v, fi, co, kpm, qpm = _attn_inputs(1, 2, 4, 8, 8, (2, 2, 3, 0), True, False)
    q, k, v, fi, co, kpm = _dev(q.float(), k.float(), v.float(), fi.float(), co.float(), kpm)
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, plan = ot_attention(*leaves, fi, co, max_iter=10, tol=0.0, key_padding_mask=kpm, return_plan=True,
                                 backend="triton")
        out.square().sum().backward()
        results.append([out.detach(), plan] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# torch.library registration: fake implementations, opcheck, torch.compile


def _tiny_attention_args(requires_grad=False):
    q, k, v, fi, co, kpm, qpm = _attn_inputs(1, 1, 2, 16, 16, (1, 2, 2, 1), True, True)
    q, k, v, fi, co, kpm, qpm = _dev(q.float(), k.float(), v.float(), fi.float(), co.float(), kpm, qpm)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return (q, k, v, fi, co, kpm, qpm, 0.2, 0.2, 0.05, 0.9, 3, 0.0, 1e-8, 0.25, True)


def test_fake_implementations_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _tiny_attention_args()
    real = torch.ops.pisces_fast.triton_ot_attention(*args)
    cost = torch.rand(2, 3, 5, device=DEVICE)
    real_plan = torch.ops.pisces_fast.triton_sinkhorn(cost, None, None, 0.05, 0.9, 3, 0.0)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.pisces_fast.triton_ot_attention(*fake_args)
        fake_plan = torch.ops.pisces_fast.triton_sinkhorn(mode.from_tensor(cost), None, None, 0.05, 0.9, 3, 0.0)
        dq, dk, dv = torch.ops.pisces_fast.triton_ot_attention_backward(
            fake[0], *fake_args[:7], fake[0], fake[2], fake[3], fake[4], fake[5], 0.2, 0.2, 0.05, 1e-8, 0.25
        )
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype
    assert real_plan.shape == fake_plan.shape and real_plan.dtype == fake_plan.dtype
    assert dq.shape == args[0].shape and dk.shape == args[1].shape and dv.shape == args[2].shape


def test_opcheck_custom_ops():
    cost = torch.rand(1, 2, 5, device=DEVICE)
    torch.library.opcheck(
        torch.ops.pisces_fast.triton_sinkhorn.default, (cost, None, None, 0.05, 0.9, 3, 0.0),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.pisces_fast.triton_ot_attention.default, _tiny_attention_args(requires_grad=True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_compile_traces_forward_and_backward():
    """The custom ops trace (fake impls + registered autograd) inside a compiled graph."""
    torch._dynamo.reset()
    args = list(_tiny_attention_args(requires_grad=True))

    def loss_fn(q, k, v):
        out = torch.ops.pisces_fast.triton_ot_attention(q, k, v, *args[3:])[0]
        return (out * out).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(*args[:3])
    grads = torch.autograd.grad(loss, args[:3])
    loss_eager = loss_fn(*args[:3])
    grads_eager = torch.autograd.grad(loss_eager, args[:3])
    assert torch.equal(loss, loss_eager)
    for g, ge in zip(grads, grads_eager):
        assert torch.equal(g, ge)


# ---------------------------------------------------------------------------------------------
# GPU only


@gpu_only
def test_triton_is_the_auto_backend_on_cuda():
    assert "triton" in available_backends(torch.device("cuda"))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ot_attention_paper_shape_on_gpu(dtype):
    """Paper-sized problems (40 text tokens, 8x16x16 + 1 video tokens, D = 64) with padding.

    The float64 reference runs on the same (dtype-rounded) inputs, so the comparison measures the
    kernels, not the input quantization: bf16 inputs are upcast and computed in float32.
    """
    b, h, n, d = 2, 4, 40, 64
    fi, co = video_token_positions(8, 16, 16, prefix_tokens=1, dtype=torch.float64, device="cuda")
    m = fi.shape[0]
    q, k, v = (torch.randn(b, h, s, d, device="cuda").to(dtype) for s in (n, m, m))
    kpm = torch.ones(b, m, dtype=torch.bool, device="cuda")
    kpm[1, -300:] = False
    qpm = torch.ones(b, n, dtype=torch.bool, device="cuda")
    qpm[0, 30:] = False
    kw = dict(max_iter=100, tol=0.0, key_padding_mask=kpm, query_padding_mask=qpm, return_plan=True)
    dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.float64)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref, plan_ref = ot_attention(*leaves, fi, co, backend="reference", **kw)
    (out_ref * dout).sum().backward()
    grads_ref = [t.grad for t in leaves]

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, plan = ot_attention(*leaves, fi.float(), co.float(), backend="triton", **kw)
    (out.float() * dout.float()).sum().backward()
    out_tol = 2e-4 if dtype == torch.float32 else 1e-2  # bf16: the output itself is rounded to bf16
    assert _rel(out, out_ref) < out_tol
    assert _rel(plan, plan_ref) < (1e-3 if dtype == torch.float32 else 1e-2)
    for g, g_ref in zip((t.grad for t in leaves), grads_ref):
        assert _rel(g, g_ref) < (1e-3 if dtype == torch.float32 else 1e-2)


@gpu_only
def test_sinkhorn_large_batch_on_gpu():
    cost = torch.rand(64, 40, 2049, device="cuda", dtype=torch.float64)
    rows, cols = _masks(64, 40, 2049)
    rows, cols = rows.cuda(), cols.cuda()
    kw = dict(eps=0.05, mass=0.9, max_iter=100, tol=1e-6, row_mask=rows, col_mask=cols)
    ref = sinkhorn_unbalanced(cost, backend="reference", **kw)
    assert _rel(sinkhorn_unbalanced(cost, backend="triton", **kw), ref) < 1e-9
    assert _rel(sinkhorn_unbalanced(cost.float(), backend="triton", kernel_dtype="float32", **kw), ref) < 1e-4


@gpu_only
def test_sinkhorn_16bit_on_chip_paper_shape_on_gpu():
    """The paper shape through the on-chip and the streaming 16-bit sweeps: within the documented
    bound of the float64 reference, and bitwise equal to each other (only the cache policy differs)."""
    from pisces_fast.ops.triton.sinkhorn import kernel16_plan_error_bound, sinkhorn_path

    cost = torch.rand(16, 40, 2049, device="cuda", dtype=torch.float64)
    rows, cols = _masks(16, 40, 2049)
    rows, cols = rows.cuda(), cols.cuda()
    ref = reference.sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=100, tol=0.0, row_mask=rows, col_mask=cols)
    valid = (rows[:, :, None] & cols[:, None, :]).cpu()
    print(sinkhorn_path(40, 2049, torch.float32, "float16", 0.9, 0.05, cost.device))
    for kd in ("float16", "bfloat16"):
        on = sinkhorn_forward(cost.float(), rows, cols, 0.05, 0.9, 100, 0.0, kernel_dtype=kd, sweep="l1")
        off = sinkhorn_forward(cost.float(), rows, cols, 0.05, 0.9, 100, 0.0, kernel_dtype=kd, sweep="stream")
        assert torch.equal(on, off)
        assert _plan_entry_error(on, ref, valid) < kernel16_plan_error_bound(0.9, kd)

# Compilation for sm_80 / sm_90a without a GPU (registers, spills, shared memory): tests/test_triton_compile.py.


def test_tuning_traffic_model_counts_each_tensor_once(monkeypatch):
    """benchmarks/triton_tuning.py's per-kernel GB/s: compulsory bytes by hand at the paper's shape, the solve
    streaming the padded operand that ot_attention_forward lays out (solve_layout), once per iteration."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import triton_tuning as tt
    from pisces_fast.ops.triton.attention import solve_layout

    p, n, m, d, iters = 640, 40, 2049, 64, 100
    ms = solve_layout(n, m, torch.float32, torch.device("cuda"), scaling=True)[3]
    assert ms % 16 == 0 and m <= ms < m + 256
    got = tt.kernel_bytes(p, n, m, d, ms, iters)
    assert got["_attn_stats_kernel"] == 4 * p * (n + m) * d
    assert got["_attn_solve_kernel"] == 4 * (iters * p * n * ms + p * m)
    q, kv, row = p * n * d, p * m * d, p * m  # q-sized (q, out, dout, dq, y), k/v-sized, one value per key
    assert got["_attn_cost_kernel"] == 4 * (q + kv + p * n * ms)
    assert got["_attn_fuse_kernel"] == 4 * (q + 2 * kv + row + 2 * q)  # reads q, k, v, log v; writes out, y
    assert got["_attn_bwd_dq_kernel"] == 4 * (q + 2 * kv + row + 3 * q + q)  # + dout, out, y; writes dq
    assert got["_attn_bwd_dkdv_kernel"] == 4 * (q + 4 * kv + row + q)  # q, k, v, log v, dout; writes dk, dv
    rates = tt.with_bandwidth({"_attn_stats_kernel": 2.0, "other": 1.0}, got)
    assert rates["_attn_stats_kernel_GBps"] == round(got["_attn_stats_kernel"] / 2e-3 / 1e9)
    assert "other_GBps" not in rates
