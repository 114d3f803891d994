"""``PiscesRewards``: the bi-objective OT-aligned rewards module (PISCES Figure 2).

    rewards = PiscesRewards(backbone, ot_map)             # both OT components on (the paper)
    r = rewards(video, prompts)                            # {"quality": (B,), "semantic": (B,)}
    loss = -rewards.fuse(r).mean()                         # differentiable w.r.t. video

``video`` is float ``(B, T, 3, H, W)`` in [0, 1], ``prompts`` a list of B strings. The reward
model is frozen (eval mode, no parameter gradients) but gradients flow to ``video``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .backbones.base import VideoTextBackbone
from .backbones.preprocess import check_prompts, check_video
from .fusion import fuse_rewards, group_ids_from_prompts
from .patching import POTConfig
from .quality import quality_reward
from .semantic import semantic_reward

REWARD_NAMES = ("quality", "semantic")


class PiscesRewards(nn.Module):
    """Quality (Eq. 2) and semantic (Eq. 4) rewards from one backbone pass.

    Args:
        backbone: a :class:`~pisces_fast.rewards.backbones.VideoTextBackbone`.
        ot_map: the fitted text→real-video OT map (:func:`~pisces_fast.rewards.fit_ot_map`).
        use_ot_map: apply ``ot_map`` in the quality reward (False: plain VLM cosine, the "w/o OT"
            ablation). True without an ``ot_map`` is an error.
        use_pot: partial-OT fused cross-attention in the semantic reward (False: vanilla).
        pot: partial-OT hyper-parameters (default: the paper's γ = η = 0.2, ε = 0.05, m = 0.9).
        weights: ``{"quality": w_q, "semantic": w_s}`` (default 1, 1) used by :meth:`fuse`. A
            reward with weight 0 is not computed (Table 3's single-reward rows); ``forward``
            then returns zeros for it.
        freeze: put the backbone (and map) in eval mode and turn off their parameter gradients.
    """

    def __init__(
        self,
        backbone: VideoTextBackbone,
        ot_map: Optional[nn.Module] = None,
        *,
        use_ot_map: bool = True,
        use_pot: bool = True,
        pot: Optional[POTConfig] = None,
        weights: Optional[Mapping[str, float]] = None,
        freeze: bool = True,
    ):
        super().__init__()
        if not isinstance(backbone, VideoTextBackbone):
            raise TypeError(f"backbone must be a VideoTextBackbone, got {type(backbone).__name__}")
        if use_ot_map and ot_map is None:
            raise ValueError(
                "use_ot_map=True needs an ot_map (fit one with pisces_fast.rewards.fit_ot_map); "
                "pass use_ot_map=False for the plain VLM cosine"
            )
        if ot_map is not None:
            dim = getattr(ot_map, "dim", None)
            if dim is not None and dim != backbone.embed_dim:
                raise ValueError(f"ot_map maps {dim}-d embeddings but the backbone's joint space is {backbone.embed_dim}-d")
        pot = POTConfig() if pot is None else pot
        if not isinstance(pot, POTConfig):
            raise TypeError(f"pot must be a POTConfig, got {type(pot).__name__}")
        weights = {name: 1.0 for name in REWARD_NAMES} | dict(weights or {})
        unknown = sorted(set(weights) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(f"weights has unknown rewards {unknown}; expected keys among {REWARD_NAMES}")
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0) or w != w:
                raise ValueError(f"weights[{name!r}] must be a number >= 0, got {w!r}")
        if all(w == 0 for w in weights.values()):
            raise ValueError("at least one reward weight must be > 0")
        self.backbone = backbone
        self.ot_map = ot_map
        self.use_ot_map = bool(use_ot_map)
        self.use_pot = bool(use_pot)
        self.pot = pot
        self.weights = {k: float(v) for k, v in weights.items()}
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "PiscesRewards":
        # A frozen reward model stays in eval mode (no dropout) even inside model.train() calls.
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(False if frozen else mode)

    def forward(self, video: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        video = check_video(video)
        prompts = check_prompts(prompts, batch=video.shape[0])
        text = self.backbone.encode_text(prompts)
        vid = self.backbone.encode_video(video)
        out: Dict[str, torch.Tensor] = {}
        zeros = torch.zeros(video.shape[0], device=video.device, dtype=torch.float32)
        if self.weights["quality"] > 0:
            out["quality"] = quality_reward(text.embed, vid.embed, self.ot_map if self.use_ot_map else None)
        else:
            out["quality"] = zeros
        if self.weights["semantic"] > 0:
            out["semantic"] = semantic_reward(self.backbone, text, vid, self.pot if self.use_pot else None)
        else:
            out["semantic"] = zeros.clone()
        return out

    def fuse(self, rewards: Mapping[str, torch.Tensor], *, mode: str = "equal", prompts=None, group_ids=None) -> torch.Tensor:
        """:func:`~pisces_fast.rewards.fuse_rewards` with this module's weights (groups from ``prompts`` or ``group_ids``)."""
        if mode == "group" and group_ids is None and prompts is not None:
            group_ids = group_ids_from_prompts(prompts)
        return fuse_rewards(rewards, self.weights, mode, group_ids)

    def extra_repr(self) -> str:
        return f"use_ot_map={self.use_ot_map}, use_pot={self.use_pot}, weights={self.weights}, pot={self.pot}"
