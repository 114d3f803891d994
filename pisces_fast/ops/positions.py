"""Frame indices and grid coordinates of video tokens, for the spatio-temporal cost."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def video_token_positions(
    frames: int,
    height: int,
    width: int,
    *,
    prefix_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``prefix_tokens + frames*height*width`` video tokens.

    Layout: the prefix tokens (e.g. a video [CLS]) first, then each frame's ``height x width`` patch
    grid, frames in order, each grid row-major. Returns ``frame_idx (M,)`` (0-based frame index) and
    ``coords (M, 2)`` as (row, col) in patch units.

    A prefix token summarizes the whole clip, so it is placed at the spatio-temporal centre of the
    grid: frame ``(frames-1)/2`` and coordinate ``((height-1)/2, (width-1)/2)``. That point is the
    one whose temporal and spatial distances to the patches are smallest in the worst case, so the
    prefix token is neither favoured nor singled out by the temporal and spatial cost terms.
    """
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype (centres can be fractional), got {dtype}")

    t = torch.arange(frames, dtype=dtype, device=device)
    r = torch.arange(height, dtype=dtype, device=device)
    c = torch.arange(width, dtype=dtype, device=device)
    tt, rr, cc = torch.meshgrid(t, r, c, indexing="ij")
    frame_idx = tt.reshape(-1)
    coords = torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1)
    if prefix_tokens:
        centre_t = torch.full((prefix_tokens,), (frames - 1) / 2, dtype=dtype, device=device)
        centre_s = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=dtype, device=device)
        frame_idx = torch.cat([centre_t, frame_idx])
        coords = torch.cat([centre_s.expand(prefix_tokens, 2), coords])
    return frame_idx, coords
