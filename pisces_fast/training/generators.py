"""Video generators over diffusers: the denoiser, its noise schedule, a video codec (VAE) and a text encoder.

Two families share one interface (`VideoGenerator`):
- epsilon prediction, `UNet3DConditionModel` (VideoCrafter2 / ModelScope), DDPM/DDIM alphas_cumprod schedule;
- flow matching, `HunyuanVideoTransformer3DModel` and `WanTransformer3DModel`, sigma in (0, 1] with
  x_sigma = (1 - sigma) x0 + sigma * noise and velocity target v = noise - x0.

Latents are always (B, C, F, h, w); pixel videos are (B, T, 3, H, W) in [0, 1] (the reward interface).
`load_generator` reads a diffusers-format directory (unet/ or transformer/, scheduler/, optional vae/,
text_encoder/ + tokenizer/); `build_tiny_generator` makes small random models for tests and CI;
`save_generator` writes the directory layout that `load_generator` reads.
"""
from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from packaging.version import Version

from pisces_fast.rewards.backbones.preprocess import check_video  # the one video check (rewards sit below training)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextConditioning:
    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, P)

    def repeat(self, n: int) -> "TextConditioning":
        return TextConditioning(self.embeds.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0),
                                self.pooled.repeat_interleave(n, 0))

    def cat(self, other: "TextConditioning") -> "TextConditioning":
        return TextConditioning(torch.cat([self.embeds, other.embeds]), torch.cat([self.mask, other.mask]),
                                torch.cat([self.pooled, other.pooled]))


# ----------------------------------------------------------------------------------------------------------
# text encoders


class HashTextEncoder(nn.Module):
    """A tiny frozen text encoder for small worlds: words hashed (crc32) into an embedding table + positions.

    No tokenizer files are needed, so it can ship inside a few-MB model directory; a BOS token is always
    present so that no prompt (not even "") has an all-masked sequence.
    """

    def __init__(self, dim: int = 16, pooled_dim: int = 8, vocab_size: int = 1024, max_length: int = 16):
        super().__init__()
        self.config = {"dim": dim, "pooled_dim": pooled_dim, "vocab_size": vocab_size, "max_length": max_length}
        self.token = nn.Embedding(vocab_size + 1, dim)  # last id = BOS
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        self.pool = nn.Linear(dim, pooled_dim)
        nn.init.normal_(self.position, std=0.1)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        L, V = self.config["max_length"], self.config["vocab_size"]
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = [V] + [zlib.crc32(w.encode()) % V for w in p.lower().replace(",", " ").split()]
            words = words[:L]
            ids[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = True
        return ids, mask

    def forward(self, prompts: list[str]) -> TextConditioning:
        ids, mask = self.tokenize(prompts)
        dev = self.position.device
        ids, mask = ids.to(dev), mask.to(dev)
        x = (self.token(ids) + self.position[None]) * mask[..., None]
        pooled = self.pool(x.sum(1) / mask.sum(1, keepdim=True))
        return TextConditioning(x, mask, pooled)

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as fh:
            json.dump({"_class_name": "HashTextEncoder", **self.config}, fh, indent=1)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(directory, "model.safetensors"))

    @classmethod
    def load(cls, directory: str) -> "HashTextEncoder":
        from safetensors.torch import load_file

        with open(os.path.join(directory, "config.json")) as fh:
            cfg = json.load(fh)
        cfg.pop("_class_name")
        enc = cls(**cfg)
        enc.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
        return enc


class TransformersTextEncoder(nn.Module):
    """A transformers encoder (CLIPTextModel, T5EncoderModel, UMT5EncoderModel, ...) plus its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, pooled_dim: Optional[int] = None):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.pooled_dim = pooled_dim

    def forward(self, prompts: list[str]) -> TextConditioning:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        dev = next(self.model.parameters()).device
        ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long())
        hidden = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        if self.pooled_dim is not None and pooled.shape[-1] != self.pooled_dim:
            pooled = pooled[..., : self.pooled_dim]
        return TextConditioning(hidden, mask, pooled)


# The stock pipeline each text-conditioning family comes from, and its default max prompt length
# (`TextToVideoSDPipeline`: the CLIP tokenizer's model_max_length, 77; `WanPipeline.__call__`: 512;
# `HunyuanVideoPipeline.__call__`: 256 Llama tokens after the template's crop).
PIPELINE_FAMILIES = {"modelscope": "TextToVideoSDPipeline", "wan": "WanPipeline", "hunyuan": "HunyuanVideoPipeline"}
DEFAULT_TEXT_MAX_LENGTH = {"modelscope": 77, "wan": 512, "hunyuan": 256}


class PipelineTextEncoder(nn.Module):
    """Prompt conditioning computed by the stock diffusers pipeline's own `encode_prompt`, so a LoRA trained here sees
    exactly what it sees at inference in `TextToVideoSDPipeline` / `WanPipeline` / `HunyuanVideoPipeline`:

    - modelscope: CLIP, the tokenizer's 77 tokens, no attention mask passed (every position feeds the UNet);
    - wan: UMT5EncoderModel, `max_length` tokens (512 like `WanPipeline.__call__`), padding positions zeroed;
    - hunyuan: the Llama prompt template with its crop, `hidden_states[-3]`, the attention mask, and
      `text_encoder_2` (CLIP) `pooler_output` as the pooled vector.

    The pipeline object built here holds only the text components (it is not an nn.Module, so its modules are
    registered once, on this module). `mask`: the tokenizer's mask (all True for modelscope, whose UNet attends to
    every position); `pooled`: CLIP's pooled vector for hunyuan, an empty (B, 0) tensor otherwise (unused).
    """

    def __init__(self, family: str, text_encoder: nn.Module, tokenizer, text_encoder_2: Optional[nn.Module] = None,
                 tokenizer_2=None, max_length: Optional[int] = None):
        super().__init__()
        import diffusers

        if family not in PIPELINE_FAMILIES:
            raise ValueError(f"text family: expected one of {sorted(PIPELINE_FAMILIES)}, got {family!r}")
        self.family, self.text_encoder, self.text_encoder_2 = family, text_encoder, text_encoder_2
        if family == "modelscope":
            native = int(tokenizer.model_max_length)
            if max_length is not None and max_length != native:
                raise ValueError(f"model.text_max_length: TextToVideoSDPipeline always pads CLIP prompts to the tokenizer's "
                                 f"model_max_length ({native}); got {max_length} (leave it unset)")
            max_length = native
        self.max_length = int(max_length or DEFAULT_TEXT_MAX_LENGTH[family])
        cls = getattr(diffusers, PIPELINE_FAMILIES[family])
        kwargs = dict(text_encoder=text_encoder, tokenizer=tokenizer, vae=None, scheduler=None)
        if family == "modelscope":
            kwargs["unet"] = None
        else:
            kwargs["transformer"] = None
        if family == "hunyuan":
            kwargs.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        import logging

        logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
        level = logger.level
        logger.setLevel(logging.ERROR)  # TextToVideoSDPipeline's deprecation notice: it is the pipeline users load
        try:
            self.pipe = cls(**kwargs)
        finally:
            logger.setLevel(level)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    def forward(self, prompts: list[str]) -> TextConditioning:
        dev = next(self.text_encoder.parameters()).device
        B = len(prompts)
        if self.family == "modelscope":
            embeds, _ = self.pipe.encode_prompt(list(prompts), dev, 1, False)
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=dev)
            return TextConditioning(embeds, mask, embeds.new_zeros(B, 0))
        if self.family == "wan":
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_length, device=dev)
            tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_length,
                                 truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            return TextConditioning(embeds, tok.attention_mask.to(dev).bool(), embeds.new_zeros(B, 0))
        embeds, pooled, mask = self.pipe.encode_prompt(list(prompts), device=dev, max_sequence_length=self.max_length)
        return TextConditioning(embeds, mask.bool(), pooled)


# ----------------------------------------------------------------------------------------------------------
# video codecs: pixels (B,T,3,H,W) in [0,1]  <->  latents (B,C,F,h,w)


class PixelCodec(nn.Module):
    """Identity "VAE" for pixel-space tiny models: latents are the video mapped to [-1, 1]."""

    per_frame = True
    latent_channels = 3
    spatial_factor = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return (video * 2 - 1).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)


class FrameVAECodec(nn.Module):
    """A 2-D `AutoencoderKL` applied frame by frame (VideoCrafter2 / ModelScope)."""

    per_frame = True

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.latent_channels = vae.config.latent_channels
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        B, T = video.shape[:2]
        frames = (video.flatten(0, 1) * 2 - 1).to(self.vae.dtype)
        z = self.vae.encode(frames).latent_dist.mode()
        z = (z.float() - self.shift) * self.scale
        return z.unflatten(0, (B, T)).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        B, C, F = latents.shape[:3]
        z = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / self.scale + self.shift
        x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return ((x.unflatten(0, (B, F)) + 1) / 2).clamp(0, 1)


class VideoVAECodec(nn.Module):
    """A 3-D video VAE (AutoencoderKLHunyuanVideo, AutoencoderKLWan, ...) on (B, 3, T, H, W) in [-1, 1]."""

    per_frame = False

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.latent_channels = getattr(cfg, "latent_channels", None) or getattr(cfg, "z_dim")
        self.spatial_factor = getattr(cfg, "spatial_compression_ratio", None) or getattr(vae, "spatial_compression_ratio", 8)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1) if mean else torch.zeros(1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1) if std else torch.ones(1), persistent=False)
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        x = (video * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mode().float()
        return (z - self.mean) / self.std * self.scale

    # Gradient checkpointing of the decode (reward.vae_checkpointing): a `checkpoint(fn, *args)` callable, or None.
    checkpoint_func: Optional[Callable] = None

    def set_checkpointing(self, func: Optional[Callable]) -> None:
        """Checkpoint the decode with `func` (None: off): each causal chunk / temporal tile the codec decodes itself,
        and, where diffusers supports it (AutoencoderKLHunyuanVideo), the VAE's own blocks inside them. It stays on
        (it only acts with gradients enabled), because a recomputation in backward must run the blocks as the
        forward did."""
        self.checkpoint_func = func
        if getattr(self.vae, "_supports_gradient_checkpointing", False):
            if func is None:
                self.vae.disable_gradient_checkpointing()
            else:
                self.vae.enable_gradient_checkpointing(gradient_checkpointing_func=func)

    def _latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents / self.scale * self.std + self.mean).to(self.vae.dtype)

    def _to_video(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) in [-1, 1] -> (B, T, 3, H, W) in [0, 1]
        return ((x.float().permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if (self.checkpoint_func is not None and torch.is_grad_enabled() and type(self.vae).__name__ == "AutoencoderKLWan"
                and not self.vae.use_tiling):
            return self.decode_frames(latents, list(range(self.pixel_frames(latents.shape[2]))), sparse=False)
        x = self.vae.decode(self._latents_for_vae(latents)).sample
        return self._to_video(x)

    @contextlib.contextmanager
    def tiling(self, on: bool):
        """Spatially tiled decoding (diffusers' `vae.enable_tiling()`, default tile sizes) while inside, if `on`."""
        if not on:
            yield
            return
        if not hasattr(self.vae, "use_tiling"):
            raise ValueError(f"reward.vae_tiling: {type(self.vae).__name__} has no tiled decoding")
        before, self.vae.use_tiling = self.vae.use_tiling, True
        try:
            yield
        finally:
            self.vae.use_tiling = before

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_ratio

    @property
    def temporal_ratio(self) -> int:
        cfg = self.vae.config
        return int(getattr(cfg, "temporal_compression_ratio", None) or getattr(cfg, "scale_factor_temporal", None) or 4)

    def decode_frames(self, latents: torch.Tensor, frames: list[int], sparse: bool = True) -> torch.Tensor:
        """Pixel frames `frames` of the decoded video, (B, len(frames), 3, H, W) in [0, 1], each exactly the frame the
        full `vae.decode` gives (bit for bit on the same device and dtype), decoding only what those frames need:

        * AutoencoderKLWan decodes latent frame by latent frame through a causal cache (a latent prefix decodes to
          exactly the pixel prefix; a window not starting at 0 does not, the cache is missing). The chunks after the
          last wanted frame are skipped. `sparse`: chunks holding no wanted frame run without gradient (they only fill
          the cache) and the cache is detached between chunks, so the reward's gradient reaches the latent frames its
          frames come from, not the earlier ones through the cache (truncated backpropagation through the causal
          context; the frames themselves are exact). Not `sparse`: every chunk up to the last wanted one keeps its
          graph (the exact gradient).
        * AutoencoderKLHunyuanVideo decodes overlapping temporal tiles independently and blends them (its GroupNorms
          see a whole tile, so it is not causal within a tile): only the tiles the wanted frames come from (and the
          previous one for a frame in a blend zone) are decoded; frames and gradient are both exact. Without
          framewise decoding (few latent frames) the whole latent is decoded.
        With `checkpoint_func` set, each chunk / tile is checkpointed (recomputed in backward)."""
        T = self.pixel_frames(latents.shape[2])
        if not frames or min(frames) < 0 or max(frames) >= T:
            raise ValueError(f"frames: expected indices in [0, {T}), got {frames}")
        name = type(self.vae).__name__
        if name == "AutoencoderKLWan":
            if self.vae.use_tiling:
                raise ValueError("reward.vae_tiling: the frame-selective AutoencoderKLWan decode does not tile; use "
                                 "reward.vae_decode 'full' with tiling, or sparse without it")
            x = self._decode_causal_chunks(self._latents_for_vae(latents), frames, sparse)
        elif name == "AutoencoderKLHunyuanVideo":
            x = self._decode_temporal_tiles(self._latents_for_vae(latents), frames)
        else:
            raise ValueError(f"reward.vae_decode 'sparse': frame-selective decoding is implemented for AutoencoderKLWan "
                             f"and AutoencoderKLHunyuanVideo, not {name}; use reward.vae_decode 'full'")
        return self._to_video(x)

    def _run(self, fn: Callable, *args):
        if self.checkpoint_func is not None and torch.is_grad_enabled():
            return self.checkpoint_func(fn, *args)
        return fn(*args)

    def _decode_causal_chunks(self, z: torch.Tensor, frames: list[int], sparse: bool) -> torch.Tensor:
        """AutoencoderKLWan._decode, chunk by chunk (diffusers 0.3x-0.4x: post_quant_conv has kernel 1 in time, the
        decoder takes one latent frame with `feat_cache` / `feat_idx` / `first_chunk`)."""
        vae, r = self.vae, self.temporal_ratio
        chunk_of = [0 if p == 0 else 1 + (p - 1) // r for p in frames]
        wanted = set(chunk_of)

        def chunk(zi, first, *cache):
            feat = list(cache)  # the decoder replaces entries: a recomputation must start from the same cache
            out = vae.decoder(vae.post_quant_conv(zi), feat_cache=feat, feat_idx=[0], first_chunk=first)
            return out, feat

        vae.clear_cache()
        cache = list(vae._feat_map)
        outs = {}
        try:
            for i in range(max(wanted) + 1):
                zi = z[:, :, i:i + 1]
                if sparse:
                    cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in cache]
                if sparse and i not in wanted:
                    with torch.no_grad():
                        _, cache = chunk(zi, i == 0, *cache)
                    continue
                out, cache = self._run(lambda zz, *cc, _first=(i == 0): chunk(zz, _first, *cc), zi, *cache)
                if i in wanted:
                    outs[i] = out
        finally:
            vae.clear_cache()
        picked = [outs[c][:, :, 0 if p == 0 else (p - 1) % r] for p, c in zip(frames, chunk_of)]
        x = torch.stack(picked, dim=2)
        if getattr(vae.config, "patch_size", None) is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            x = unpatchify(x, patch_size=vae.config.patch_size)
        return torch.clamp(x, min=-1.0, max=1.0)

    def _decode_temporal_tiles(self, z: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """AutoencoderKLHunyuanVideo._decode for the temporal tiles `frames` need (diffusers 0.32-0.4x), each tile
        decoded as diffusers does (spatially tiled under `vae.use_tiling`)."""
        vae, r = self.vae, self.temporal_ratio
        F = z.shape[2]
        t_min = vae.tile_sample_min_num_frames // r
        if not (vae.use_framewise_decoding and F > t_min):
            return self._decode_tile(z)[:, :, frames]
        t_stride = vae.tile_sample_stride_num_frames // r
        stride = vae.tile_sample_stride_num_frames
        blend = vae.tile_sample_min_num_frames - stride
        rows: dict = {}

        def row(k: int) -> torch.Tensor:  # tile k decoded (its first frame dropped after the first tile)
            if k not in rows:
                decoded = self._decode_tile(z[:, :, k * t_stride:k * t_stride + t_min + 1])
                rows[k] = decoded if k == 0 else decoded[:, :, 1:]
            return rows[k]

        picked = []
        for p in frames:
            if p <= stride:
                picked.append(row(0)[:, :, p])
                continue
            k, local = 1 + (p - stride - 1) // stride, (p - stride - 1) % stride
            a, b = row(k - 1), row(k)
            e = min(a.shape[2], b.shape[2], blend)
            if local < e:  # diffusers' blend_t, the same expression
                picked.append(a[:, :, -e + local] * (1 - local / e) + b[:, :, local] * (local / e))
            else:
                picked.append(b[:, :, local])
        return torch.stack(picked, dim=2)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """One temporal tile: vae.decoder(vae.post_quant_conv(z)), or under `vae.use_tiling` (HunyuanVideoPipeline's
        example enables it) AutoencoderKLHunyuanVideo.tiled_decode with each spatial tile decoded (and checkpointed)
        on its own; the blends are diffusers' own blend_v / blend_h."""
        vae, s = self.vae, self.spatial_factor

        def dec(t):
            return vae.decoder(vae.post_quant_conv(t))

        th, tw = vae.tile_sample_min_height // s, vae.tile_sample_min_width // s
        if not (vae.use_tiling and (z.shape[-1] > tw or z.shape[-2] > th)):
            return self._run(dec, z)
        sh, sw = vae.tile_sample_stride_height // s, vae.tile_sample_stride_width // s
        bh = vae.tile_sample_min_height - vae.tile_sample_stride_height
        bw = vae.tile_sample_min_width - vae.tile_sample_stride_width
        H, W = z.shape[-2:]
        rows = [[self._run(dec, z[:, :, :, i:i + th, j:j + tw]) for j in range(0, W, sw)] for i in range(0, H, sh)]
        result_rows = []
        for i, row in enumerate(rows):
            result_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = vae.blend_v(rows[i - 1][j], tile, bh)
                if j > 0:
                    tile = vae.blend_h(row[j - 1], tile, bw)
                result_row.append(tile[:, :, :, :vae.tile_sample_stride_height, :vae.tile_sample_stride_width])
            result_rows.append(torch.cat(result_row, dim=-1))
        return torch.cat(result_rows, dim=3)[:, :, :, :H * s, :W * s]


def activation_checkpoint(fn: Callable, *args):
    """torch's non-reentrant activation checkpointing (what diffusers' enable_gradient_checkpointing uses)."""
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def strided_frame_indices(num_frames: int, wanted: Optional[int]) -> list[int]:
    """`wanted` frames spread evenly over `num_frames` (all frames when wanted is None or too large)."""
    if wanted is None or wanted >= num_frames:
        return list(range(num_frames))
    return torch.linspace(0, num_frames - 1, wanted).round().long().tolist()


# ----------------------------------------------------------------------------------------------------------
# the generator


class VideoGenerator:
    """A text-to-video diffusion model split into the trainable denoiser and frozen helpers.

    `prediction` is "epsilon" (UNet3D) or "flow" (Hunyuan/Wan). The denoiser is called through
    `denoise(forward, ...)`, where `forward` is whatever runs the module (the module itself, or a DeepSpeed
    engine wrapping it), so the same code serves plain torch and ZeRO-2/3.
    """

    def __init__(self, arch: str, denoiser: nn.Module, scheduler, codec: nn.Module, text_encoder: nn.Module,
                 num_frames: int, height: int, width: int, dtype: torch.dtype = torch.float32):
        if arch not in ("unet3d", "hunyuan", "wan"):
            raise ValueError(f"arch: expected 'unet3d', 'hunyuan' or 'wan', got {arch!r}")
        self.arch, self.denoiser, self.scheduler = arch, denoiser, scheduler
        self.codec, self.text_encoder = codec, text_encoder
        self.prediction = "epsilon" if arch == "unet3d" else "flow"
        self.num_frames, self.height, self.width = num_frames, height, width
        self.dtype = dtype
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if self.prediction == "epsilon":
            pt = scheduler.config.get("prediction_type", "epsilon")
            if pt != "epsilon":
                raise ValueError(f"scheduler prediction_type: only 'epsilon' is supported for UNet3D, got {pt!r}")
            self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.guidance_embeds = bool(getattr(denoiser.config, "guidance_embeds", False))
        # Consistency sampler grid and boundary condition (LCMScheduler's original_inference_steps / timestep_scaling);
        # the CD mode sets them from its cd config (`use_consistency_config`) so the sampler matches the training.
        self.consistency_original_steps, self.consistency_timestep_scaling, self.consistency_sigma_data = 50, 10.0, 0.5
        for module in (codec, text_encoder):
            module.requires_grad_(False)
            module.eval()

    # -- shapes -------------------------------------------------------------------------------------------
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        f = self.codec.spatial_factor
        frames = self.num_frames
        if not self.codec.per_frame:  # causal video VAEs: 1 + (T - 1) / 4 latent frames
            ratio = getattr(self.codec.vae.config, "temporal_compression_ratio", None) or 4
            frames = 1 + (self.num_frames - 1) // ratio
        return (batch, self.codec.latent_channels, frames, self.height // f, self.width // f)

    def to(self, device) -> "VideoGenerator":
        self.denoiser.to(device)
        self.codec.to(device)
        self.text_encoder.to(device)
        if self.prediction == "epsilon":
            self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    # -- text and video -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextConditioning:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        c = self.text_encoder(list(prompts))
        return TextConditioning(c.embeds.float(), c.mask, c.pooled.float())

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video, "video")
        return self.codec.encode(video.to(self.device)).float()

    def decode_latents(self, latents: torch.Tensor, num_frames: Optional[int] = None, vae_decode: str = "full",
                       checkpointing: bool = False, tiling: bool = False) -> torch.Tensor:
        """Latents -> (B, T', 3, H, W) in [0, 1], differentiable; `num_frames` strided frames (None: all).

        Per-frame codecs subsample the latents before decoding (cheap, as T2V-Turbo does; `vae_decode` and
        `checkpointing` change nothing). Temporal video VAEs (reward.vae_decode, reward.vae_checkpointing):
        "full" decodes every latent frame with its graph and then picks the frames; "sparse" decodes only what the
        picked frames need (VideoVAECodec.decode_frames: the same frames; for Wan the gradient is truncated at the
        causal cache); `checkpointing` recomputes each decoded chunk / tile in backward; `tiling` decodes in spatial
        tiles (diffusers' enable_tiling)."""
        if vae_decode not in ("full", "sparse"):
            raise ValueError(f"reward.vae_decode: expected 'full' or 'sparse', got {vae_decode!r}")
        if self.codec.per_frame:
            idx = strided_frame_indices(latents.shape[2], num_frames)
            return self.codec.decode(latents[:, :, idx])
        if checkpointing and self.codec.checkpoint_func is None:
            self.codec.set_checkpointing(activation_checkpoint)
        elif not checkpointing and self.codec.checkpoint_func is not None:
            self.codec.set_checkpointing(None)
        idx = strided_frame_indices(self.codec.pixel_frames(latents.shape[2]), num_frames)
        with self.codec.tiling(tiling):
            if vae_decode == "sparse":
                return self.codec.decode_frames(latents, idx, sparse=True)
            video = self.codec.decode(latents)
        return video[:, idx]

    # -- guidance (w) conditioning ------------------------------------------------------------------------
    @property
    def w_conditioned(self) -> bool:
        """The denoiser takes the guidance scale as an input (Hunyuan's `guidance`, a UNet3D's `timestep_cond`):
        guided sampling is one pass with w, not two CFG passes."""
        if self.arch == "hunyuan":
            return self.guidance_embeds
        if self.arch != "unet3d" or getattr(self.denoiser.config, "time_cond_proj_dim", None) is None:
            return False
        # With the adapters disabled (the teacher / GRPO reference) a student's w projection is off: CFG again.
        return not getattr(getattr(self.denoiser.time_embedding, "cond_proj", None), "_disable_adapters", False)

    def use_consistency_config(self, cd) -> None:
        """Sample with the consistency grid and boundary condition a CD run trained (`cd`: its ``CDConfig``)."""
        self.consistency_original_steps, self.consistency_timestep_scaling = cd.num_ddim_timesteps, cd.timestep_scaling
        self.consistency_sigma_data = cd.sigma_data

    def enable_guidance_conditioning(self, dim: int = 256) -> None:
        """Give the student a w input (C2). UNet3D: a zero-initialised `time_embedding.cond_proj` (time_cond_proj_dim
        = dim) trained and exported with the LoRA (call before `add_lora`). Hunyuan: its own `guidance` input
        (nothing to add). Wan: diffusers' WanTransformer3DModel has no guidance input, so it cannot be w-conditioned:
        distil it at one fixed w (cd.guidance_scale_min == max) and sample the student with guidance_scale 1."""
        if self.arch == "unet3d":
            from .lora import add_guidance_projection

            add_guidance_projection(self.denoiser, dim)
        elif self.arch == "hunyuan":
            if not self.guidance_embeds:
                raise ValueError("cd.guidance_conditioning: this HunyuanVideoTransformer3DModel was built with "
                                 "guidance_embeds=False, so it has no guidance input")
        else:
            raise ValueError("cd.guidance_conditioning: WanTransformer3DModel has no guidance (w) input in diffusers; set "
                             "cd.guidance_conditioning false and cd.guidance_scale_min == cd.guidance_scale_max (the "
                             "student is distilled at that fixed w; sample it with guidance_scale 1)")

    # -- denoiser -----------------------------------------------------------------------------------------
    def denoise(self, forward: Callable, latents: torch.Tensor, t: torch.Tensor, text: TextConditioning,
                guidance: Optional[float] = None) -> torch.Tensor:
        """Raw model output (epsilon or velocity), float32. `t`: integer timesteps (epsilon) or sigmas (flow)."""
        B = latents.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)
        x = latents.to(self.dtype)
        ehs = text.embeds.to(self.dtype)
        if self.arch == "unet3d":
            cond_dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
            w_emb = None
            if cond_dim is not None and guidance is not None:
                from .lora import guidance_scale_embedding

                w_emb = guidance_scale_embedding(torch.full((B,), float(guidance)), cond_dim).to(x.device, self.dtype)
            out = forward(sample=x, timestep=t.long(), encoder_hidden_states=ehs, timestep_cond=w_emb,
                          return_dict=False)[0]
        elif self.arch == "hunyuan":
            g = torch.full((B,), float(guidance if guidance is not None else 1.0) * 1000.0, device=x.device, dtype=self.dtype)
            out = forward(hidden_states=x, timestep=(t * 1000).to(self.dtype), encoder_hidden_states=ehs,
                          encoder_attention_mask=text.mask, pooled_projections=text.pooled.to(self.dtype),
                          guidance=g if self.guidance_embeds else None, return_dict=False)[0]
        else:
            out = forward(hidden_states=x, timestep=(t * 1000).to(self.dtype), encoder_hidden_states=ehs,
                          return_dict=False)[0]
        return out.float()

    def guided(self, forward: Callable, latents: torch.Tensor, t: torch.Tensor, cond: TextConditioning,
               uncond: TextConditioning, scale: float, w_input: Optional[bool] = None) -> torch.Tensor:
        """Classifier-free guidance out = u + w (c - u) (= c + (w-1)(c-u)); guidance-distilled models
        (Hunyuan with guidance_embeds) and w-conditioned students take w as an input instead of a second pass.
        `w_input` overrides that choice (the CD teacher of a UNet3D student is the base model: real CFG)."""
        if self.w_conditioned if w_input is None else w_input:
            return self.denoise(forward, latents, t, cond, guidance=scale)
        if scale == 1.0:
            return self.denoise(forward, latents, t, cond)
        both = self.denoise(forward, torch.cat([latents, latents]), torch.cat([t.reshape(-1).expand(latents.shape[0])] * 2),
                            cond.cat(uncond))
        c, u = both.chunk(2)
        return u + scale * (c - u)

    # -- schedule -----------------------------------------------------------------------------------------
    def alpha_at(self, like: torch.Tensor, t) -> torch.Tensor:
        """alphas_cumprod[t] broadcast to `like`; t < 0 means the end of the chain (final_alpha_cumprod)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().reshape(-1)
        final = float(getattr(self.scheduler, "final_alpha_cumprod", self.alphas_cumprod[0]))
        ab = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.full_like(t, 0, dtype=torch.float32) + final)
        return bcast(ab, like)

    def x0_from_output(self, latents: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            ab = bcast(self.alphas_cumprod[t.long()], latents)
            return (latents - (1 - ab).sqrt() * out) / ab.sqrt()
        return latents - bcast(t, latents) * out

    def eps_from_output(self, latents: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return out
        return latents + (1 - bcast(t, latents)) * out  # flow: eps = x + (1 - sigma) v

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            ab = bcast(self.alphas_cumprod[t.long()], x0)
            return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        s = bcast(t, x0)
        return (1 - s) * x0 + s * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise if self.prediction == "epsilon" else noise - x0

    def sample_train_t(self, batch: int, device) -> torch.Tensor:
        """Uniform training timesteps (epsilon) or sigmas from the scheduler's shifted grid (flow)."""
        if self.prediction == "epsilon":
            return torch.randint(0, self.num_train_timesteps, (batch,), device=device)
        grid = self.flow_sigmas(self.num_train_timesteps)[:-1].to(device)
        return grid[torch.randint(0, len(grid), (batch,), device=device)]

    def flow_sigmas(self, num_steps: int) -> torch.Tensor:
        """Decreasing sigmas of an n-step flow sampler, ending with 0 (scheduler's shift applied), on the grid the
        family's stock pipeline uses: `HunyuanVideoPipeline` passes sigmas linspace(1, 0, n + 1)[:-1];
        `WanPipeline` calls set_timesteps(n)."""
        if self.arch == "hunyuan":
            import numpy as np

            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
        else:
            self.scheduler.set_timesteps(num_steps)
        return self.scheduler.sigmas.float().clone()

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """Decreasing timesteps (epsilon, DDIM 'leading' spacing) or sigmas incl. the final 0 (flow)."""
        if self.prediction == "epsilon":
            self.scheduler.set_timesteps(num_steps)
            return self.scheduler.timesteps.long().clone()
        return self.flow_sigmas(num_steps)

    @torch.no_grad()
    def sample(self, forward: Callable, prompts: list[str], num_steps: int, guidance_scale: float = 1.0,
               generator: Optional[torch.Generator] = None, on_step: Optional[Callable[[], None]] = None, *,
               sampler: str = "ddim", latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample videos -> pixels (B, T, 3, H, W) in [0, 1] (see `pisces_fast.training.sampling`).

        sampler "ddim": deterministic DDIM (eta = 0) / flow Euler ODE, as the stock pipelines with DDIMScheduler /
        FlowMatchEulerDiscreteScheduler. sampler "consistency": LCM multistep (epsilon) / re-noising flow sampler,
        as LCMScheduler / FlowMatchEulerDiscreteScheduler(stochastic_sampling=True). `guidance_scale` is the w input
        of a w-conditioned denoiser (one pass), CFG otherwise. `latents`: fixed initial noise (B, C, F, h, w);
        `generator` draws the initial noise (when `latents` is None) and the consistency sampler's fresh noise.
        ``on_step`` is called after every denoising step (a progress bar's update)."""
        from .sampling import sample_latents

        x = sample_latents(self, forward, prompts, num_steps, guidance_scale, generator, on_step, sampler=sampler,
                           latents=latents)
        return self.decode_latents(x)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=like.device, dtype=torch.float32)
    if v.dim() == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------------------
# building and loading


def tiny_denoiser(arch: str, in_channels: int, text_dim: int = 16, pooled_dim: int = 8) -> nn.Module:
    """The tiny random configs from the environment notes (fwd+bwd well under a second on CPU)."""
    if arch == "unet3d":
        from diffusers import UNet3DConditionModel

        return UNet3DConditionModel(
            sample_size=16, in_channels=in_channels, out_channels=in_channels,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=text_dim,
            attention_head_dim=8)
    if arch == "hunyuan":
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel(
            in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=text_dim, pooled_projection_dim=pooled_dim, rope_axes_dim=(4, 6, 6))
    if arch == "wan":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
            out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    raise ValueError(f"arch: expected 'unet3d', 'hunyuan' or 'wan', got {arch!r}")


def tiny_scheduler(arch: str):
    if arch == "unet3d":
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_tiny_generator(arch: str = "unet3d", vae: str = "pixel", num_frames: int = 8, height: int = 16, width: int = 16,
                         seed: int = 0, text_max_length: Optional[int] = 16, dtype: str = "float32") -> VideoGenerator:
    """A small random generator (tests, CI, the embedded world's starting point)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # tiny weights depend on `seed` only, never on the training RNG stream
    try:
        if vae == "pixel":
            codec: nn.Module = PixelCodec()
        elif vae == "tiny_kl":
            from diffusers import AutoencoderKL

            codec = FrameVAECodec(AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
                norm_num_groups=4, sample_size=max(height, width)))
        else:
            raise ValueError(f"vae: expected 'pixel' or 'tiny_kl', got {vae!r}")
        text = HashTextEncoder(dim=16, pooled_dim=8, max_length=text_max_length or 16)
        denoiser = tiny_denoiser(arch, codec.latent_channels)
    finally:
        torch.random.set_rng_state(state)
    if dtype != "float32":
        denoiser.to(_DTYPES[dtype])
    return VideoGenerator(arch, denoiser, tiny_scheduler(arch), codec, text, num_frames, height, width, _DTYPES[dtype])


def _class_name(directory: str) -> str:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model directory: missing {path}")
    with open(path) as fh:
        return json.load(fh).get("_class_name", "")


def load_generator(path: str, num_frames: int = 8, height: Optional[int] = None, width: Optional[int] = None,
                   dtype: str = "float32", text_max_length: Optional[int] = None) -> VideoGenerator:
    """Load a diffusers-format directory. Layout:

        unet/ (UNet3DConditionModel) or transformer/ (HunyuanVideo/Wan transformer), scheduler/,
        vae/ (optional; absent = pixel space), text_encoder/ (+ tokenizer/ for transformers encoders,
        or our HashTextEncoder config), text_encoder_2/ + tokenizer_2/ (HunyuanVideo's CLIP),
        optional pisces_generator.json {"num_frames", "height", "width"}.

    Text conditioning follows the stock pipeline of the layout (`PipelineTextEncoder`, the encoder classes the
    pipelines load) for UNet3D + CLIPTextModel (TextToVideoSDPipeline), Wan + UMT5 (WanPipeline) and Hunyuan + Llama
    + CLIP (HunyuanVideoPipeline); any other transformers encoder gets `TransformersTextEncoder`. `text_max_length`
    None = the family's default (77 / 512 / 256; 16 for other encoders). Flow models always sample with
    FlowMatchEulerDiscreteScheduler (a UniPC / other flow scheduler config is converted, keeping its shift).
    """
    import diffusers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path: directory not found: {path}")
    torch_dtype = _DTYPES[dtype]
    meta = {}
    if os.path.isfile(os.path.join(path, "pisces_generator.json")):
        with open(os.path.join(path, "pisces_generator.json")) as fh:
            meta = json.load(fh)
    if os.path.isdir(os.path.join(path, "unet")):
        sub, arch = "unet", "unet3d"
        cls = _class_name(os.path.join(path, "unet"))
        if cls not in ("UNet3DConditionModel", ""):
            raise ValueError(f"model path {path}: unet/ holds {cls}, expected UNet3DConditionModel")
        denoiser = diffusers.UNet3DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype)
    elif os.path.isdir(os.path.join(path, "transformer")):
        sub = "transformer"
        cls = _class_name(os.path.join(path, sub))
        arch = {"HunyuanVideoTransformer3DModel": "hunyuan", "WanTransformer3DModel": "wan"}.get(cls)
        if arch is None:
            raise ValueError(f"model path {path}: transformer/ holds {cls!r}; supported: HunyuanVideoTransformer3DModel, "
                             "WanTransformer3DModel")
        denoiser = getattr(diffusers, cls).from_pretrained(path, subfolder=sub, torch_dtype=torch_dtype)
    else:
        raise FileNotFoundError(f"model path {path}: expected a unet/ or transformer/ subfolder")
    sched_dir = os.path.join(path, "scheduler")
    if not os.path.isdir(sched_dir):
        raise FileNotFoundError(f"model path {path}: missing scheduler/ subfolder")
    with open(os.path.join(sched_dir, "scheduler_config.json")) as fh:
        sched_cls = json.load(fh).get("_class_name")
    if arch == "unet3d":
        scheduler = diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")  # teacher = DDIM, any DDPM-family config
    elif sched_cls in (None, "FlowMatchEulerDiscreteScheduler"):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    else:  # e.g. Wan2.1's UniPCMultistepScheduler(use_flow_sigmas, flow_shift): same flow, Euler / consistency here
        with open(os.path.join(sched_dir, "scheduler_config.json")) as fh:
            sc = json.load(fh)
        if sc.get("prediction_type", "flow_prediction") != "flow_prediction" and not sc.get("use_flow_sigmas"):
            raise ValueError(f"model path {path}: scheduler/ holds {sched_cls} with prediction_type "
                             f"{sc.get('prediction_type')!r}; a flow transformer needs a flow-matching scheduler")
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=sc.get("num_train_timesteps", 1000),
                                                              shift=float(sc.get("flow_shift", sc.get("shift", 1.0)) or 1.0))
    vae_dir = os.path.join(path, "vae")
    if os.path.isdir(vae_dir):
        vcls = _class_name(vae_dir)
        vae = getattr(diffusers, vcls).from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype)
        codec: nn.Module = FrameVAECodec(vae) if vcls == "AutoencoderKL" else VideoVAECodec(vae)
    else:
        codec = PixelCodec()
    text = _load_text_encoder(path, arch, denoiser, torch_dtype, text_max_length)
    h = height or meta.get("height") or 16
    w = width or meta.get("width") or 16
    frames = meta.get("num_frames", num_frames) if num_frames is None else num_frames
    return VideoGenerator(arch, denoiser, scheduler, codec, text, frames, h, w, torch_dtype)


def _text_family(path: str, arch: str) -> Optional[str]:
    """The stock pipeline whose text conditioning this layout uses, from the text encoder's model_type."""
    te_cfg = os.path.join(path, "text_encoder", "config.json")
    with open(te_cfg) as fh:
        model_type = json.load(fh).get("model_type")
    if arch == "unet3d" and model_type == "clip_text_model":
        return "modelscope"
    if arch == "wan" and model_type in ("umt5", "t5"):
        return "wan"
    if arch == "hunyuan" and model_type == "llama":
        for sub in ("text_encoder_2", "tokenizer_2"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise FileNotFoundError(f"model path {path}: HunyuanVideo needs {sub}/ (CLIP: its pooler_output is "
                                        "the pooled vector)")
        return "hunyuan"
    return None


def _load_text_encoder(path: str, arch: str, denoiser: nn.Module, torch_dtype, text_max_length: Optional[int]) -> nn.Module:
    te_dir = os.path.join(path, "text_encoder")
    if not os.path.isdir(te_dir):
        raise FileNotFoundError(f"model path {path}: missing text_encoder/ subfolder")
    if _class_name(te_dir) == "HashTextEncoder":
        return HashTextEncoder.load(te_dir)
    import transformers

    tok_dir = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"model path {path}: text_encoder/ needs a tokenizer/ subfolder")
    # transformers >= 4.56 names the argument `dtype` (and warns on `torch_dtype`); older releases only know `torch_dtype`.
    dtype_kw = {"dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype": torch_dtype}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    family = _text_family(path, arch)
    if family == "modelscope":
        te = transformers.CLIPTextModel.from_pretrained(te_dir, **dtype_kw)
        return PipelineTextEncoder(family, te.eval(), tokenizer, max_length=text_max_length)
    if family == "wan":  # the encoder alone, as WanPipeline loads it (never a full UMT5Model with a random decoder)
        cls = transformers.UMT5EncoderModel if transformers.AutoConfig.from_pretrained(te_dir).model_type == "umt5" \
            else transformers.T5EncoderModel
        te = cls.from_pretrained(te_dir, **dtype_kw)
        return PipelineTextEncoder(family, te.eval(), tokenizer, max_length=text_max_length)
    if family == "hunyuan":
        te = transformers.AutoModel.from_pretrained(te_dir, **dtype_kw)
        te2 = transformers.CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder_2"), **dtype_kw)
        tok2 = transformers.AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"))
        pooled_dim = getattr(denoiser.config, "pooled_projection_dim", None)
        if pooled_dim is not None and te2.config.hidden_size != pooled_dim:
            raise ValueError(f"model path {path}: text_encoder_2 hidden size {te2.config.hidden_size} != the transformer's "
                             f"pooled_projection_dim {pooled_dim}")
        return PipelineTextEncoder(family, te.eval(), tokenizer, te2.eval(), tok2, max_length=text_max_length)
    te = transformers.AutoModel.from_pretrained(te_dir, **dtype_kw)
    if hasattr(te, "get_encoder") and getattr(te.config, "is_encoder_decoder", False):
        te = te.get_encoder()
    return TransformersTextEncoder(te, tokenizer, text_max_length or 16, getattr(denoiser.config, "pooled_projection_dim", None))


def save_generator(gen: VideoGenerator, path: str) -> None:
    """Write `gen` as a directory `load_generator` reads (denoiser without LoRA layers: merge or strip first)."""
    os.makedirs(path, exist_ok=True)
    gen.denoiser.save_pretrained(os.path.join(path, "unet" if gen.arch == "unet3d" else "transformer"))
    gen.scheduler.save_pretrained(os.path.join(path, "scheduler"))
    if isinstance(gen.codec, (FrameVAECodec, VideoVAECodec)):
        gen.codec.vae.save_pretrained(os.path.join(path, "vae"))
    if isinstance(gen.text_encoder, HashTextEncoder):
        gen.text_encoder.save(os.path.join(path, "text_encoder"))
    elif isinstance(gen.text_encoder, PipelineTextEncoder):
        te = gen.text_encoder
        te.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
        te.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        if te.text_encoder_2 is not None:
            te.text_encoder_2.save_pretrained(os.path.join(path, "text_encoder_2"))
            te.tokenizer_2.save_pretrained(os.path.join(path, "tokenizer_2"))
    else:
        gen.text_encoder.model.save_pretrained(os.path.join(path, "text_encoder"))
        gen.text_encoder.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "pisces_generator.json"), "w") as fh:
        json.dump({"num_frames": gen.num_frames, "height": gen.height, "width": gen.width}, fh)


def generator_from_config(model_cfg) -> VideoGenerator:
    if model_cfg.tiny is not None:
        gen = build_tiny_generator(model_cfg.tiny, model_cfg.tiny_vae, model_cfg.num_frames, model_cfg.height,
                                   model_cfg.width, model_cfg.init_seed, model_cfg.text_max_length, model_cfg.dtype)
    else:
        gen = load_generator(model_cfg.path, model_cfg.num_frames, model_cfg.height, model_cfg.width, model_cfg.dtype,
                             model_cfg.text_max_length)
    if model_cfg.gradient_checkpointing:
        gen.denoiser.enable_gradient_checkpointing()
    set_attention_backend(gen.denoiser, model_cfg.attention_backend)
    return gen


def set_attention_backend(denoiser: nn.Module, backend: Optional[str]) -> Optional[str]:
    """flash-attn for the denoiser on CUDA when installed ("auto"), or a named diffusers backend."""
    import importlib.util
    import warnings

    if backend is None:
        return None
    if backend == "auto":
        if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None):
            return None
        backend = "flash"
    try:
        denoiser.set_attention_backend(backend)
        return backend
    except Exception as exc:  # noqa: BLE001 - older processors (UNet3D) may not support dispatch backends
        warnings.warn(f"attention backend {backend!r} not applied to {type(denoiser).__name__}: {exc}")
        return None
