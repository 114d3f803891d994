"""An InternVideo2-stage-2-style video-text model, at any size, and its reward-backbone adapter.

The architecture follows the public InternVideo2 stage-2 model (the paper's reward model), so the
same class at full size (:meth:`InternVideo2Config.stage2_1b`) can take the official checkpoint
(see :mod:`.internvideo2_checkpoint`); tests and the embedded world use :meth:`InternVideo2Config.tiny`.

* ``vision_encoder``: a video ViT over spatio-temporal patches (Conv3d tubelets), a [CLS] token,
  learned joint space-time position embeddings, pre-norm blocks with RMSNorm, q/k RMSNorm and
  LayerScale; an attention-pooling head (``clip_projector``: mean-token query over all tokens)
  gives the pooled video feature.
* ``text_encoder``: BERT. Layers ``0 .. L−k−1`` are text-only; the last ``k`` (``fusion_layers``)
  add cross-attention whose keys/values are the vision tokens (all of them, [CLS] first).
* ``vision_proj`` / ``text_proj`` into the joint space, learnable temperature ``temp``, and the VTM
  head ``itm_head = Linear(text_width, 2)`` on the [CLS] of the fusion output (1 = match).

Submodule names mirror the official ones (``blocks.i.attn.qkv``, ``encoder.layer.i.crossattention.self.query``,
…) so checkpoint conversion is a prefix mapping. Training: :meth:`InternVideo2.training_losses`
(video-text contrastive both ways + matching with hard negatives, as in InternVideo2's VTC/VTM).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import video_token_positions
from .base import (
    SoftmaxAttention,
    TextFeatures,
    VideoFeatures,
    VideoTextBackbone,
    check_pair_batch,
    head_merge,
    head_split,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, check_prompts, prepare_video

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_KIND = "pisces_fast.InternVideo2"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class InternVideo2Config:
    """Sizes of :class:`InternVideo2`. Defaults are the official stage-2 1B model (224 px, 8 frames)."""

    # vision encoder (video ViT)
    image_size: int = 224
    patch_size: int = 14
    num_frames: int = 8
    tubelet_size: int = 1
    vision_width: int = 1408
    vision_depth: int = 40
    vision_heads: int = 16
    vision_mlp_ratio: float = 48 / 11
    qk_normalization: bool = True
    layerscale_init: float = 1e-5  # 0 disables LayerScale
    rms_norm_eps: float = 1e-6
    pool_dim: int = 768  # attention-pooling output ("clip_embed_dim")
    pool_heads: int = 16
    # text encoder (BERT with fusion layers)
    vocab_size: int = 30522
    text_width: int = 1024
    text_depth: int = 24
    text_heads: int = 16
    text_intermediate: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    fusion_layers: int = 5
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int = 0
    max_text_len: int = 40
    # joint space
    embed_dim: int = 512
    temp_init: float = 0.07
    # std of the truncated-normal init of linear/conv/embedding weights (BERT/InternVideo2: 0.02).
    # Tiny widths need more: with 0.02 at width 32 the text [CLS] starts out identical for every
    # prompt (attention is uniform and the residual branches vanish), which stalls training.
    initializer_range: float = 0.02
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN
    image_std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        ints = ("image_size", "patch_size", "num_frames", "tubelet_size", "vision_width", "vision_depth",
                "vision_heads", "pool_dim", "pool_heads", "vocab_size", "text_width", "text_depth", "text_heads",
                "text_intermediate", "max_position_embeddings", "type_vocab_size", "fusion_layers",
                "max_text_len", "embed_dim")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InternVideo2Config.{name} must be an int >= 1, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames ({self.num_frames}) must be divisible by tubelet_size ({self.tubelet_size})")
        for width, heads, what in ((self.vision_width, self.vision_heads, "vision"), (self.vision_width, self.pool_heads, "pool"),
                                   (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ValueError(f"{what} width ({width}) must be divisible by its number of heads ({heads})")
        if self.fusion_layers > self.text_depth:
            raise ValueError(f"fusion_layers ({self.fusion_layers}) cannot exceed text_depth ({self.text_depth})")
        if self.max_text_len > self.max_position_embeddings:
            raise ValueError("max_text_len cannot exceed max_position_embeddings")
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be a valid id below vocab_size ({self.vocab_size})")
        if not self.temp_init > 0:
            raise ValueError(f"temp_init must be > 0, got {self.temp_init}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean/image_std must be 3 numbers each, std > 0")

    @property
    def grid(self) -> Tuple[int, int, int]:
        """(T', h, w) patch grid of a clip of ``num_frames`` frames."""
        side = self.image_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def fusion_start(self) -> int:
        """Index of the first text layer with cross-attention (InternVideo2's ``fusion_layer``)."""
        return self.text_depth - self.fusion_layers

    @classmethod
    def stage2_1b(cls, num_frames: int = 8) -> "InternVideo2Config":
        """The official InternVideo2 stage-2 1B layout (ViT-1B 1408-d x 40, BERT-large, 5 fusion layers)."""
        return cls(num_frames=num_frames)

    @classmethod
    def tiny(cls, vocab_size: int = 64, **overrides) -> "InternVideo2Config":
        """A CPU-test size: 32 px, 8 px patches, 4 frames, widths 32, 2+2 text layers (2 fusion).

        Weights start at std 0.2 (≈ 1/√width) instead of 0.02: measured on a 4-pair batch, the
        contrastive loss falls 10x in 15 Adam steps at 0.2 and stalls at log(4) at 0.02-0.05.
        """
        base = dict(
            image_size=32, patch_size=8, num_frames=4, vision_width=32, vision_depth=2, vision_heads=4,
            vision_mlp_ratio=2.0, pool_dim=32, pool_heads=4, vocab_size=vocab_size, text_width=32, text_depth=4,
            text_heads=4, text_intermediate=64, max_position_embeddings=64, fusion_layers=2, max_text_len=16,
            embed_dim=16, layerscale_init=0.1, initializer_range=0.2,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InternVideo2Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown InternVideo2Config fields {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Vision encoder
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        p, t = cfg.patch_size, cfg.tubelet_size
        self.proj = nn.Conv3d(3, cfg.vision_width, kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """``(B, C, T, H, W)`` → ``(B, T'·h·w, width)`` and the grid ``(T', h, w)``."""
        x = self.proj(pixels)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        c = cfg.vision_width
        self.heads = cfg.vision_heads
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_norm = RMSNorm(c, cfg.rms_norm_eps) if cfg.qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(c, cfg.rms_norm_eps) if cfg.qk_normalization else nn.Identity()
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)  # over all heads at once, as the official model
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            head_split(q, self.heads), head_split(k, self.heads), head_split(v, self.heads), attn_mask=mask
        )
        return self.proj(head_merge(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        c = cfg.vision_width
        self.norm1 = RMSNorm(c, cfg.rms_norm_eps)
        self.attn = ViTSelfAttention(cfg)
        self.ls1 = LayerScale(c, cfg.layerscale_init) if cfg.layerscale_init else nn.Identity()
        self.norm2 = RMSNorm(c, cfg.rms_norm_eps)
        self.mlp = Mlp(c, int(c * cfg.vision_mlp_ratio))
        self.ls2 = LayerScale(c, cfg.layerscale_init) if cfg.layerscale_init else nn.Identity()

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), key_padding_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolCrossAttention(nn.Module):
    """The pooling head's attention (official ``CrossAttention``: bias-free q/k/v weights plus separate biases)."""

    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, xq, xk, xv, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q = F.linear(xq, self.q.weight, self.q_bias)
        k = F.linear(xk, self.k.weight, self.k_bias)
        v = F.linear(xv, self.v.weight, self.v_bias)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            head_split(q, self.heads), head_split(k, self.heads), head_split(v, self.heads), attn_mask=mask
        )
        return self.proj(head_merge(out))


class AttentionPool(nn.Module):
    """Official ``AttentionPoolingBlock``: the mean token queries all tokens; output ``pool_dim``."""

    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        c = cfg.vision_width
        self.norm1_q = nn.LayerNorm(c, eps=1e-5)
        self.norm1_k = nn.LayerNorm(c, eps=1e-5)
        self.norm1_v = nn.LayerNorm(c, eps=1e-5)
        self.cross_attn = AttentionPoolCrossAttention(c, cfg.pool_heads, cfg.pool_dim)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if key_padding_mask is None:
            mean = x.mean(1, keepdim=True)
        else:
            w = key_padding_mask.to(x.dtype).unsqueeze(-1)
            mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        out = self.cross_attn(self.norm1_q(mean), self.norm1_k(x), self.norm1_v(x), key_padding_mask)
        return out.squeeze(1)


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resample a ``(1, 1 + T·h·w, C)`` [CLS]-first position embedding to another (T, h, w) grid.

    Time is resampled linearly and space bicubically (how InternVideo2 goes from 4 trained frames
    to 8). The [CLS] entry is kept.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    t0, h0, w0 = old_grid
    t1, h1, w1 = new_grid
    c = pos_embed.shape[-1]
    if pos_embed.shape[1] != 1 + t0 * h0 * w0:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} entries, expected 1 + {t0}·{h0}·{w0}")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:].reshape(1, t0, h0, w0, c)
    if (h0, w0) != (h1, w1):
        g = grid.reshape(t0, h0, w0, c).permute(0, 3, 1, 2)
        g = F.interpolate(g.float(), size=(h1, w1), mode="bicubic", align_corners=False).to(grid.dtype)
        grid = g.permute(0, 2, 3, 1).reshape(1, t0, h1, w1, c)
    if t0 != t1:
        g = grid.reshape(t0, h1 * w1 * c).T.unsqueeze(0)  # (1, hwc, T)
        g = F.interpolate(g.float(), size=t1, mode="linear", align_corners=False).to(grid.dtype)
        grid = g.squeeze(0).T.reshape(1, t1, h1, w1, c)
    return torch.cat([cls, grid.reshape(1, t1 * h1 * w1, c)], dim=1)


class VideoViT(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.grid = cfg.grid
        c = cfg.vision_width
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        t, h, w = self.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + t * h * w, c))
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vision_depth)])
        self.clip_projector = AttentionPool(cfg)
        nn.init.trunc_normal_(self.pos_embed, std=cfg.initializer_range)
        nn.init.trunc_normal_(self.cls_token, std=cfg.initializer_range)

    def forward(self, pixels: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        """``(B, C, T, H, W)`` normalised pixels → tokens ``(B, 1 + T'·h·w, width)``, pooled, grid."""
        x, grid = self.patch_embed(pixels)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(self.pos_embed, self.grid, grid).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, token_mask)
        return x, self.clip_projector(x, token_mask), grid


# ----------------------------------------------------------------------------------------------
# Text encoder (BERT with fusion layers)
# ----------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.text_width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        c = cfg.text_width
        self.heads = cfg.text_heads
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(c, c)
        self.value = nn.Linear(c, c)
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (head_split(f(x), self.heads) for f in (self.query, self.key, self.value))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :], dropout_p=p)
        return head_merge(out)


class FusionCrossAttention(nn.Module):
    """Text queries attend to video keys/values; the ``core`` (softmax·V) is swappable (see base)."""

    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        c = cfg.text_width
        self.heads = cfg.text_heads
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(cfg.vision_width, c)
        self.value = nn.Linear(cfg.vision_width, c)
        self.core: nn.Module = SoftmaxAttention(cfg.attention_dropout)

    def forward(self, x, video, *, video_mask, text_mask, frame_idx, coords) -> torch.Tensor:
        q = head_split(self.query(x), self.heads)
        k = head_split(self.key(video), self.heads)
        v = head_split(self.value(video), self.heads)
        out = self.core(q, k, v, frame_idx, coords, scale=None, key_padding_mask=video_mask, query_padding_mask=text_mask)
        return head_merge(out)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: InternVideo2Config, cross: bool):
        super().__init__()
        self.self = FusionCrossAttention(cfg) if cross else BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.text_intermediate, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: InternVideo2Config, has_cross_attention: bool):
        super().__init__()
        self.attention = BertAttention(cfg, cross=False)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = BertAttention(cfg, cross=True)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, text_mask, video=None, *, video_mask=None, frame_idx=None, coords=None) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, text_mask), x)
        if self.has_cross_attention:
            if video is None:
                raise ValueError("a fusion layer needs the video tokens")
            h = self.crossattention.self(
                x, video, video_mask=video_mask, text_mask=text_mask, frame_idx=frame_idx, coords=coords
            )
            x = self.crossattention.output(h, x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, i >= cfg.fusion_start) for i in range(cfg.text_depth)])


class BertTextEncoder(nn.Module):
    def __init__(self, cfg: InternVideo2Config):
        super().__init__()
        self.fusion_start = cfg.fusion_start
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text-only layers (InternVideo2's ``mode="text"``)."""
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer[: self.fusion_start]:
            x = layer(x, text_mask)
        return x

    def forward_fusion(self, x, text_mask, video, *, video_mask, frame_idx, coords, output_hidden_states: bool = False):
        """The fusion layers (``mode="fusion"``): self-attention, cross-attention to video, FFN. With
        ``output_hidden_states``: ``(output, [the text states after each fusion layer])``."""
        states = []
        for layer in self.encoder.layer[self.fusion_start :]:
            x = layer(x, text_mask, video, video_mask=video_mask, frame_idx=frame_idx, coords=coords)
            states.append(x)
        return (x, states) if output_hidden_states else x


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def _check_token_batch(input_ids, attention_mask, vocab_size: int):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError(f"input_ids must be an integer tensor of shape (B, N), got {getattr(input_ids, 'shape', type(input_ids))}")
    if attention_mask is None or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must be in [0, {vocab_size}) (the model's vocab_size); got max {int(input_ids.max())}")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask marks every token of some prompt as padding")
    return input_ids.long(), mask


class InternVideo2(nn.Module):
    """InternVideo2-stage-2-style model (see module docstring). Inputs are normalised pixels."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        if not isinstance(config, InternVideo2Config):
            raise TypeError(f"config must be an InternVideo2Config, got {type(config).__name__}")
        self.config = config
        self.vision_encoder = VideoViT(config)
        self.text_encoder = BertTextEncoder(config)
        self.vision_proj = nn.Linear(config.pool_dim, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp_init)))
        self.itm_head = nn.Linear(config.text_width, 2)
        self._init_weights()
        self._positions: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _init_weights(self):
        std = self.config.initializer_range
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- encoders ------------------------------------------------------------------------------
    def encode_vision(self, pixels: torch.Tensor, frame_mask: Optional[torch.Tensor] = None):
        """``(B, T, 3, H, W)`` normalised pixels → ``(tokens (B, M, Cv), pooled (B, pool_dim), token_mask, grid)``.

        ``frame_mask`` ``(B, T)`` bool marks real frames; padding frames' tokens are masked out of
        every attention (``token_mask`` is None when there is no padding).
        """
        b, t = pixels.shape[:2]
        token_mask = None
        if frame_mask is not None and not bool(frame_mask.all()):
            tub = self.config.tubelet_size
            if t % tub:
                raise ValueError(f"the number of frames ({t}) must be divisible by tubelet_size ({tub})")
            real = frame_mask.view(b, t // tub, tub).any(-1)  # a tubelet is real if any of its frames is
            side_h, side_w = pixels.shape[-2] // self.config.patch_size, pixels.shape[-1] // self.config.patch_size
            patch_mask = real[:, :, None].expand(b, t // tub, side_h * side_w).reshape(b, -1)
            token_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=pixels.device), patch_mask], dim=1)
        tokens, pooled, grid = self.vision_encoder(pixels.transpose(1, 2), token_mask)
        return tokens, pooled, token_mask, grid

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Text-only layers → ``(hidden (B, N, Ct), mask (B, N) bool)``; the [CLS] is ``hidden[:, 0]``."""
        input_ids, mask = _check_token_batch(input_ids, attention_mask, self.config.vocab_size)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"prompts have {input_ids.shape[1]} tokens, more than max_position_embeddings={self.config.max_position_embeddings}")
        return self.text_encoder.forward_text(input_ids, mask), mask

    def video_positions(self, grid: Tuple[int, int, int], device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._positions:
            self._positions[key] = video_token_positions(*grid, prefix_tokens=1, device=device)
        return self._positions[key]

    def fuse(self, text_hidden, text_mask, video_tokens, video_mask, frame_idx, coords, output_hidden_states=False):
        """The fusion layers over (text, video) pairs → ``(B, N, Ct)``; with ``output_hidden_states`` also the
        states after each fusion layer (``forward_fusion``)."""
        if video_mask is not None and bool(video_mask.all()):
            video_mask = None  # no padding: let attention take its fast path
        return self.text_encoder.forward_fusion(
            text_hidden, text_mask, video_tokens, video_mask=video_mask, frame_idx=frame_idx, coords=coords,
            output_hidden_states=output_hidden_states,
        )

    def vtm_logits(self, text_hidden, text_mask, video_tokens, video_mask, frame_idx, coords) -> torch.Tensor:
        """``itm_head`` on the [CLS] of the fusion output: ``(B, 2)``, index 1 = match."""
        return self.itm_head(self.fuse(text_hidden, text_mask, video_tokens, video_mask, frame_idx, coords)[:, 0])

    def fusion_cross_attentions(self) -> List[nn.Module]:
        return [layer.crossattention.self for layer in self.text_encoder.encoder.layer if layer.has_cross_attention]

    # -- training --------------------------------------------------------------------------------
    def training_losses(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        idx: Optional[torch.Tensor] = None,
        hard_negatives: bool = True,
        vtc_weight: float = 1.0,
        vtm_weight: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """InternVideo2's video-text contrastive (VTC) and matching (VTM) losses on a batch of pairs.

        Args:
            pixels: ``(B, T, 3, H, W)`` normalised frames; input_ids/attention_mask: ``(B, N)``.
            idx: ``(B,)`` ids of the underlying videos: pairs with equal ids are all positives
                (default: only the diagonal).
            hard_negatives: sample each VTM negative ∝ softmax(similarity) over non-positives
                (InternVideo2's ``vtm_hard_neg``); else uniformly.
            generator: RNG for the negative sampling.

        Returns:
            ``{"loss", "loss_vtc", "loss_vtm", "vtm_accuracy"}`` (accuracy is detached, over the
            B positives and 2B negatives).
        """
        b = pixels.shape[0]
        if b < 2:
            raise ValueError("training_losses needs a batch of at least 2 pairs (negatives come from the batch)")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        text_hidden, text_mask = self.encode_text(input_ids, attention_mask)
        video_tokens, pooled, video_mask, grid = self.encode_vision(pixels)
        frame_idx, coords = self.video_positions(grid, pixels.device)
        v = F.normalize(self.vision_proj(pooled), dim=-1)
        t = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)
        sim_v2t = v @ t.T / self.temp
        if idx is None:
            positive = torch.eye(b, dtype=torch.bool, device=pixels.device)
        else:
            if idx.shape != (b,):
                raise ValueError(f"idx must have shape ({b},), got {tuple(idx.shape)}")
            positive = idx.view(-1, 1) == idx.view(1, -1)
        targets = positive.float() / positive.float().sum(1, keepdim=True)
        loss_v2t = -(F.log_softmax(sim_v2t, dim=1) * targets).sum(1).mean()
        loss_t2v = -(F.log_softmax(sim_v2t.T, dim=1) * targets).sum(1).mean()
        loss_vtc = 0.5 * (loss_v2t + loss_t2v)

        with torch.no_grad():
            if not bool((~positive).any(dim=1).all()):
                raise ValueError("every sample needs at least one non-matching sample in the batch for VTM negatives")
            if hard_negatives:
                w_v2t = F.softmax(sim_v2t.float(), dim=1).masked_fill(positive, 0) + (~positive) * 1e-8
                w_t2v = F.softmax(sim_v2t.T.float(), dim=1).masked_fill(positive, 0) + (~positive) * 1e-8
            else:
                w_v2t = w_t2v = (~positive).float()
            video_neg = torch.multinomial(w_t2v, 1, generator=generator).squeeze(1)  # a negative video per text
            text_neg = torch.multinomial(w_v2t, 1, generator=generator).squeeze(1)  # a negative text per video
        all_text = torch.cat([text_hidden, text_hidden, text_hidden[text_neg]], dim=0)
        all_text_mask = torch.cat([text_mask, text_mask, text_mask[text_neg]], dim=0)
        all_video = torch.cat([video_tokens, video_tokens[video_neg], video_tokens], dim=0)
        logits = self.vtm_logits(all_text, all_text_mask, all_video, None, frame_idx, coords)
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
        labels[:b] = 1
        loss_vtm = F.cross_entropy(logits.float(), labels)
        loss = vtc_weight * loss_vtc + vtm_weight * loss_vtm
        accuracy = (logits.argmax(-1) == labels).float().mean().detach()
        return {"loss": loss, "loss_vtc": loss_vtc, "loss_vtm": loss_vtm, "vtm_accuracy": accuracy}

    # -- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """``model.safetensors`` + ``config.json`` (loadable with :meth:`from_pretrained`, no pickle)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps({"kind": MODEL_KIND, **self.config.to_dict()}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], *, map_location="cpu") -> "InternVideo2":
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"InternVideo2.from_pretrained: {p} not found")
        meta = json.loads(cfg_path.read_text())
        if meta.pop("kind", None) != MODEL_KIND:
            raise ValueError(f"{cfg_path} does not describe a {MODEL_KIND} model")
        model = cls(InternVideo2Config.from_dict(meta))
        missing, unexpected = model.load_state_dict(load_file(str(w_path), device=str(map_location)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{w_path} does not match {cfg_path}: missing {missing}, unexpected {unexpected}")
        return model.to(map_location)


# ----------------------------------------------------------------------------------------------
# Reward backbone adapter
# ----------------------------------------------------------------------------------------------
class InternVideo2Backbone(VideoTextBackbone):
    """:class:`InternVideo2` + a BERT tokenizer as a :class:`VideoTextBackbone`.

    Videos are sampled to ``config.num_frames`` frames (uniform stride), resized (short side) and
    centre-cropped to ``config.image_size``, ImageNet-normalised — the InternVideo2 / T2V-Turbo
    reward preprocessing. The video [CLS] token leads the tokens the fusion layers see (it gets the
    clip's centre as its position); the joint video embedding is ``vision_proj`` of the
    attention-pooled feature, as in the official model.
    """

    def __init__(self, model: InternVideo2, tokenizer):
        super().__init__()
        if not isinstance(model, InternVideo2):
            raise TypeError(f"model must be an InternVideo2, got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError("tokenizer must be a callable transformers tokenizer")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.embed_dim = model.config.embed_dim

    @property
    def config(self) -> InternVideo2Config:
        return self.model.config

    def tokenize(self, prompts: Sequence[str]):
        prompts = check_prompts(prompts)
        enc = self.tokenizer(prompts, padding="longest", truncation=True, max_length=self.config.max_text_len, return_tensors="pt")
        device = self.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def encode_text(self, prompts: Sequence[str]) -> TextFeatures:
        input_ids, attention_mask = self.tokenize(prompts)
        hidden, mask = self.model.encode_text(input_ids, attention_mask)
        cls = hidden[:, 0]
        return TextFeatures(input_ids, mask, hidden, cls, F.normalize(self.model.text_proj(cls), dim=-1))

    def encode_video(self, video: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> VideoFeatures:
        cfg = self.config
        pixels, frame_mask = prepare_video(
            video, num_frames=cfg.num_frames, size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std,
            frame_mask=frame_mask, dtype=self.model.vision_proj.weight.dtype,
        )
        tokens, pooled, token_mask, grid = self.model.encode_vision(pixels, frame_mask)
        if token_mask is None:
            token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        frame_idx, coords = self.model.video_positions(grid, tokens.device)
        embed = F.normalize(self.model.vision_proj(pooled), dim=-1)
        return VideoFeatures(tokens, token_mask, frame_idx, coords, grid, 1, tokens[:, 0], embed)

    def fusion_cross_attentions(self) -> List[nn.Module]:
        return self.model.fusion_cross_attentions()

    def match_logits(self, text: TextFeatures, video: VideoFeatures) -> torch.Tensor:
        check_pair_batch(text, video)
        return self.model.vtm_logits(text.tokens, text.mask, video.tokens, video.mask, video.frame_idx, video.coords)

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        directory = self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(str(directory))
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], *, map_location="cpu") -> "InternVideo2Backbone":
        """Load a backbone saved by :meth:`save_pretrained`, in eval mode (call ``.train()`` to train it)."""
        from transformers import AutoTokenizer

        model = InternVideo2.from_pretrained(directory, map_location=map_location)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return cls(model, tokenizer).eval()
