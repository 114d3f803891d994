"""A tolerance that pins Algorithm 3's stopping iteration (shared by the Triton and the CUDA Sinkhorn tests)."""
import torch

from pisces_fast.ops import reference


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
