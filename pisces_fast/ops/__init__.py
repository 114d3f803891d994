"""Token-level partial optimal transport for cross-attention (PISCES Appendix C).

One op family, three implementations: the plain-PyTorch reference (the executable spec), fused
Triton kernels (GPU) and a C++/OpenMP extension (CPU). The hyper-parameters live in one frozen
:class:`OTConfig` (validated once); the public functions validate their inputs and dispatch on
``backend`` (see :mod:`pisces_fast.ops.backends`).
"""
from .api import (
    fuse_attention,
    ot_attention,
    sinkhorn_unbalanced,
    spatiotemporal_cost,
)
from .backends import available_backends, backend_report, resolve_backend
from .config import DEFAULT_MAX_ITER, DEFAULT_TOL, OTConfig
from .module import OTAttention
from .positions import video_token_positions

__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "OTAttention",
    "OTConfig",
    "available_backends",
    "backend_report",
    "fuse_attention",
    "ot_attention",
    "resolve_backend",
    "sinkhorn_unbalanced",
    "spatiotemporal_cost",
    "video_token_positions",
]
