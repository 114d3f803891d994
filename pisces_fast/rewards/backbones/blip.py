"""BLIP image-text matching (``transformers.BlipForImageTextRetrieval``) as a video reward backbone.

BLIP is an image model; a video is fed as its frames' vision tokens concatenated:

* each sampled frame goes through the vision tower on its own (``(B·T, 1 + P, C)``);
* the per-frame [CLS] tokens are **averaged into one video [CLS]**, placed first, followed by the
  ``T·P`` patch tokens (frame-major, row-major within a frame). Why one token and not T: the ITM
  head was trained with exactly one global token among the keys; T copies of near-identical
  global tokens would take T times its share of every softmax, and dropping it would remove a
  token the head relies on. The average is also the video's global feature for the quality
  reward (``vision_proj`` of it, the frame-averaged BLIP image embedding);
* positions come from :func:`pisces_fast.ops.video_token_positions` with one prefix token.

Masking. In transformers 5.x, ``BlipTextSelfAttention`` silently drops the cross-attention mask
(it reads ``encoder_attention_mask``, which its caller never passes). So during
:meth:`BlipVideoBackbone.match_logits` each fusion cross-attention module runs our own forward
(the module's query/key/value projections + the swappable ``core``, with our key mask); the
override is an instance attribute removed afterwards, so the transformers model is never left
modified. Padding frames (``frame_mask``) are masked there and left out of the video [CLS] mean.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import video_token_positions
from .base import SoftmaxAttention, TextFeatures, VideoFeatures, VideoTextBackbone, check_pair_batch, head_merge
from .preprocess import CLIP_MEAN, CLIP_STD, check_prompts, prepare_video


@dataclass
class _FusionContext:
    key_padding_mask: Optional[torch.Tensor]
    query_padding_mask: Optional[torch.Tensor]
    frame_idx: torch.Tensor
    coords: torch.Tensor


def _blip_cross_attention_forward(module, ctx: _FusionContext, hidden_states, attention_mask=None,
                                  encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, **kwargs):
    """Replacement for ``BlipTextSelfAttention.forward`` (cross-attention only) with our masks and core."""
    if encoder_hidden_states is None:
        raise RuntimeError("BLIP fusion cross-attention called without encoder_hidden_states")
    if past_key_values is not None:
        raise RuntimeError("BlipVideoBackbone does not support KV caches in the fusion layers")
    b, n, _ = hidden_states.shape
    m = encoder_hidden_states.shape[1]
    h, d = module.num_attention_heads, module.attention_head_size
    q = module.query(hidden_states).view(b, n, h, d).transpose(1, 2)
    k = module.key(encoder_hidden_states).view(b, m, h, d).transpose(1, 2)
    v = module.value(encoder_hidden_states).view(b, m, h, d).transpose(1, 2)
    out = module.core(
        q, k, v, ctx.frame_idx, ctx.coords, scale=None,
        key_padding_mask=ctx.key_padding_mask, query_padding_mask=ctx.query_padding_mask,
    )
    return head_merge(out), None


class BlipVideoBackbone(VideoTextBackbone):
    """``BlipForImageTextRetrieval`` + its tokenizer as a :class:`VideoTextBackbone` (see module docstring).

    Args:
        model: a ``BlipForImageTextRetrieval`` (its text encoder's layers cross-attend to images).
        tokenizer: the BERT tokenizer that goes with it (``BlipProcessor(...).tokenizer``).
        num_frames: frames sampled uniformly from each video.
        max_text_len: prompt truncation length (BLIP uses 35).
        image_mean, image_std: pixel normalisation (BLIP's CLIP statistics by default).
    """

    def __init__(self, model, tokenizer, *, num_frames: int = 8, max_text_len: int = 35,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD):
        super().__init__()
        from transformers import BlipForImageTextRetrieval

        if not isinstance(model, BlipForImageTextRetrieval):
            raise TypeError(f"model must be a transformers BlipForImageTextRetrieval, got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError("tokenizer must be a callable transformers tokenizer")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the BLIP text model's vocab_size is {vocab}")
        self.model = model
        self.tokenizer = tokenizer
        self.num_frames = num_frames
        self.max_text_len = max_text_len
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.embed_dim = model.config.image_text_hidden_size
        vcfg = model.config.vision_config
        self.image_size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        self.patch_size = vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0]
        if not self.fusion_cross_attentions():
            raise ValueError("this BLIP text encoder has no cross-attention layers (text_config.is_decoder must be True)")
        dropout = float(model.config.text_config.attention_probs_dropout_prob)
        for site in self.fusion_cross_attentions():
            if not isinstance(getattr(site, "core", None), nn.Module):
                site.core = SoftmaxAttention(dropout)  # parameter-free: the state dict is unchanged

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, local_files_only: bool = True, **kwargs) -> "BlipVideoBackbone":
        """Load e.g. ``Salesforce/blip-itm-base-coco`` (from a local copy by default) with eager attention, in eval mode."""
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        model = BlipForImageTextRetrieval.from_pretrained(name_or_path, attn_implementation="eager",
                                                          local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        return cls(model, tokenizer, **kwargs).eval()

    # -- protocol --------------------------------------------------------------------------------
    def fusion_cross_attentions(self) -> List[nn.Module]:
        return [layer.crossattention.self for layer in self.model.text_encoder.encoder.layer if hasattr(layer, "crossattention")]

    def tokenize(self, prompts: Sequence[str]):
        prompts = check_prompts(prompts)
        enc = self.tokenizer(prompts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode_text(self, prompts: Sequence[str]) -> TextFeatures:
        input_ids, attention_mask = self.tokenize(prompts)
        hidden = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls = hidden[:, 0]
        embed = F.normalize(self.model.text_proj(cls), dim=-1)
        return TextFeatures(input_ids, attention_mask.bool(), hidden, cls, embed)

    def encode_video(self, video: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> VideoFeatures:
        frames, frame_mask = prepare_video(
            video, num_frames=self.num_frames, size=self.image_size, mean=self.image_mean, std=self.image_std,
            frame_mask=frame_mask, dtype=self.model.vision_proj.weight.dtype,
        )
        b, t = frames.shape[:2]
        hidden = self.model.vision_model(pixel_values=frames.flatten(0, 1)).last_hidden_state  # (B·T, 1 + P, C)
        hidden = hidden.view(b, t, hidden.shape[1], hidden.shape[2])
        frame_cls, patches = hidden[:, :, 0], hidden[:, :, 1:]
        p = patches.shape[2]
        side = self.image_size // self.patch_size
        if side * side != p:
            raise RuntimeError(f"BLIP vision tower returned {p} patches per frame, expected {side}x{side}")
        if frame_mask is None:
            video_cls = frame_cls.mean(1)
            mask = torch.ones(b, 1 + t * p, dtype=torch.bool, device=hidden.device)
        else:
            w = frame_mask.to(frame_cls.dtype).unsqueeze(-1)
            video_cls = (frame_cls * w).sum(1) / w.sum(1)
            patch_mask = frame_mask[:, :, None].expand(b, t, p).reshape(b, t * p)
            mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=hidden.device), patch_mask], dim=1)
        tokens = torch.cat([video_cls.unsqueeze(1), patches.reshape(b, t * p, -1)], dim=1)
        frame_idx, coords = video_token_positions(t, side, side, prefix_tokens=1, device=hidden.device)
        embed = F.normalize(self.model.vision_proj(video_cls), dim=-1)
        return VideoFeatures(tokens, mask, frame_idx, coords, (t, side, side), 1, video_cls, embed)

    @contextlib.contextmanager
    def _fusion_forward(self, ctx: _FusionContext):
        sites = self.fusion_cross_attentions()
        try:
            for site in sites:
                site.forward = functools.partial(_blip_cross_attention_forward, site, ctx)
            yield
        finally:
            for site in sites:
                site.__dict__.pop("forward", None)

    def match_logits(self, text: TextFeatures, video: VideoFeatures) -> torch.Tensor:
        check_pair_batch(text, video)
        key_mask = None if bool(video.mask.all()) else video.mask
        query_mask = None if bool(text.mask.all()) else text.mask
        ctx = _FusionContext(key_mask, query_mask, video.frame_idx, video.coords)
        with self._fusion_forward(ctx):
            out = self.model.text_encoder(
                input_ids=text.input_ids, attention_mask=text.mask.long(), encoder_hidden_states=video.tokens,
            ).last_hidden_state
        return self.model.itm_head(out[:, 0])


def tiny_blip_config(vocab_size: int, *, width: int = 32, layers: int = 2, heads: int = 4, image_size: int = 32,
                     patch_size: int = 8, embed_dim: int = 16, max_text_len: int = 40):
    """A random-weight ``BlipConfig`` small enough for CPU tests (ids: [PAD]=0, [CLS]=2, [SEP]=3)."""
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=2 * width, max_position_embeddings=max_text_len, pad_token_id=0,
                         bos_token_id=2, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size, initializer_range=0.02),
        image_text_hidden_size=embed_dim,
    )
