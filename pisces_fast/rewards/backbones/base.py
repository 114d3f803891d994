"""What a video-text model must expose to be a PISCES reward backbone.

A backbone turns prompts and videos into features and scores a (text, video) pair with its
video-text matching (VTM) head. The PISCES rewards need, per the paper (§3.1-3.2):

* text tokens and the text [CLS] (``TextFeatures``), and a joint-space text embedding;
* video tokens with their frame index and (row, col) patch position (``VideoFeatures``, positions
  from :func:`pisces_fast.ops.video_token_positions`), and a joint-space video embedding;
* the fusion layers' cross-attention modules (``fusion_cross_attentions``): text tokens attend to
  video tokens there, and the semantic reward swaps their ``softmax(q kᵀ)·v`` core for the
  partial-OT attention (see :mod:`pisces_fast.rewards.patching`);
* the matching head (``match_logits``), whose softmax index 1 is "match".

The swappable core
------------------
Every module returned by ``fusion_cross_attentions()`` has an attribute ``core``: an ``nn.Module``
called as ``core(q, k, v, frame_idx, coords, *, scale, key_padding_mask, query_padding_mask)``
with SDPA's layout — q ``(B, H, N, D)`` text queries, k ``(B, H, M, D)``, v ``(B, H, M, Dv)`` video
keys/values, masks bool ``(B, M)`` / ``(B, N)`` with True = real token — returning ``(B, H, N, Dv)``.
The vanilla core is :class:`SoftmaxAttention`; :class:`pisces_fast.ops.OTAttention` has the same
signature. Cores hold no parameters, so swapping them never changes a state dict.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxAttention(nn.Module):
    """The vanilla cross-attention core: ``softmax(q kᵀ · scale) v`` over the real video tokens.

    ``dropout`` is applied to the attention probabilities in training mode only (as BERT/BLIP do).
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        frame_idx: Optional[torch.Tensor] = None,
        coords: Optional[torch.Tensor] = None,
        *,
        scale: Optional[float] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        query_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


@dataclass
class TextFeatures:
    """A batch of encoded prompts.

    Attributes:
        input_ids: ``(B, N)`` token ids. mask: ``(B, N)`` bool, True = real token.
        tokens: ``(B, N, Dt)`` hidden states the fusion layers start from (for BLIP, whose fusion
            encoder re-embeds the ids, the text-only encoder output; informational).
        cls: ``(B, Dt)`` the text [CLS] hidden state.
        embed: ``(B, E)`` L2-normalised joint-space embedding of the [CLS] (text projection): the
            ``y_[CLS]`` of the quality reward (Eq. 2).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor
    cls: torch.Tensor
    embed: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def index(self, idx: torch.Tensor) -> "TextFeatures":
        """The features of the samples ``idx`` (e.g. to form mismatched pairs)."""
        return TextFeatures(self.input_ids[idx], self.mask[idx], self.tokens[idx], self.cls[idx], self.embed[idx])


@dataclass
class VideoFeatures:
    """A batch of encoded videos.

    Attributes:
        tokens: ``(B, M, Dv)`` the tokens the fusion layers cross-attend to: ``prefix_tokens``
            global tokens, then each frame's ``h x w`` patch grid, frames in order, row-major.
        mask: ``(B, M)`` bool, True = real token (False = padding frames).
        frame_idx: ``(M,)`` frame index of each token; coords: ``(M, 2)`` its (row, col)
            (see :func:`pisces_fast.ops.video_token_positions`).
        grid: ``(T, h, w)`` of the patch tokens; prefix_tokens: number of global tokens first.
        cls: ``(B, Dv)`` the video's global token (its [CLS]).
        embed: ``(B, E)`` L2-normalised joint-space video embedding: the ``x̂_[CLS]`` of Eq. 2.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    frame_idx: torch.Tensor
    coords: torch.Tensor
    grid: Tuple[int, int, int]
    prefix_tokens: int
    cls: torch.Tensor
    embed: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx: torch.Tensor) -> "VideoFeatures":
        return VideoFeatures(
            self.tokens[idx], self.mask[idx], self.frame_idx, self.coords, self.grid, self.prefix_tokens,
            self.cls[idx], self.embed[idx],
        )


class VideoTextBackbone(nn.Module, ABC):
    """Base class of reward backbones: a video-text model with a matching head.

    Subclasses implement the five methods below. Videos are float ``(B, T, 3, H, W)`` in [0, 1]
    (any T, H, W: the backbone samples frames and resizes); prompts are lists of strings.
    """

    #: dimension of the joint embedding space (``TextFeatures.embed`` / ``VideoFeatures.embed``)
    embed_dim: int

    @abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> TextFeatures:
        """Tokenize and encode ``prompts`` (text-only layers)."""

    @abstractmethod
    def encode_video(self, video: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> VideoFeatures:
        """Encode ``video`` ``(B, T, 3, H, W)`` in [0, 1]; ``frame_mask`` ``(B, T)`` bool marks real
        frames (False = padding frame whose tokens must be ignored by the fusion layers)."""

    @abstractmethod
    def fusion_cross_attentions(self) -> List[nn.Module]:
        """The fusion layers' cross-attention modules, each with a swappable ``core``."""

    @abstractmethod
    def match_logits(self, text: TextFeatures, video: VideoFeatures) -> torch.Tensor:
        """VTM logits ``(B, 2)`` of the pairs ``(text[i], video[i])``; index 1 = match."""

    def match_probability(self, text: TextFeatures, video: VideoFeatures) -> torch.Tensor:
        """``softmax(VTM)[:, 1]``: the probability that ``text[i]`` matches ``video[i]``."""
        return torch.softmax(self.match_logits(text, video).float(), dim=-1)[:, 1]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def check_pair_batch(text: TextFeatures, video: VideoFeatures) -> None:
    """Text and video batches must pair up one-to-one."""
    if len(text) != len(video):
        raise ValueError(f"text and video batches must have the same size, got {len(text)} prompts and {len(video)} videos")


def head_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H·D)`` → ``(B, H, L, D)``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def head_merge(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` → ``(B, L, H·D)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
