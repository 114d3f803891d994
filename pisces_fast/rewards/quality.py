"""Distributional OT-aligned quality reward (PISCES Eq. 2) and the embeddings its OT map is fit on.

``R_quality = cos(T*(y_[CLS]), x̂_[CLS])``: the text [CLS] embedding, transported onto the real-video
embedding distribution by the neural OT map, compared with the generated video's [CLS] embedding.
With ``ot_map=None`` it is the plain VLM cosine (T2V-Turbo's reward; the "w/o OT" ablation).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _check_embed(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, E), got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, E) with B >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def quality_reward(text_embed: torch.Tensor, video_embed: torch.Tensor, ot_map: Optional[nn.Module] = None) -> torch.Tensor:
    """``cos(T(text_embed), video_embed)`` per row: ``(B,)``, differentiable in both inputs.

    Args:
        text_embed: ``(B, E)`` text [CLS] embeddings (``TextFeatures.embed``).
        video_embed: ``(B, E)`` generated-video [CLS] embeddings (``VideoFeatures.embed``).
        ot_map: the fitted map ``T*`` (an :class:`~pisces_fast.rewards.ot_map.OTMap` or any
            ``(B, E) → (B, E)`` module); None for the plain cosine.
    """
    text_embed = _check_embed("text_embed", text_embed)
    video_embed = _check_embed("video_embed", video_embed)
    if text_embed.shape != video_embed.shape:
        raise ValueError(f"text_embed {tuple(text_embed.shape)} and video_embed {tuple(video_embed.shape)} must have the same shape")
    if ot_map is not None:
        dim = getattr(ot_map, "dim", text_embed.shape[1])
        if dim != text_embed.shape[1]:
            raise ValueError(f"the OT map takes {dim}-d embeddings but the backbone's are {text_embed.shape[1]}-d")
        text_embed = ot_map(text_embed)
    return F.cosine_similarity(text_embed.float(), video_embed.float(), dim=-1, eps=1e-8)


@torch.no_grad()
def collect_embeddings(
    backbone,
    batches: Iterable[Tuple[torch.Tensor, Sequence[str]]],
    *,
    progress: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint-space [CLS] embeddings of real (video, caption) batches: the data Algorithm 2 fits on.

    Args:
        backbone: a :class:`~pisces_fast.rewards.backbones.VideoTextBackbone`.
        batches: an iterable of ``(video (B, T, 3, H, W) in [0, 1], captions list of B str)``.

    Returns:
        ``(text (n, E), video (n, E))`` on CPU, float32 — save them with safetensors and fit with
        ``python -m pisces_fast.rewards.ot_map fit --source text... --target video...``.
    """
    from tqdm.auto import tqdm

    texts, videos = [], []
    was_training = backbone.training
    backbone.eval()
    try:
        for video, captions in tqdm(batches, desc="embed", disable=not progress):
            texts.append(backbone.encode_text(captions).embed.float().cpu())
            videos.append(backbone.encode_video(video.to(backbone.device)).embed.float().cpu())
    finally:
        backbone.train(was_training)
    if not texts:
        raise ValueError("batches yielded no data")
    return torch.cat(texts), torch.cat(videos)
