"""Video-text datasets: clips decoded from files listed in a CSV/JSONL index, and a synthetic in-memory set.

Items are {"video": float tensor (T, 3, H, W) in [0, 1], "caption": str}.

`VideoTextDataset` reads an index with one row per clip: a video path column (`video`, `path`, `video_path`
or `file`) and a caption column (`caption`, `text`, `prompt`). Clips are decoded with PyAV; `fps` resamples
time (frames are taken every native_fps / fps source frames), `num_frames` frames are taken from the clip's
centre (or a random start when `random_start` and a generator are given); short clips repeat their last
frame. Frames are resized so the short side covers the target and centre-cropped.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

VIDEO_KEYS = ("video", "path", "video_path", "file")
CAPTION_KEYS = ("caption", "text", "prompt")


def read_index(path: str) -> list[dict]:
    """Rows {"video": str, "caption": str} from a .csv or .jsonl file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset index not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            raw = list(csv.DictReader(fh))
    elif ext in (".jsonl", ".json"):
        raw = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{n}: invalid JSON ({exc})") from exc
    else:
        raise ValueError(f"dataset index {path}: expected a .csv or .jsonl file")
    if not raw:
        raise ValueError(f"dataset index {path}: no rows")
    rows = []
    for n, r in enumerate(raw, 1):
        vk = next((k for k in VIDEO_KEYS if k in r and r[k]), None)
        ck = next((k for k in CAPTION_KEYS if k in r and r[k] is not None), None)
        if vk is None or ck is None:
            raise ValueError(f"dataset index {path} row {n}: expected a video column {VIDEO_KEYS} and a caption column "
                             f"{CAPTION_KEYS}, got keys {sorted(r)}")
        rows.append({"video": str(r[vk]), "caption": str(r[ck])})
    return rows


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, 3, h, w) -> (T, 3, height, width): scale so both sides cover the target, then crop the centre."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top:top + height, left:left + width]


def decode_video(path: str, num_frames: int, fps: Optional[float] = None, height: Optional[int] = None,
                 width: Optional[int] = None, random_start: bool = False,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Decode `num_frames` frames with PyAV -> (T, 3, H, W) float in [0, 1]."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            native = float(stream.average_rate or stream.guessed_rate or 0) or None
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except av.error.FFmpegError as exc:
        raise ValueError(f"video {path}: cannot decode ({exc})") from exc
    if not frames:
        raise ValueError(f"video {path}: no frames decoded")
    stride = 1.0
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps: expected a positive number, got {fps}")
        if native is None:
            raise ValueError(f"video {path}: unknown frame rate, cannot resample to fps={fps}")
        stride = max(native / fps, 1e-6)
    span = (num_frames - 1) * stride + 1
    slack = max(len(frames) - span, 0.0)
    if random_start:
        start = float(torch.rand((), generator=generator)) * slack
    else:
        start = slack / 2
    idx = [min(int(round(start + i * stride)), len(frames) - 1) for i in range(num_frames)]
    clip = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2).float() / 255.0
    if height is not None and width is not None:
        clip = resize_center_crop(clip, height, width)
    return clip.contiguous()


class VideoTextDataset(Dataset):
    def __init__(self, index_path: str, num_frames: int, height: int, width: int, fps: Optional[float] = None,
                 video_root: Optional[str] = None, check_files: bool = True):
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        self.rows = read_index(index_path)
        root = video_root if video_root is not None else os.path.dirname(os.path.abspath(index_path))
        for r in self.rows:
            if not os.path.isabs(r["video"]):
                r["video"] = os.path.join(root, r["video"])
        if check_files:
            missing = [r["video"] for r in self.rows if not os.path.isfile(r["video"])]
            if missing:
                raise FileNotFoundError(f"dataset {index_path}: {len(missing)} video file(s) not found, e.g. {missing[0]}")
        self.num_frames, self.height, self.width, self.fps = num_frames, height, width, fps

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        video = decode_video(r["video"], self.num_frames, self.fps, self.height, self.width)
        return {"video": video, "caption": r["caption"]}

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]


SYNTH_COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.85, 0.1)}
SYNTH_MOTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


class SyntheticVideoDataset(Dataset):
    """Deterministic in-memory clips of one coloured square moving on a dark background ("a red square
    moving right"); for tests and CI. Item i depends only on (seed, i)."""

    def __init__(self, size: int = 16, num_frames: int = 8, height: int = 16, width: int = 16, seed: int = 0):
        if size < 1:
            raise ValueError(f"size: expected an integer >= 1, got {size}")
        self.size, self.num_frames, self.height, self.width, self.seed = size, num_frames, height, width, seed
        g = torch.Generator().manual_seed(seed)
        colors, motions = list(SYNTH_COLORS), list(SYNTH_MOTIONS)
        self.specs = [(colors[int(torch.randint(0, len(colors), (1,), generator=g))],
                       motions[int(torch.randint(0, len(motions), (1,), generator=g))]) for _ in range(size)]
        self.videos = [self._render(c, m) for c, m in self.specs]

    def _render(self, color: str, motion: str) -> torch.Tensor:
        T, H, W = self.num_frames, self.height, self.width
        side = max(2, min(H, W) // 3)
        video = torch.full((T, 3, H, W), 0.1)
        dx, dy = SYNTH_MOTIONS[motion]
        for t in range(T):
            frac = t / max(T - 1, 1)
            cx = (W - side) // 2 + round(dx * (frac - 0.5) * (W - side))
            cy = (H - side) // 2 + round(dy * (frac - 0.5) * (H - side))
            video[t, :, cy:cy + side, cx:cx + side] = torch.tensor(SYNTH_COLORS[color]).view(3, 1, 1)
        return video

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        color, motion = self.specs[i]
        return {"video": self.videos[i].clone(), "caption": f"a {color} square moving {motion}"}

    @property
    def captions(self) -> list[str]:
        return [f"a {c} square moving {m}" for c, m in self.specs]
