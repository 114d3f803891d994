"""The on-chip Sinkhorn kernel (pisces_fast/ops/cuda/sinkhorn_onchip.cu, compiled with NVRTC).

Without a GPU: it compiles for sm_80 and sm_90a at every row count it serves, with no register spill and
within the shared memory of the paper shape (NVRTC alone, no driver needed; CI installs the
nvidia-cuda-nvrtc wheel for this). On a GPU: it reproduces the float64 reference within the documented
16-bit bound, agrees with the Triton 16-bit sweep it replaces (same iteration, other summation order),
defers exactly the problems the Triton first pass defers, and launches inside a CUDA graph.
"""
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pisces_fast.ops import reference  # noqa: E402
from pisces_fast.ops.backends import triton_available  # noqa: E402
from pisces_fast.ops.cuda import nvrtc  # noqa: E402
from pisces_fast.ops.cuda import sinkhorn as cs  # noqa: E402
from sinkhorn_checks import plan_entry_error as _plan_entry_error  # noqa: E402
from sinkhorn_checks import random_masks as _masks  # noqa: E402
from sinkhorn_checks import tol_between_changes  # noqa: E402

CUDA = torch.cuda.is_available()


def _nvrtc_missing():
    try:
        nvrtc.nvrtc_library()
    except nvrtc.NvrtcUnavailable as exc:
        return str(exc)
    return None


# CI installs NVRTC and sets PISCES_FAST_REQUIRE_NVRTC=1: there a missing library fails instead of skipping.
needs_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None and os.environ.get("PISCES_FAST_REQUIRE_NVRTC") != "1",
                                 reason="no NVRTC library (pip install nvidia-cuda-nvrtc-cu12)")
gpu_only = pytest.mark.skipif(not (CUDA and triton_available()), reason="needs a CUDA device and triton")

# H100 / H200 opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KB.
SM90_SHARED_OPTIN = 232448


def test_shared_memory_layout_fits_the_paper_shape():
    """40 x 2049 (the paper's text x video tokens) fits one Hopper CTA; the bytes are what the kernel carves."""
    need = cs.shared_bytes(40, 2049)
    assert need == 2049 * 40 * 2 + (8 * 40 + 2 * 40 + 8 + 8) * 4 + 2 * 2049 * 4
    assert need <= SM90_SHARED_OPTIN
    assert cs.shared_bytes(48, 2049) <= SM90_SHARED_OPTIN < cs.shared_bytes(56, 2049)
    assert cs.rows_per_column(1) == 8 and cs.rows_per_column(40) == 40 and cs.rows_per_column(41) == 48
    assert cs.availability(40, 2049, torch.device("cpu")) == (False, "not a CUDA device")


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("bf16", [False, True])
def test_onchip_kernel_compiles_without_spills(arch, bf16, tmp_path, monkeypatch):
    """Every row count R = 8 .. 64 builds; ptxas reports no stack frame and no spill, and registers within
    the 255 that one 256-thread CTA per SM allows."""
    monkeypatch.setenv("PISCES_FAST_CACHE_DIR", str(tmp_path))  # compiled here, not read from a user's cache
    nvrtc.compile_cubin.cache_clear()
    for n in range(8, cs.MAX_ROWS + 1, 8):
        cubin, lowered, log = nvrtc.compile_cubin(cs.SOURCE, cs.kernel_name(n, bf16), arch)
        assert len(cubin) > 0 and "sinkhorn_onchip" in lowered
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in log, log
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        assert regs <= 255, log
        assert "warning" not in log.lower(), log


@needs_nvrtc
def test_compiled_kernels_are_cached_on_disk(tmp_path, monkeypatch):
    """A second process (here: the per-process cache cleared) loads the cubin from disk; a corrupted entry is
    recompiled, never loaded; PISCES_FAST_CACHE_DIR="" turns the disk cache off."""
    monkeypatch.setenv("PISCES_FAST_CACHE_DIR", str(tmp_path))
    nvrtc.compile_cubin.cache_clear()
    name = cs.kernel_name(8, False)
    first = nvrtc.compile_cubin(cs.SOURCE, name, "sm_80")
    cubins = list((tmp_path / "nvrtc").glob("*.cubin"))
    assert len(cubins) == 1 and cubins[0].read_bytes() == first[0]
    nvrtc.compile_cubin.cache_clear()
    monkeypatch.setattr(nvrtc, "_compile", lambda *a: pytest.fail("compiled although cached"))
    assert nvrtc.compile_cubin(cs.SOURCE, name, "sm_80") == first
    cubins[0].write_bytes(first[0][:100])  # truncated: the hash no longer matches
    nvrtc.compile_cubin.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("PISCES_FAST_CACHE_DIR", str(tmp_path))
    again = nvrtc.compile_cubin(cs.SOURCE, name, "sm_80")  # NVRTC's output differs in a few bytes per compile
    assert again[1] == first[1] and len(again[0]) == len(first[0]) and cubins[0].read_bytes() == again[0]
    monkeypatch.setenv("PISCES_FAST_CACHE_DIR", "")
    assert nvrtc.cache_dir() is None
    nvrtc.compile_cubin.cache_clear()


@needs_nvrtc
def test_availability_rules(monkeypatch):
    """The host-side decision, with a Hopper's limits stubbed in (no GPU needed): fits or not, why, and a kernel
    that does not build is reported (or an error under PISCES_FAST_CUDA_ONCHIP=1), never launched."""
    monkeypatch.setattr(cs, "_shared_limit", lambda index: SM90_SHARED_OPTIN)
    monkeypatch.setattr(nvrtc, "device_arch", lambda device: "sm_90a")
    monkeypatch.setattr(torch.version, "hip", None)
    cs._build_problem.cache_clear()
    gpu = torch.device("cuda", 0)
    assert cs.availability(40, 2049, gpu) == (True, "shared memory")
    assert cs.availability(65, 100, gpu) == (False, "N = 65 > 64 rows")
    ok, why = cs.availability(40, 4097, gpu)
    assert not ok and "shared memory per CTA" in why
    monkeypatch.setenv(cs.ENV, "0")
    assert cs.availability(40, 2049, gpu) == (False, f"{cs.ENV}=0")

    def broken(*args, **kwargs):
        raise RuntimeError("NVRTC could not compile it for sm_99\nerror: unknown architecture")

    monkeypatch.setattr(nvrtc, "compile_cubin", broken)
    cs._build_problem.cache_clear()
    monkeypatch.setenv(cs.ENV, "auto")
    assert cs.availability(8, 100, gpu) == (False, "NVRTC could not build it: NVRTC could not compile it for sm_99")
    monkeypatch.setenv(cs.ENV, "1")
    with pytest.raises(RuntimeError, match="PISCES_FAST_CUDA_ONCHIP=1 but the on-chip kernel cannot be built"):
        cs.availability(8, 100, gpu)
    monkeypatch.setattr(torch.version, "hip", "6.0")
    cs._build_problem.cache_clear()
    monkeypatch.setenv(cs.ENV, "auto")
    assert cs.availability(8, 100, gpu) == (False, "ROCm: the on-chip kernel is CUDA C++")
    cs._build_problem.cache_clear()


def test_bad_sweep_and_launch_arguments_are_errors():
    """sweep names where a 16-bit kernel lives: asking for one where none is stored, or for the CUDA kernel where
    it cannot run, is an error naming why; so are CTA sizes the kernel cannot use."""
    if not triton_available():
        pytest.skip("triton is not installed")
    from pisces_fast.ops.triton.sinkhorn import sinkhorn_forward

    cost = torch.rand(2, 5, 30, device="cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="sweep must be None or one of"):
        sinkhorn_forward(cost, None, None, 0.05, 0.9, 5, 0.0, kernel_dtype="float16", sweep="smem")
    for sweep in ("shared", "stream"):
        with pytest.raises(ValueError, match="this launch stores none"):
            sinkhorn_forward(cost, None, None, 0.05, 0.9, 5, 0.0, kernel_dtype="float32", sweep=sweep)
    if not CUDA:
        with pytest.raises(ValueError, match="sweep='shared' cannot run this launch: not a CUDA device"):
            sinkhorn_forward(cost, None, None, 0.05, 0.9, 5, 0.0, kernel_dtype="float16", sweep="shared")
    plan = torch.empty_like(cost)
    ints = torch.empty(2, dtype=torch.int32)
    for threads in (100, 2048, 0):
        with pytest.raises(ValueError, match="threads must be whole warps"):
            cs.sinkhorn_onchip(cost, plan, None, None, cost, ints, ints, 5, False, threads=threads)
    with pytest.raises(ValueError, match="threads must be whole warps"):
        cs.sinkhorn_onchip(torch.rand(2, 40, 30), plan, None, None, cost, ints, ints, 5, False, threads=32)
    with pytest.raises(ValueError, match="max_iter must be in"):
        cs.sinkhorn_onchip(cost, plan, None, None, cost, ints, ints, 2 ** 31, False)


def test_bad_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv(cs.ENV, "yes")
    with pytest.raises(ValueError, match="PISCES_FAST_CUDA_ONCHIP"):
        cs.mode()


# --------------------------------------------------------------------------------------------- GPU

def _require_shared(n, m):
    """Skip (not fail) on GPUs whose shared memory cannot hold the problem (an A100 at the paper shape)."""
    ok, why = cs.availability(n, m, torch.device("cuda"))
    if not ok:
        pytest.skip(f"the on-chip kernel cannot run {n} x {m} here: {why}")


CASES = [
    # (P, N, M, eps, mass, max_iter, tol, masked)
    (3, 1, 1, 0.05, 0.9, 20, 0.0, False),
    (4, 7, 33, 0.05, 0.9, 40, 0.0, True),
    (3, 40, 2049, 0.05, 0.9, 100, 0.0, True),  # the paper shape
    (2, 57, 300, 0.05, 0.8, 30, 0.0, True),  # R = 64 with 7 padding rows
    (3, 64, 1000, 0.05, 0.5, 30, 0.0, False),
    (5, 6, 33, 0.05, 0.9, 150, 1e-6, True),  # early stop, per problem
    (2, 16, 257, 0.05, 0.01, 15, 0.0, True),  # almost no transport
]


@gpu_only
@pytest.mark.parametrize("kernel_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("p,n,m,eps,mass,max_iter,tol,masked", CASES)
def test_shared_sweep_matches_reference_and_triton_sweep(kernel_dtype, p, n, m, eps, mass, max_iter, tol, masked):
    from pisces_fast.ops.triton.sinkhorn import KERNEL_CODES, kernel16_plan_error_bound, sinkhorn_forward, sinkhorn_path

    _require_shared(n, m)
    assert sinkhorn_path(n, m, torch.float32, kernel_dtype, mass, eps, torch.device("cuda"))["sweep"] == "shared"
    cost = torch.rand(p, n, m, dtype=torch.float64)
    rows, cols = _masks(p, n, m) if masked else (torch.ones(p, n, dtype=torch.bool), torch.ones(p, m, dtype=torch.bool))
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, eps=eps, mass=mass, max_iter=max_iter, tol=tol,
                                                        row_mask=rows, col_mask=cols, return_potentials=True)
    valid = rows[:, :, None] & cols[:, None, :]
    c32, r, c = cost.float().cuda(), rows.cuda(), cols.cuda()
    out = {}
    for sweep in ("shared", "stream"):
        out[sweep] = sinkhorn_forward(c32, r, c, eps, mass, max_iter, tol, kernel_dtype=kernel_dtype, sweep=sweep,
                                      return_n_iter=True, return_storage=True)
    plan, n_iter, storage = out["shared"]
    assert storage.cpu().tolist() == [KERNEL_CODES[kernel_dtype]] * p
    assert bool((plan.cpu()[~valid] == 0).all())
    bound = kernel16_plan_error_bound(mass, kernel_dtype) + 4 * tol
    assert _plan_entry_error(plan, ref, valid) < bound
    if tol == 0.0:
        assert torch.equal(n_iter.cpu(), ref_iter)
    else:
        assert (n_iter.cpu() - out["stream"][1].cpu()).abs().max() <= 3
    # Same iteration and storage as the Triton sweep: only the float32 summation order differs.
    assert _plan_entry_error(plan, out["stream"][0].double().cpu(), valid) < (1e-4 if tol == 0.0 else bound)


@gpu_only
def test_shared_sweep_defers_what_the_triton_pass_defers():
    """Per problem: float16 range exceeded (T = 40) and log domain (T = 100) go to the log-domain pass, the
    others stay in 16 bits; every plan within the float16 bound / float32 accuracy of the reference."""
    from pisces_fast.ops.triton.sinkhorn import KERNEL_CODES, kernel16_plan_error_bound, sinkhorn_forward

    p, n, m, eps = 4, 9, 130, 0.05
    _require_shared(n, m)
    cost = torch.rand(p, n, m, dtype=torch.float64)
    cost[1] *= 2.0   # T = 40 > FLOAT16_MAX_RANGE
    cost[2] *= 5.0   # T = 100 > SCALING_MAX_EXPONENT: log domain
    ref = reference.sinkhorn_unbalanced(cost, eps=eps, mass=0.9, max_iter=50, tol=0.0)
    c32 = cost.float().cuda()
    a, ia, sa = sinkhorn_forward(c32, None, None, eps, 0.9, 50, 0.0, kernel_dtype="auto", sweep="shared",
                                 return_n_iter=True, return_storage=True)
    b, ib, sb = sinkhorn_forward(c32, None, None, eps, 0.9, 50, 0.0, kernel_dtype="auto", sweep="stream",
                                 return_n_iter=True, return_storage=True)
    assert sa.tolist() == sb.tolist() == [KERNEL_CODES["float16"], 1, 1, KERNEL_CODES["float16"]]
    assert ia.tolist() == ib.tolist() == [50] * p
    valid = torch.ones(1, n, m, dtype=torch.bool)
    for i in range(p):
        if sa[i] == KERNEL_CODES["float16"]:
            assert _plan_entry_error(a[i:i + 1], ref[i:i + 1], valid) < kernel16_plan_error_bound(0.9, "float16")
        else:  # float32 log domain: entries down to e^-100 are below float32's normal range, so relative to the max
            err = float((a[i].double().cpu() - ref[i]).abs().max() / ref[i].abs().max())
            assert err < 1e-5, err
    assert torch.equal(a[1:3], b[1:3])  # the deferred problems ran the same Triton log-domain pass


@gpu_only
def test_shared_sweep_fully_masked_problem_has_zero_plan():
    from pisces_fast.ops.triton.sinkhorn import sinkhorn_forward

    _require_shared(5, 40)
    full = torch.rand(3, 40, 5, device="cuda")
    cost = full.transpose(1, 2)  # not contiguous: the launcher makes it so
    rows = torch.ones(3, 5, dtype=torch.bool, device="cuda")
    cols = torch.ones(3, 40, dtype=torch.bool, device="cuda")
    rows[1] = False
    cols[2] = False
    plan, n_iter = sinkhorn_forward(cost, rows, cols, 0.05, 0.9, 20, 0.0, kernel_dtype="float16", sweep="shared",
                                    return_n_iter=True)
    ref = sinkhorn_forward(cost, rows, cols, 0.05, 0.9, 20, 0.0, kernel_dtype="float16", sweep="stream")
    assert torch.isfinite(plan[0]).all() and plan[0].sum() > 0
    assert bool((plan[1:] == 0).all()) and bool((ref[1:] == 0).all())
    assert int(n_iter[0]) == 20


@gpu_only
def test_shared_sweep_runs_inside_a_cuda_graph():
    """The launch goes to PyTorch's current stream with no host sync: capturable, and replay recomputes
    (kernel_dtype="auto": an explicit 16-bit request reads the storage codes back to raise on a fallback)."""
    from pisces_fast.ops.triton.sinkhorn import sinkhorn_forward

    _require_shared(40, 2049)
    cost = torch.rand(8, 40, 2049, device="cuda")
    run = lambda: sinkhorn_forward(cost, None, None, 0.05, 0.9, 50, 0.0, kernel_dtype="auto", sweep="shared")  # noqa: E731
    eager = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up: compile and load outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    cost.copy_(torch.rand_like(cost))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, run()) and not torch.equal(captured, eager)


@gpu_only
def test_shared_sweep_stops_exactly_where_the_reference_does():
    """Algorithm 3's rule (stop keeps the previous potentials; n_iter counts accepted updates), pinned: tol is put
    halfway (geometrically) between two consecutive changes of the float64 reference's potentials
    (tests/sinkhorn_checks.py), so the kernel must stop at the reference's iteration and return the reference's plan at
    that iteration, within the storage bound alone (the Triton 16-bit sweep: test_triton_backend.py)."""
    from pisces_fast.ops.triton.sinkhorn import kernel16_plan_error_bound, sinkhorn_forward

    n, m, eps, mass = 12, 200, 0.05, 0.9
    _require_shared(n, m)
    cost = torch.rand(1, n, m, dtype=torch.float64)
    tol = tol_between_changes(cost, eps, mass)
    ref, _, _, ref_iter = reference.sinkhorn_unbalanced(cost, eps=eps, mass=mass, max_iter=100, tol=tol,
                                                        return_potentials=True)
    plan, n_iter = sinkhorn_forward(cost.float().cuda(), None, None, eps, mass, 100, tol, kernel_dtype="float16",
                                    sweep="shared", return_n_iter=True)
    assert int(n_iter[0]) == int(ref_iter[0]), (n_iter, ref_iter, tol)
    valid = torch.ones(1, n, m, dtype=torch.bool)
    assert _plan_entry_error(plan, ref, valid) < kernel16_plan_error_bound(mass, "float16")


@gpu_only
def test_shared_sweep_defers_bfloat16_log_domain_problems_and_any_cta_size_agrees():
    from pisces_fast.ops.triton.sinkhorn import KERNEL_CODES, sinkhorn_forward, solver_params

    _require_shared(40, 300)
    cost = torch.rand(3, 40, 300, device="cuda")
    cost[1] *= 5.0  # T = 100: log domain
    _, storage = sinkhorn_forward(cost, None, None, 0.05, 0.9, 30, 0.0, kernel_dtype="auto", sweep="shared",
                                  return_storage=True)
    with pytest.raises(ValueError, match="log domain"):
        sinkhorn_forward(cost, None, None, 0.05, 0.9, 30, 0.0, kernel_dtype="bfloat16", sweep="shared")
    good = cost[[0, 2]].contiguous()
    params = solver_params(0.05, 0.9, 0.0, torch.float32, cost.device)
    plans = []
    for threads in (64, 256, 384):
        plan = torch.empty_like(good)
        ints = torch.empty(2, dtype=torch.int32, device="cuda")
        codes = torch.empty_like(ints)
        cs.sinkhorn_onchip(good, plan, None, None, params, ints, codes, 30, True, threads=threads)
        assert codes.tolist() == [KERNEL_CODES["bfloat16"]] * 2 and ints.tolist() == [30, 30]
        plans.append(plan)
    for other in plans[1:]:  # only the float32 summation order differs
        assert float(((other - plans[0]).abs() / plans[0].abs().clamp_min(1e-30)).max()) < 1e-4
    assert storage.tolist()[1] == 1
