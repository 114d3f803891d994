"""Checks shared by the Triton and the CUDA Sinkhorn tests: random padding masks, the plan's per-entry error (the
quantity docs/numerics.md bounds) and a tolerance that pins Algorithm 3's stopping iteration."""
import torch

from pisces_fast.ops import reference


def random_masks(p, n, m, frac=0.35):
    """(P, N) / (P, M) boolean masks, about ``frac`` padding; every problem keeps >= 1 real row and column."""
    rows = torch.rand(p, n) > frac
    cols = torch.rand(p, m) > frac
    rows[:, torch.randint(n, (1,))] = True
    cols[:, torch.randint(m, (1,))] = True
    return rows, cols


def plan_entry_error(plan, ref, valid) -> float:
    """max |P/P* - 1| over the valid entries (the quantity docs/numerics.md bounds)."""
    plan, ref = plan.double().cpu(), ref.cpu()
    return float(((plan - ref).abs()[valid] / ref[valid]).max())


def tol_between_changes(cost: torch.Tensor, eps: float, mass: float, below: float = 1e-2, iters: int = 60) -> float:
    """For a single problem ``cost (1, N, M)``, float64: the geometric mean of two consecutive changes of the
    reference's potentials (max |Δ log u|, |Δ log v| between accepted updates), the first pair whose second is below
    ``below`` (far above float32's ~1e-6 on these potentials) and under 0.9x the first. A solver run with this tol
    must stop at the reference's iteration: the margin either side is >= 5 %, against ~1e-3 relative that 16-bit
    kernel storage perturbs the changes by."""
    changes, prev = [], None
    for k in range(1, iters + 1):
        _, f, g, _ = reference.sinkhorn_unbalanced(cost, eps=eps, mass=mass, max_iter=k, tol=0.0,
                                                   return_potentials=True)
        cur = torch.cat([f[0], g[0]])
        if prev is not None:
            changes.append(float((cur - prev).abs().max()))
        prev = cur
    i = next(i for i in range(1, len(changes)) if changes[i] < below and changes[i] < 0.9 * changes[i - 1])
    return (changes[i - 1] * changes[i]) ** 0.5
