"""The shapes world's video-text model, shipped with the package (``pisces_fast/assets/world/vlm``)."""
from __future__ import annotations

import os
from typing import Optional

SHIPPED_VLM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "world", "vlm")


def load_world_vlm(path: Optional[str] = None, *, map_location="cpu"):
    """The world VLM as an ``InternVideo2Backbone`` in eval mode (``path``: a saved directory; default: shipped)."""
    from .backbones import InternVideo2Backbone

    path = SHIPPED_VLM if path is None else str(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"world VLM not found in {path} (expected config.json + model.safetensors + tokenizer files); "
            "train one with `python scripts/pretrain_world_vlm.py --out DIR`"
        )
    return InternVideo2Backbone.from_pretrained(path, map_location=map_location)
