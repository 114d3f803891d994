"""``nn.Module`` drop-in for a cross-attention core: ``OTAttention()(q, k, v, frame_idx, coords)``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backends import BACKENDS
from .config import OTConfig, resolve_config
from .api import ot_attention


class OTAttention(nn.Module):
    """Holds an :class:`OTConfig`; ``forward`` has the SDPA layout of :func:`ot_attention`.

    ``OTAttention(config)`` or ``OTAttention(mass=1.0, ...)`` (keyword arguments are
    :class:`OTConfig` fields overriding ``config``). ``enabled=False`` makes it plain softmax
    attention (same masking), for ablations. The config is validated here, once, so ``forward``
    does no scalar validation.
    """

    def __init__(
        self,
        config: Optional[OTConfig] = None,
        *,
        backend: str = "auto",
        enabled: bool = True,
        **overrides,
    ):
        super().__init__()
        if overrides:
            config = (config if config is not None else OTConfig()).replace(**overrides)
        self.config = resolve_config(config)
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.backend = backend
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
            q, k, v, frame_idx, coords, config=self.config, scale=scale,
            key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, backend=self.backend,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"gamma={c.gamma}, eta={c.eta}, eps={c.eps}, mass={c.mass}, max_iter={c.max_iter}, tol={c.tol}, "
            f"fuse_eps={c.fuse_eps}, domain={c.domain!r}, kernel_dtype={c.kernel_dtype!r}, "
            f"backend={self.backend!r}, enabled={self.enabled}"
        )
