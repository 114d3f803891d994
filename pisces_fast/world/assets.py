"""The embedded shapes world's pretrained models, shipped inside the package.

    from pisces_fast.world import load_world_vlm, load_world_generator
    backbone = load_world_vlm()          # an InternVideo2Backbone, eval mode, frozen (the reward backbone)
    gen = load_world_generator()         # a VideoGenerator: UNet3D + DDIM + tiny AutoencoderKL + BERT
    video = gen.sample(gen.denoiser, ["a large red circle moving right"], num_steps=25, guidance_scale=5.0)

``pisces_fast/assets/world/vlm/`` (``config.json``, ``model.safetensors``, the word tokenizer and
``training_summary.json`` with its held-out metrics) is made by ``scripts/pretrain_world_vlm.py``.

``pisces_fast/assets/world/generator/`` is a diffusers-format directory made by
``scripts/pretrain_world_generator.py``: ``unet/`` (``UNet3DConditionModel``, epsilon), ``scheduler/``
(``DDIMScheduler``), ``vae/`` (per-frame ``AutoencoderKL``), ``text_encoder/`` (``transformers.BertModel``) +
``tokenizer/``, ``pisces_generator.json`` (clip size and text length) and ``model_index.json`` (so
``diffusers.TextToVideoSDPipeline.from_pretrained`` loads it too). Nothing is downloaded and nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch

from pisces_fast.rewards.backbones.internvideo2 import CONFIG_NAME, WEIGHTS_NAME, InternVideo2Backbone
from pisces_fast.training.generators import VideoGenerator, load_generator

VLM_FILES = (CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json")
VLM_SCRIPT = "python scripts/pretrain_world_vlm.py --out pisces_fast/assets/world/vlm"
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

__all__ = ["world_assets_dir", "world_vlm_path", "load_world_vlm", "world_generator_path", "world_generator_meta",
           "load_world_generator", "check_asset_dir"]


def world_assets_dir() -> Path:
    """``pisces_fast/assets/world`` of the installed package (a real directory: the package is not zip-safe)."""
    return Path(str(resources.files("pisces_fast"))) / "assets" / "world"


def check_asset_dir(path: Path, files, what: str, remedy: str) -> Path:
    """`path` must be a directory holding every one of `files`; else FileNotFoundError saying how to make it."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} not found; make it with `{remedy}`")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {path} lacks {', '.join(missing)}; remake it with `{remedy}`")
    return path


def _directory(path, default: Path) -> Path:
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    return Path(path) if path is not None else default


def world_vlm_path(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Directory of the world VLM (default: the shipped one), checked to hold every file the loader reads."""
    return check_asset_dir(_directory(path, world_assets_dir() / "vlm"), VLM_FILES, "world VLM", VLM_SCRIPT)


def load_world_vlm(
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    freeze: bool = True,
) -> InternVideo2Backbone:
    """The world's InternVideo2-style backbone (``InternVideo2Backbone``) in eval mode on ``device``.

    Args:
        path: a directory written by ``scripts/pretrain_world_vlm.py`` (default: the one shipped in the package).
        device: where to put it.
        freeze: turn off parameter gradients (a reward model is frozen; gradients still reach the video).
    """
    backbone = InternVideo2Backbone.from_pretrained(world_vlm_path(path), map_location=device).eval()
    if freeze:
        backbone.requires_grad_(False)
    return backbone


def world_generator_path(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Directory of the world generator (default: the shipped one), checked to hold every file the loader reads."""
    directory = _directory(path, world_assets_dir() / "generator")
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
