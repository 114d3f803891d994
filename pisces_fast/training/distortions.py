"""Video corruptions: DF-DPO's losers (Sec. 5.1 of the DF-DPO paper) with their curriculum, and the damage the
world's analyzer is validated on (``tests/test_analyzer.py``, ``benchmarks/reward_validity.py``) -- one set.

Operators act on pixel videos (B, T, 3, H, W) in [0, 1]:
- temporal: "reverse" (f_t -> f_{T+1-t}); "shuffle" (frames inside blocks of at most 0.2*T frames are permuted,
  never the identity; blocks are at least 2 frames long so that short clips still change);
- spatial: "blur" (Gaussian), "color_shift" (a per-video RGB offset), "noise" (pixel noise), and "spatial" =
  G(v) + eps with G = blur then colour shift (Eq. 5);
- "hybrid": a temporal operator followed by the spatial one (Eq. 6).
`strength` in (0, 1] scales every operator (blur sigma, shift size, noise std, number of shuffled blocks).
`DistortionCurriculum` holds stages {"ops": [...], "strength": s} and moves to the next stage every K steps
(Algorithm 1, line 15: UpdateDistortionOperators); the default goes from blatant to subtle artefacts.
Randomness comes from the `generator` passed in (or torch's global RNG, which checkpoints restore).

`CORRUPTIONS` names the fixed-strength corruptions each of which damages one thing a generator can get wrong
(`gaussian_blur`, `shuffle_frames` -- a full random permutation --, `reverse_time`, `add_noise`,
`brightness_flicker`); they also take one clip (T, 3, H, W) and a `seed` instead of a generator. Semantic
corruptions that need the scene (a wrong color, a missing object) are made by re-rendering an edited layout
(`SceneLayout.with_object` / `without_object` or a hard negative's spec in `pisces_fast.data.shapes`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

TEMPORAL_OPS = ("reverse", "shuffle")
SPATIAL_OPS = ("blur", "color_shift", "noise", "spatial")
ALL_OPS = TEMPORAL_OPS + SPATIAL_OPS + ("hybrid",)

DEFAULT_CURRICULUM = [
    {"ops": ["reverse", "noise", "color_shift"], "strength": 1.0},
    {"ops": ["shuffle", "blur", "spatial"], "strength": 0.6},
    {"ops": ["hybrid", "shuffle", "spatial"], "strength": 0.3},
]


def validate_curriculum(stages) -> None:
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"dpo.curriculum: expected a non-empty list of stages, got {stages!r}")
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or set(st) - {"ops", "strength"} or "ops" not in st:
            raise ValueError(f"dpo.curriculum[{i}]: expected {{'ops': [...], 'strength': s}}, got {st!r}")
        ops = st["ops"]
        if not isinstance(ops, list) or not ops or any(o not in ALL_OPS for o in ops):
            raise ValueError(f"dpo.curriculum[{i}].ops: expected a non-empty list from {ALL_OPS}, got {ops!r}")
        s = st.get("strength", 1.0)
        if not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"dpo.curriculum[{i}].strength: expected a number in (0, 1], got {s!r}")


def _rand(generator, *shape, device=None):
    return torch.rand(*shape, generator=generator).to(device)


def max_shuffle_block(num_frames: int) -> int:
    return max(2, int(math.floor(0.2 * num_frames)))


def shuffle_blocks(video: torch.Tensor, strength: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Permute frames inside randomly placed, non-overlapping blocks of length <= max(2, floor(0.2 T))."""
    B, T = video.shape[:2]
    if T < 2:
        raise ValueError(f"video: shuffling needs at least 2 frames, got T={T}")
    L = min(max_shuffle_block(T), T)
    out = video.clone()
    n_slots = T // L
    n_blocks = max(1, round(strength * n_slots))
    for b in range(B):
        slots = torch.randperm(n_slots, generator=generator)[:n_blocks].tolist()
        offset = int(torch.randint(0, T - n_slots * L + 1, (1,), generator=generator))
        for s in slots:
            start = offset + s * L
            perm = torch.randperm(L, generator=generator)
            if bool((perm == torch.arange(L)).all()):
                perm = perm.roll(1)  # never the identity
            out[b, start:start + L] = video[b, start:start + L][perm]
    return out


def _as_batch(videos: torch.Tensor, name: str = "videos") -> tuple[torch.Tensor, bool]:
    """(N, T, 3, H, W) or one clip (T, 3, H, W) -> a batch and whether it was one clip."""
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dim() == 4 and videos.shape[1] == 3:
        return videos[None], True
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"{name} must have shape (N, T, 3, H, W) or (T, 3, H, W), got {tuple(videos.shape)}")
    return videos, False


def _seeded(generator: Optional[torch.Generator], seed: int) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def gaussian_blur(video: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Blur every frame with a separable Gaussian of std ``sigma`` pixels (replicate padding); sigma 0 is identity."""
    if not isinstance(sigma, (int, float)) or sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    batch, single = _as_batch(video, "video")
    if sigma == 0:
        return video
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    B, T, C, H, W = batch.shape
    flat = batch.reshape(B * T * C, 1, H, W)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    out = flat.reshape(B, T, C, H, W)
    return out[0] if single else out


def shuffle_frames(videos: torch.Tensor, generator: Optional[torch.Generator] = None, seed: int = 0) -> torch.Tensor:
    """Permute all frames of each clip at random (never the identity): motion smoothness and direction break."""
    batch, single = _as_batch(videos)
    N, T = batch.shape[:2]
    if T < 2:
        raise ValueError(f"videos: shuffling needs at least 2 frames, got T={T}")
    gen = _seeded(generator, seed)
    out = torch.empty_like(batch)
    for n in range(N):
        perm = torch.randperm(T, generator=gen)
        while torch.equal(perm, torch.arange(T)):
            perm = torch.randperm(T, generator=gen)
        out[n] = batch[n, perm.to(batch.device)]
    return out[0] if single else out


def reverse_time(videos: torch.Tensor) -> torch.Tensor:
    """Play each clip backwards: every moving object moves the opposite way (a wrong-direction clip)."""
    batch, single = _as_batch(videos)
    return batch.flip(1)[0] if single else batch.flip(1)


def add_noise(videos: torch.Tensor, std: float = 0.05, generator: Optional[torch.Generator] = None,
              seed: int = 0) -> torch.Tensor:
    """Add i.i.d. Gaussian pixel noise of ``std``, independently per frame (grain that flickers)."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    batch, single = _as_batch(videos)
    noise = torch.randn(batch.shape, generator=_seeded(generator, seed)).to(batch)
    out = (batch + std * noise).clamp(0.0, 1.0)
    return out[0] if single else out


def brightness_flicker(videos: torch.Tensor, amplitude: float = 0.1, generator: Optional[torch.Generator] = None,
                       seed: int = 0) -> torch.Tensor:
    """Scale each frame's brightness by ``1 + U(-amplitude, amplitude)`` (global temporal flicker)."""
    if not 0 < amplitude < 1:
        raise ValueError(f"amplitude must be in (0, 1), got {amplitude}")
    batch, single = _as_batch(videos)
    N, T = batch.shape[:2]
    gain = 1.0 + amplitude * (2.0 * torch.rand(N, T, 1, 1, 1, generator=_seeded(generator, seed)) - 1.0)
    out = (batch * gain.to(batch)).clamp(0.0, 1.0)
    return out[0] if single else out


def color_shift(video: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    shift = (_rand(generator, video.shape[0], 1, 3, 1, 1, device=video.device) * 2 - 1) * 0.3 * strength
    return (video + shift.to(video.dtype)).clamp(0, 1)


def pixel_noise(video: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    noise = torch.randn(video.shape, generator=generator).to(video.device, video.dtype)
    return (video + 0.1 * strength * noise).clamp(0, 1)


def apply_distortion(video: torch.Tensor, op: str, strength: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One operator on a batch of videos (B, T, 3, H, W) in [0, 1]."""
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"video: expected shape (B, T, 3, H, W), got {tuple(video.shape)}")
    if op == "reverse":
        return reverse_time(video)
    if op == "shuffle":
        return shuffle_blocks(video, strength, generator)
    if op == "blur":
        return gaussian_blur(video, 1.5 * strength)
    if op == "color_shift":
        return color_shift(video, strength, generator)
    if op == "noise":
        return pixel_noise(video, strength, generator)
    if op == "spatial":
        return pixel_noise(color_shift(gaussian_blur(video, 1.0 * strength), 0.5 * strength, generator), 0.5 * strength, generator)
    if op == "hybrid":
        temporal = TEMPORAL_OPS[int(torch.randint(0, 2, (1,), generator=generator))]
        return apply_distortion(apply_distortion(video, temporal, strength, generator), "spatial", strength, generator)
    raise ValueError(f"op: expected one of {ALL_OPS}, got {op!r}")


class DistortionCurriculum:
    """Stage i is used for steps [i*K, (i+1)*K); the last stage stays. Stateless in the step, so resuming a run
    at step s gives the same operators as the uninterrupted run."""

    def __init__(self, stages: Optional[list] = None, every: int = 100):
        stages = stages if stages is not None else DEFAULT_CURRICULUM
        validate_curriculum(stages)
        if every < 1:
            raise ValueError(f"every: expected an integer >= 1, got {every}")
        self.stages, self.every = stages, every

    def stage(self, step: int) -> dict:
        return self.stages[min(step // self.every, len(self.stages) - 1)]

    def __call__(self, video: torch.Tensor, step: int, generator: Optional[torch.Generator] = None):
        """Distort each clip with an operator drawn from the current stage; returns (losers, op names)."""
        st = self.stage(step)
        ops = st["ops"]
        strength = float(st.get("strength", 1.0))
        out, names = [], []
        for b in range(video.shape[0]):
            op = ops[int(torch.randint(0, len(ops), (1,), generator=generator))]
            out.append(apply_distortion(video[b:b + 1], op, strength, generator))
            names.append(op)
        return torch.cat(out), names


# Fixed-strength corruptions the analyzer is validated on, one per thing a generator can get wrong.
CORRUPTIONS = {
    "blur": gaussian_blur,
    "shuffle": shuffle_frames,
    "reverse": reverse_time,
    "noise": add_noise,
    "flicker": brightness_flicker,
}
