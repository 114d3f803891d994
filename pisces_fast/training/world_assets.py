"""The embedded shapes world's pretrained text-to-video generator, shipped inside the package.

    from pisces_fast.training.world_assets import load_world_generator
    gen = load_world_generator()                 # a VideoGenerator: UNet3D + DDIM + tiny AutoencoderKL + BERT
    video = gen.sample(gen.denoiser, ["a large red circle moving right"], num_steps=25, guidance_scale=5.0)

``pisces_fast/assets/world/generator/`` is a diffusers-format directory made by
``scripts/pretrain_world_generator.py``: ``unet/`` (``UNet3DConditionModel``, epsilon), ``scheduler/``
(``DDIMScheduler``), ``vae/`` (per-frame ``AutoencoderKL``), ``text_encoder/`` (``transformers.BertModel``) +
``tokenizer/``, ``pisces_generator.json`` (clip size and text length) and ``model_index.json`` (so
``diffusers.TextToVideoSDPipeline.from_pretrained`` loads it too).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from pisces_fast.rewards.world_vlm import check_asset_dir, load_world_vlm, world_assets_dir, world_vlm_path

from .generators import VideoGenerator, load_generator

GENERATOR_FILES = (
    "pisces_generator.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
)
GENERATOR_SCRIPT = (
    "python scripts/pretrain_world_generator.py --vlm pisces_fast/assets/world/vlm --out pisces_fast/assets/world/generator"
)

__all__ = ["world_generator_path", "world_generator_meta", "load_world_generator", "load_world_vlm", "world_vlm_path",
           "world_assets_dir"]


def world_generator_path(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Directory of the world generator (default: the shipped one), checked to hold every file the loader reads."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    directory = Path(path) if path is not None else world_assets_dir() / "generator"
    return check_asset_dir(directory, GENERATOR_FILES, "world generator", GENERATOR_SCRIPT)


def world_generator_meta(path: Optional[Union[str, os.PathLike]] = None) -> dict:
    """``pisces_generator.json``: ``{"num_frames", "height", "width", "text_max_length"}`` the generator was trained at."""
    with open(world_generator_path(path) / "pisces_generator.json") as fh:
        meta = json.load(fh)
    for key in ("num_frames", "height", "width", "text_max_length"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ValueError(f"pisces_generator.json: {key!r} must be a positive int, got {meta.get(key)!r}")
    return meta


def load_world_generator(path: Optional[Union[str, os.PathLike]] = None, *, dtype: str = "float32",
                         device: str = "cpu") -> VideoGenerator:
    """The world's ``VideoGenerator`` at the clip size and text length it was trained with.

    The text length matters: the UNet cross-attends to every padded text position, so prompts must be
    padded exactly as in training (``text_max_length`` from ``pisces_generator.json``, 20 tokens).
    """
    directory = world_generator_path(path)
    meta = world_generator_meta(directory)
    gen = load_generator(str(directory), num_frames=meta["num_frames"], height=meta["height"], width=meta["width"],
                         dtype=dtype, text_max_length=meta["text_max_length"])
    gen.denoiser.eval()
    return gen.to(device)
