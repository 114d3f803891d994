"""Differentiable video preprocessing shared by the backbones: check, sample frames, resize, normalise.

Every step is differentiable so a reward's gradient reaches the generated video's pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# BLIP (and OpenAI CLIP) normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Videos must be in [0, 1]; this slack tolerates decoder overshoot but still catches the common
# mistakes ([-1, 1] videos reach -1, uint8-range videos reach 255).
VALUE_RANGE_SLACK = 0.1


def check_video(video, name: str = "video") -> torch.Tensor:
    """A finite float ``(B, T, 3, H, W)`` tensor with values in [0, 1] (± a small slack)."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, 3, H, W), got {type(video).__name__}")
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"{name} must have shape (B, T, 3, H, W) (RGB frames), got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got {video.dtype}")
    if video.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(video.shape)}")
    if not bool(torch.isfinite(video).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    lo, hi = (float(v) for v in video.detach().aminmax())
    if lo < -VALUE_RANGE_SLACK or hi > 1.0 + VALUE_RANGE_SLACK:
        raise ValueError(
            f"{name} values must be in [0, 1], got range [{lo:.3g}, {hi:.3g}] "
            "(a [-1, 1] video needs (v + 1) / 2; a [0, 255] one needs v / 255)"
        )
    return video


def check_frame_mask(frame_mask, batch: int, frames: int) -> Optional[torch.Tensor]:
    if frame_mask is None:
        return None
    if not isinstance(frame_mask, torch.Tensor) or frame_mask.dtype != torch.bool:
        raise TypeError("frame_mask must be a bool torch.Tensor of shape (B, T), True = real frame")
    if frame_mask.shape != (batch, frames):
        raise ValueError(f"frame_mask must have shape (B, T) = ({batch}, {frames}), got {tuple(frame_mask.shape)}")
    if not bool(frame_mask.any(dim=1).all()):
        raise ValueError("frame_mask marks every frame of some video as padding; each video needs >= 1 real frame")
    return frame_mask


def check_prompts(prompts, batch: Optional[int] = None) -> list:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    if batch is not None and len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch} videos; pass one prompt per video")
    return prompts


def frame_indices(total: int, count: int) -> torch.Tensor:
    """``count`` uniformly spaced frame indices in ``[0, total)`` (repeats frames if ``total < count``)."""
    if total == count:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def sample_frames(video: torch.Tensor, count: int, frame_mask: Optional[torch.Tensor] = None):
    """Uniformly sample ``count`` frames of ``(B, T, 3, H, W)`` (and of the frame mask)."""
    idx = frame_indices(video.shape[1], count).to(video.device)
    video = video.index_select(1, idx)
    if frame_mask is not None:
        frame_mask = frame_mask.index_select(1, idx)
    return video, frame_mask


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, 3, H, W)`` so the short side is ``size`` (antialiased bilinear), then centre-crop."""
    h, w = frames.shape[-2:]
    if (h, w) == (size, size):
        return frames
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=s < 1, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return frames[..., top : top + size, left : left + size]


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    return (frames - m) / s


def prepare_video(
    video: torch.Tensor,
    *,
    num_frames: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    frame_mask: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check, sample ``num_frames`` frames, resize/crop to ``size``, normalise: ``(B, num_frames, 3, size, size)``."""
    video = check_video(video)
    b, t = video.shape[:2]
    frame_mask = check_frame_mask(frame_mask, b, t)
    video, frame_mask = sample_frames(video, num_frames, frame_mask)
    if frame_mask is not None and not bool(frame_mask.any(dim=1).all()):
        raise ValueError("after sampling frames, some video has no real frame left; pass fewer padding frames")
    frames = video.flatten(0, 1)
    if dtype is not None:
        frames = frames.to(dtype)
    frames = normalize(resize_center_crop(frames, size), mean, std)
    return frames.view(b, num_frames, 3, size, size), frame_mask
