"""Token-level partial optimal transport for cross-attention (PISCES Appendix C).

One op family, three implementations: the plain-PyTorch reference (the executable spec), fused
Triton kernels (GPU) and a C++/OpenMP extension (CPU). The public functions validate their inputs
and dispatch on ``backend`` (see :mod:`pisces_fast.ops.backends`).
"""
from .api import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    fuse_attention,
    ot_attention,
    sinkhorn_unbalanced,
    spatiotemporal_cost,
)
from .backends import available_backends, resolve_backend
from .module import OTAttention
from .positions import video_token_positions

__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "OTAttention",
    "available_backends",
    "fuse_attention",
    "ot_attention",
    "resolve_backend",
    "sinkhorn_unbalanced",
    "spatiotemporal_cost",
    "video_token_positions",
]
