"""Video corruptions that validate the analyzer: each one damages one thing a generator can get wrong.

All take clips ``(N, T, 3, H, W)`` (or one clip ``(T, 3, H, W)``) in ``[0, 1]`` and return the same shape in
``[0, 1]``; random ones take a ``torch.Generator`` so validation is reproducible. Semantic corruptions that
need the scene (a wrong color, a missing object) are made by re-rendering an edited layout instead -- see
``SceneLayout.with_object`` / ``without_object`` in ``pisces_fast.data.shapes``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "shuffle_frames", "reverse_time", "add_noise", "brightness_flicker", "CORRUPTIONS"]


def _as_batch(videos: torch.Tensor, name: str = "videos") -> tuple[torch.Tensor, bool]:
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dim() == 4:
        return videos[None], True
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"{name} must have shape (N, T, 3, H, W) or (T, 3, H, W), got {tuple(videos.shape)}")
    return videos, False


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return generator


def gaussian_blur(videos: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Blur every frame with a separable Gaussian of std ``sigma`` pixels (reflect padding)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    batch, single = _as_batch(videos)
    N, T, C, H, W = batch.shape
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    frames = batch.reshape(N * T * C, 1, H, W)
    frames = F.conv2d(F.pad(frames, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    frames = F.conv2d(F.pad(frames, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    out = frames.view(N, T, C, H, W).clamp(0.0, 1.0)
    return out[0] if single else out


def shuffle_frames(videos: torch.Tensor, generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
    """Permute the frames of each clip at random (never the identity)."""
    batch, single = _as_batch(videos)
    N, T = batch.shape[:2]
    gen = _generator(generator, seed)
    out = torch.empty_like(batch)
    for n in range(N):
        perm = torch.randperm(T, generator=gen)
        while T > 1 and torch.equal(perm, torch.arange(T)):
            perm = torch.randperm(T, generator=gen)
        out[n] = batch[n, perm.to(batch.device)]
    return out[0] if single else out


def reverse_time(videos: torch.Tensor) -> torch.Tensor:
    """Play each clip backwards: every moving object moves the opposite way (a wrong-direction clip)."""
    batch, single = _as_batch(videos)
    out = batch.flip(1)
    return out[0] if single else out


def add_noise(
    videos: torch.Tensor, std: float = 0.05, generator: torch.Generator | None = None, seed: int = 0
) -> torch.Tensor:
    """Add i.i.d. Gaussian pixel noise of ``std``, independently per frame (grain that flickers)."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    batch, single = _as_batch(videos)
    noise = torch.randn(batch.shape, generator=_generator(generator, seed)).to(batch)
    out = (batch + std * noise).clamp(0.0, 1.0)
    return out[0] if single else out


def brightness_flicker(
    videos: torch.Tensor, amplitude: float = 0.1, generator: torch.Generator | None = None, seed: int = 0
) -> torch.Tensor:
    """Scale each frame's brightness by ``1 + U(-amplitude, amplitude)`` (global temporal flicker)."""
    if not 0 < amplitude < 1:
        raise ValueError(f"amplitude must be in (0, 1), got {amplitude}")
    batch, single = _as_batch(videos)
    N, T = batch.shape[:2]
    gain = 1.0 + amplitude * (2.0 * torch.rand(N, T, 1, 1, 1, generator=_generator(generator, seed)) - 1.0)
    out = (batch * gain.to(batch)).clamp(0.0, 1.0)
    return out[0] if single else out


CORRUPTIONS = {
    "blur": gaussian_blur,
    "shuffle": shuffle_frames,
    "reverse": reverse_time,
    "noise": add_noise,
    "flicker": brightness_flicker,
}
