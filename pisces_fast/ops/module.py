"""``nn.Module`` drop-in for a cross-attention core: ``OTAttention()(q, k, v, frame_idx, coords)``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .api import DEFAULT_MAX_ITER, DEFAULT_TOL, ot_attention


class OTAttention(nn.Module):
    """Holds the partial-OT hyper-parameters; ``forward`` has the SDPA layout of :func:`ot_attention`.

    ``enabled=False`` makes it plain softmax attention (same masking), for ablations.
    """

    def __init__(
        self,
        *,
        gamma: float = 0.2,
        eta: float = 0.2,
        eps: float = 0.05,
        mass: float = 0.9,
        max_iter: int = DEFAULT_MAX_ITER,
        tol: float = DEFAULT_TOL,
        fuse_eps: float = 1e-8,
        backend: str = "auto",
        enabled: bool = True,
    ):
        super().__init__()
        self.gamma, self.eta, self.eps, self.mass = gamma, eta, eps, mass
        self.max_iter, self.tol, self.fuse_eps, self.backend = max_iter, tol, fuse_eps, backend
        self.enabled = enabled

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        frame_idx: torch.Tensor,
        coords: torch.Tensor,
        *,
        scale: Optional[float] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        query_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not self.enabled:
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return ot_attention(
            q, k, v, frame_idx, coords,
            gamma=self.gamma, eta=self.eta, eps=self.eps, mass=self.mass,
            max_iter=self.max_iter, tol=self.tol, fuse_eps=self.fuse_eps, scale=scale,
            key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, eta={self.eta}, eps={self.eps}, mass={self.mass}, max_iter={self.max_iter}, "
            f"tol={self.tol}, backend={self.backend!r}, enabled={self.enabled}"
        )
