"""The embedded shapes world's pretrained video-text model, shipped inside the package.

    from pisces_fast.rewards.world_vlm import load_world_vlm
    backbone = load_world_vlm()            # an InternVideo2Backbone, eval mode, frozen
    rewards = PiscesRewards(backbone, ot_map)

The checkpoint (``pisces_fast/assets/world/vlm/``: ``config.json``, ``model.safetensors``, the word tokenizer and
``training_summary.json`` with its held-out metrics) is made by ``scripts/pretrain_world_vlm.py``; nothing is
downloaded and nothing is unpickled.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch

from .backbones.internvideo2 import CONFIG_NAME, WEIGHTS_NAME, InternVideo2Backbone

VLM_FILES = (CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json")
VLM_SCRIPT = "python scripts/pretrain_world_vlm.py --out pisces_fast/assets/world/vlm"


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


def world_vlm_path(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Directory of the world VLM (default: the shipped one), checked to hold every file the loader reads."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    directory = Path(path) if path is not None else world_assets_dir() / "vlm"
    return check_asset_dir(directory, VLM_FILES, "world VLM", VLM_SCRIPT)


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
