"""The reference Sinkhorn is Algorithm 3, checked against POT and against a literal per-problem loop."""
import math

import numpy as np
import pytest
import torch

from pisces_fast import sinkhorn_unbalanced
from pisces_fast.ops import reference

ot = pytest.importorskip("ot")


def literal_algorithm3(cost: np.ndarray, eps: float, mass: float, max_iter: int, tol: float):
    """Algorithm 3 of the paper transcribed line by line for one problem, in NumPy float64."""
    n, m = cost.shape
    rho = math.inf if mass >= 0.999 else eps * mass / (1 - mass)
    tau = 1.0 if rho == math.inf else rho / (rho + eps)
    log_k = -cost / eps
    log_mu, log_nu = np.full(n, -math.log(n)), np.full(m, -math.log(m))
    log_u, log_v = np.zeros(n), np.zeros(m)

    def lse(x, axis):
        mx = x.max(axis=axis, keepdims=True)
        return (mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))).squeeze(axis)

    for _ in range(max_iter):
        log_u_new = tau * (log_mu - lse(log_k + log_v[None, :], 1))
        log_v_new = tau * (log_nu - lse(log_k + log_u_new[:, None], 0))
        if max(np.abs(log_u_new - log_u).max(), np.abs(log_v_new - log_v).max()) < tol:
            break
        log_u, log_v = log_u_new, log_v_new
    return np.exp(log_u[:, None] + log_k + log_v[None, :])


@pytest.mark.parametrize(
    "n,m,eps,mass",
    [(7, 13, 0.05, 0.9), (40, 97, 0.05, 0.9), (1, 9, 0.1, 0.7), (12, 1, 0.2, 0.5), (16, 33, 0.02, 0.95), (9, 17, 0.1, 1.0)],
)
def test_matches_pot(n, m, eps, mass):
    cost = torch.rand(n, m, dtype=torch.float64)
    plan = sinkhorn_unbalanced(cost, eps=eps, mass=mass, max_iter=5000, tol=1e-13, backend="reference")
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    if mass >= 0.999:
        expected = ot.sinkhorn(a, b, cost.numpy(), reg=eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-14)
    else:
        expected = ot.unbalanced.sinkhorn_unbalanced(
            a, b, cost.numpy(), reg=eps, reg_m=eps * mass / (1 - mass), reg_type="entropy",
            method="sinkhorn_stabilized", numItermax=20000, stopThr=1e-15,
        )
    np.testing.assert_allclose(plan.numpy(), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("tol", [0.0, 1e-3, 1e-6])
@pytest.mark.parametrize("mass", [0.9, 0.3, 1.0])
def test_matches_literal_algorithm_including_stop_rule(tol, mass):
    """Batched, masked-free: each problem equals the literal loop, whose break keeps the old iterate."""
    cost = torch.rand(5, 11, 23, dtype=torch.float64)
    plan = sinkhorn_unbalanced(cost, eps=0.05, mass=mass, max_iter=37, tol=tol, backend="reference")
    for p in range(cost.shape[0]):
        expected = literal_algorithm3(cost[p].numpy(), 0.05, mass, 37, tol)
        np.testing.assert_allclose(plan[p].numpy(), expected, rtol=1e-11, atol=0)


def test_tol_zero_runs_exactly_max_iter():
    cost = torch.rand(4, 6, 9, dtype=torch.float64)
    _, _, _, n_iter = reference.sinkhorn_unbalanced(
        cost, eps=0.05, mass=0.9, max_iter=23, tol=0.0, return_potentials=True
    )
    assert n_iter.tolist() == [23] * 4


def test_early_stop_is_per_problem():
    """A problem that converges fast stops early; its neighbour in the batch keeps iterating."""
    easy = torch.zeros(8, 8, dtype=torch.float64)  # constant cost: converges in a few iterations
    hard = torch.rand(8, 8, dtype=torch.float64)
    _, _, _, n_iter = reference.sinkhorn_unbalanced(
        torch.stack([easy, hard]), eps=0.01, mass=1.0, max_iter=500, tol=1e-9, return_potentials=True
    )
    assert n_iter[0] < n_iter[1]
    alone = sinkhorn_unbalanced(hard, eps=0.01, mass=1.0, max_iter=500, tol=1e-9, backend="reference")
    batched = sinkhorn_unbalanced(torch.stack([easy, hard]), eps=0.01, mass=1.0, max_iter=500, tol=1e-9, backend="reference")
    torch.testing.assert_close(batched[1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("mass", [0.9, 1.0])
def test_masked_problem_equals_unpadded(mass):
    n, m, pad_n, pad_m = 9, 14, 4, 6
    cost = torch.rand(n, m, dtype=torch.float64)
    padded = torch.rand(2, n + pad_n, m + pad_m, dtype=torch.float64) * 100  # garbage in the padding
    row_mask = torch.zeros(2, n + pad_n, dtype=torch.bool)
    col_mask = torch.zeros(2, m + pad_m, dtype=torch.bool)
    # problem 0: real tokens first; problem 1: real tokens scattered
    rows = [torch.arange(n), torch.randperm(n + pad_n)[:n].sort().values]
    cols = [torch.arange(m), torch.randperm(m + pad_m)[:m].sort().values]
    for p in range(2):
        row_mask[p, rows[p]] = True
        col_mask[p, cols[p]] = True
        padded[p][rows[p][:, None], cols[p][None, :]] = cost
    plan = sinkhorn_unbalanced(padded, eps=0.05, mass=mass, max_iter=300, tol=1e-12, row_mask=row_mask, col_mask=col_mask, backend="reference")
    alone = sinkhorn_unbalanced(cost, eps=0.05, mass=mass, max_iter=300, tol=1e-12, backend="reference")
    for p in range(2):
        torch.testing.assert_close(plan[p][rows[p][:, None], cols[p][None, :]], alone, rtol=1e-12, atol=0)
        valid = row_mask[p][:, None] & col_mask[p][None, :]
        assert torch.all(plan[p][~valid] == 0)


def test_leading_batch_dims_and_dtypes():
    cost = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    plan = sinkhorn_unbalanced(cost, max_iter=50, tol=0, backend="reference")
    assert plan.shape == cost.shape and plan.dtype == torch.float64
    flat = sinkhorn_unbalanced(cost.reshape(6, 5, 7), max_iter=50, tol=0, backend="reference")
    torch.testing.assert_close(plan.reshape(6, 5, 7), flat, rtol=0, atol=0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        low = sinkhorn_unbalanced(cost.to(dtype), max_iter=50, tol=0, backend="reference")
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), plan, rtol=tol * 4, atol=tol * plan.max().item())


def test_plan_properties_balanced_and_partial():
    cost = torch.rand(6, 10, dtype=torch.float64)
    balanced = sinkhorn_unbalanced(cost, eps=0.05, mass=1.0, max_iter=5000, tol=1e-13, backend="reference")
    torch.testing.assert_close(balanced.sum(0), torch.full((10,), 0.1, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(balanced.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64), rtol=1e-8, atol=0)
    partial = sinkhorn_unbalanced(cost, eps=0.05, mass=0.9, max_iter=5000, tol=1e-13, backend="reference")
    # the KL relaxation lets the marginals move: not a coupling of mu and nu any more
    assert not torch.allclose(partial.sum(1), balanced.sum(1), rtol=1e-3)
    assert torch.all(partial >= 0)


def test_extreme_eps_values_stay_finite():
    cost = torch.rand(3, 20, 50, dtype=torch.float64)
    for eps in (1e-4, 1e-3, 10.0):
        plan = sinkhorn_unbalanced(cost, eps=eps, mass=0.9, max_iter=200, tol=0, backend="reference")
        assert torch.isfinite(plan).all() and plan.sum() > 0
    f32 = sinkhorn_unbalanced(cost.float(), eps=1e-3, mass=0.9, max_iter=200, tol=0, backend="reference")
    assert torch.isfinite(f32).all()
