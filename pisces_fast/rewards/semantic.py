"""Discrete token-level OT-aligned semantic reward (PISCES Eq. 4).

``R_semantic = softmax(VTM[Ã · x̂])[..., 1]``: the backbone's matching head on fusion features in
which every cross-attention uses the partial-OT-fused attention ``Ã`` (see
:mod:`pisces_fast.rewards.patching`). With ``pot=None`` it is the VTM probability under the
backbone's vanilla cross-attention (the "w/o OT" ablation).
"""
from __future__ import annotations

from typing import Optional

import torch

from .backbones.base import TextFeatures, VideoFeatures
from .patching import POTConfig, patch_cross_attention


def semantic_reward(backbone, text: TextFeatures, video: VideoFeatures, pot: Optional[POTConfig] = None) -> torch.Tensor:
    """``P(match | text[i], video[i])`` per pair, ``(B,)``; differentiable w.r.t. the video features.

    Args:
        backbone: a :class:`~pisces_fast.rewards.backbones.VideoTextBackbone`.
        text, video: features from ``backbone.encode_text`` / ``backbone.encode_video``.
        pot: partial-OT settings for the fusion cross-attention (None: vanilla attention).
    """
    if pot is None:
        return backbone.match_probability(text, video)
    with patch_cross_attention(backbone, pot):
        return backbone.match_probability(text, video)
