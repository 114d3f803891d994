"""A differentiable toy reward for tests and CI (NOT a model of video quality).

It follows the reward interface of `pisces_fast.rewards`: `reward(video, prompts) -> {"quality", "semantic"}`,
video (B, T, 3, H, W) in [0, 1], each value (B,) and differentiable w.r.t. the video.
- "semantic": how close each frame's mean colour is to the colour named in the prompt (red/green/blue/...;
  white when the prompt names none): 1 - mean squared RGB distance / 3.
- "quality": negative temporal flicker, -mean |frame_t+1 - frame_t| (smooth videos score higher).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pisces_fast.rewards.backbones.preprocess import check_video

COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
}


class ToyColorReward(nn.Module):
    def __init__(self, default_color: str = "white"):
        super().__init__()
        if default_color not in COLORS:
            raise ValueError(f"default_color: expected one of {sorted(COLORS)}, got {default_color!r}")
        self.default_color = default_color

    def target(self, prompts: list[str], device) -> torch.Tensor:
        rows = []
        for p in prompts:
            name = next((w for w in p.lower().split() if w in COLORS), self.default_color)
            rows.append(COLORS[name])
        return torch.tensor(rows, device=device)

    def forward(self, video: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_video(video, "video")
        if len(prompts) != video.shape[0]:
            raise ValueError(f"prompts: expected {video.shape[0]} prompts (one per video), got {len(prompts)}")
        mean_rgb = video.float().mean(dim=(3, 4))  # (B, T, 3)
        dist = ((mean_rgb - self.target(prompts, video.device)[:, None]) ** 2).sum(-1).mean(1)
        semantic = 1 - dist / 3
        flicker = (video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(1) if video.shape[1] > 1 else video.new_zeros(video.shape[0])
        return {"semantic": semantic, "quality": -flicker}
