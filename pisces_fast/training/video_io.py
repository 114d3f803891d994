"""Writing videos people look at: a batch of clips as one grid animation (GIF via imageio, MP4 via PyAV)."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def video_grid(videos: torch.Tensor, ncol: Optional[int] = None, min_side: int = 64, pad: int = 2) -> np.ndarray:
    """(B, T, 3, H, W) in [0, 1] -> (T, H', W', 3) uint8, clips tiled row-major, tiny clips upscaled (nearest)."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos: expected shape (B, T, 3, H, W), got {tuple(videos.shape)}")
    B, T, _, H, W = videos.shape
    scale = max(1, math.ceil(min_side / min(H, W)))
    v = videos.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        v = F.interpolate(v.flatten(0, 1), scale_factor=scale, mode="nearest").unflatten(0, (B, T))
    H, W = H * scale, W * scale
    ncol = ncol or math.ceil(math.sqrt(B))
    nrow = math.ceil(B / ncol)
    grid = torch.ones(T, 3, nrow * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[:, :, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = v[i]
    return (grid.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_video_grid(videos: torch.Tensor, path: str, fps: int = 4, ncol: Optional[int] = None) -> str:
    frames = video_grid(videos, ncol)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gif":
        import imageio.v3 as iio

        iio.imwrite(path, frames, extension=".gif", duration=int(1000 / fps), loop=0)
    elif ext == ".mp4":
        import av

        T, H, W, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")  # yuv420p needs even sides
        with av.open(path, mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        raise ValueError(f"path: expected a .gif or .mp4 file name, got {path!r}")
    return path
