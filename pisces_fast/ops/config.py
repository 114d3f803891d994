"""The one configuration type of the token-level partial OT, and the domain it accepts.

:class:`OTConfig` is the single declaration of the hyper-parameters shared by
:func:`~pisces_fast.ops.sinkhorn_unbalanced`, :func:`~pisces_fast.ops.ot_attention`,
:class:`~pisces_fast.ops.OTAttention`, the backends and the rewards' attention patching. It is
frozen and validated once, at construction (:func:`pisces_fast.ops._checks.check_ot_config`), so a
config that exists is a config every backend accepts.

Valid domain (the bounds below; docs/numerics.md, "Valid inputs"): inside it every backend returns a
finite plan that agrees with the float64 reference to rounding; outside it the public functions
raise a one-line ``ValueError`` naming the argument, on every backend alike.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

# Measured in docs/numerics.md: at the paper's setting (eps=0.05, m=0.9, 40 x 2049) every problem
# we drew reached max |Δlog u|, |Δlog v| < 1e-5 within 60 iterations; 100 leaves headroom for
# harder (smaller-eps, larger) problems while bounding the cost of the non-converging ones.
DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-5

# eps: below 1e-6 the log-kernel -C/eps of a unit cost exceeds 1e6 in magnitude, where float32
# potentials keep fewer than ~2 significant digits of exp(.) and the plan underflows float32; above
# 1e3 the plan of a unit cost is uniform to float32 rounding (and eps*m/(1-m) overflows for eps
# near float max).
EPS_RANGE = (1e-6, 1e3)
# max |C| / eps over a problem's cost. Past ~2e6 the unbalanced plan's entries fall below float32's
# smallest normal number (measured: 4.7e-58 at 2e6 with 50 iterations), so a float32 backend can
# only return zeros. At 1e6 the float32 reference and cpp agree with float64 to 3.5e-5.
COST_OVER_EPS_MAX = 1e6
# Position magnitudes (frame index, (row, col)): squares of differences stay exact-ish in float32
# and far from overflow; real token grids are < 1e4.
POSITION_MAX = 1e6
# q, k, v entry magnitudes and the score bound max|q|·max|k|·D·scale: squared norms and scores
# stay finite in float32 (3.4e38), so softmax and the cosine cost never see Inf.
FEATURE_MAX = 1e15
SCORE_MAX = 1e30
# gamma, eta weigh range-normalized terms in [0, 1]; 1e3 already makes the semantic term a 1e-3
# perturbation, and larger weights reach float32 overflow (gamma=1e300 -> Inf -> NaN).
WEIGHT_MAX = 1e3
# fuse_eps: the fusion row sum is >= fuse_eps (A's rows sum to 1), so it must stay a normal float32;
# (A + fe)(P + fe) must not overflow (fe = 1e30 -> 1e60 -> Inf). Above 1 the fusion is near-uniform.
FUSE_EPS_RANGE = (1e-30, 1e3)
# tol compares log-potential steps; anything above 1e3 stops at the first iteration anyway.
TOL_MAX = 1e3
# One million updates is far past convergence at any accepted eps and keeps the per-problem
# iteration count inside int32 for the kernels (2**63 used to be a TypeError on cpp and Triton).
MAX_ITER_LIMIT = 1_000_000

DOMAINS = ("auto", "scaling", "log")
KERNEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OTConfig:
    """Hyper-parameters of the token-level partial OT (paper defaults: γ = η = 0.2, ε = 0.05, m = 0.9).

    Attributes:
        eps: entropic temperature ε ∈ [1e-6, 1e3] (``EPS_RANGE``).
        mass: the paper's transported fraction m ∈ (0, 1]; m ≥ 0.999 is balanced OT. It sets the
            KL relaxation ρ = ε·m/(1−m) (update exponent τ = m); see docs/numerics.md.
        max_iter: maximum number of (u, v) updates, an int in [1, 1e6] (``MAX_ITER_LIMIT``).
        tol: per-problem stop when max(|Δlog u|, |Δlog v|) < tol; 0 runs exactly ``max_iter``.
            In [0, 1e3].
        gamma, eta: weights of the temporal and spatial cost terms, in [0, 1e3] (0 disables a term).
        fuse_eps: the ε of the log-space fusion Ã ∝ (A + ε)(P + ε) (Eq. 3), in [1e-30, 1e3].
        domain: Sinkhorn iteration: "auto" (per problem, the scaling domain where the cost range
            allows it exactly, else the log domain), "scaling" or "log" (force one; for tests and
            benchmarks). All give the log-domain answer to rounding; a backend that cannot force the
            requested domain raises ValueError.
        kernel_dtype: storage of the scaling-domain kernel matrix: "auto" (16-bit only where its
            documented error bound holds), "float32", "bfloat16" or "float16" (16-bit only in the
            scaling domain). The reference ignores it (it is the spec); a backend that cannot honour
            a requested dtype raises ValueError, never silently.
        check_inputs: value checks of the tensors (NaN/Inf, magnitudes within the valid domain,
            all-padding masks). ``None`` (default) = on for CPU tensors, off for CUDA tensors (a value
            check needs a device-to-host sync); ``True`` = always (syncs on CUDA); ``False`` = never.
            Shape/dtype/device checks always run; value checks never run inside ``torch.compile``.
    """

    eps: float = 0.05
    mass: float = 0.9
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    gamma: float = 0.2
    eta: float = 0.2
    fuse_eps: float = 1e-8
    domain: str = "auto"
    kernel_dtype: str = "auto"
    check_inputs: Optional[bool] = None

    def __post_init__(self):
        from ._checks import check_ot_config  # _checks is the one validator; imported late (no cycle)

        for name, value in check_ot_config(self).items():
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "OTConfig":
        """A copy with ``changes`` applied (validated); unknown names are a TypeError naming them."""
        names = tuple(f.name for f in fields(self))
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields: {names}")
        return replace(self, **changes) if changes else self

    def solver_kwargs(self) -> dict:
        """The Sinkhorn's keyword arguments, as every backend's ``sinkhorn_unbalanced`` takes them."""
        return dict(eps=self.eps, mass=self.mass, max_iter=self.max_iter, tol=self.tol,
                    domain=self.domain, kernel_dtype=self.kernel_dtype)

    def attention_kwargs(self) -> dict:
        """``ot_attention``'s hyper-parameters, as every backend's ``ot_attention`` takes them."""
        return dict(gamma=self.gamma, eta=self.eta, fuse_eps=self.fuse_eps, **self.solver_kwargs())


FIELD_NAMES = tuple(f.name for f in fields(OTConfig))


def resolve_config(config: Optional[OTConfig], **overrides) -> OTConfig:
    """``config`` (default ``OTConfig()``) with the non-None ``overrides`` applied.

    The public functions' keyword arguments (``eps=``, ``mass=`` ...) default to None meaning "from
    ``config``"; this merges them. Works under ``torch.compile`` (no graph break).
    """
    if config is None:
        base = OTConfig()
    elif isinstance(config, OTConfig):
        base = config
    else:
        raise TypeError(f"config must be a pisces_fast.ops.OTConfig, got {type(config).__name__}")
    changes = {name: value for name, value in overrides.items() if value is not None}
    return replace(base, **changes) if changes else base
