"""Video-text datasets (PyAV decoding from CSV/JSONL), synthetic data, deterministic batches, video grids."""
import json
import os

import av
import numpy as np
import pytest
import torch

from pisces_fast.data.video_dataset import SyntheticVideoDataset, VideoTextDataset, decode_video, read_index
from pisces_fast.training.batches import ShardedBatches
from pisces_fast.training.video_io import save_video_grid


def write_mp4(path, frames=20, fps=10, h=24, w=32):
    """Frame i is a flat grey of level 10 * i: decoded frames identify their source index."""
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full((h, w, 3), 10 * i, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture
def clips(tmp_path):
    write_mp4(tmp_path / "a.mp4")
    write_mp4(tmp_path / "b.mp4", frames=5)
    (tmp_path / "index.csv").write_text("video,caption\na.mp4,a grey fade\nb.mp4,a short clip\n")
    (tmp_path / "index.jsonl").write_text(json.dumps({"path": "a.mp4", "text": "a grey fade"}) + "\n")
    return tmp_path


def test_decode_fps_and_resize(clips):
    v = decode_video(str(clips / "a.mp4"), num_frames=4, fps=5, height=16, width=16)
    assert v.shape == (4, 3, 16, 16) and v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1
    levels = (v.mean(dim=(1, 2, 3)) * 255 / 10).round().tolist()
    steps = np.diff(levels)
    assert all(abs(s - 2) <= 0.6 for s in steps)  # 10 fps -> 5 fps: every 2nd source frame
    short = decode_video(str(clips / "b.mp4"), num_frames=8)
    assert short.shape[0] == 8 and torch.equal(short[-1], short[-2])  # short clips repeat the last frame


def test_csv_and_jsonl_index(clips):
    ds = VideoTextDataset(str(clips / "index.csv"), num_frames=4, height=8, width=8)
    assert len(ds) == 2 and ds[1]["caption"] == "a short clip" and ds[0]["video"].shape == (4, 3, 8, 8)
    ds = VideoTextDataset(str(clips / "index.jsonl"), num_frames=2, height=8, width=12)
    assert ds[0]["video"].shape == (2, 3, 8, 12)


def test_dataset_errors(clips):
    (clips / "bad.csv").write_text("file,label\na.mp4,x\n")
    with pytest.raises(ValueError, match="caption column"):
        read_index(str(clips / "bad.csv"))
    (clips / "missing.csv").write_text("video,caption\nnope.mp4,x\n")
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        VideoTextDataset(str(clips / "missing.csv"), 4, 8, 8)
    with pytest.raises(FileNotFoundError, match="index not found"):
        read_index(str(clips / "none.csv"))
    (clips / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="csv or .jsonl"):
        read_index(str(clips / "x.txt"))
    (clips / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_video(str(clips / "broken.mp4"), 2)


def test_synthetic_and_sharded_batches():
    ds = SyntheticVideoDataset(size=6, num_frames=4, height=8, width=8, seed=3)
    assert torch.equal(ds[2]["video"], SyntheticVideoDataset(6, 4, 8, 8, seed=3)[2]["video"])
    a, b = ShardedBatches(ds, 1, rank=0, world_size=2), ShardedBatches(ds, 1, rank=1, world_size=2)
    first = [next(a)["caption"][0] for _ in range(3)]
    assert len({tuple(next(b)["video"].flatten()[:5].tolist()) for _ in range(3)}) >= 1
    c = ShardedBatches(ds, 1, rank=0, world_size=2)
    next(c)
    state = c.state_dict()
    d = ShardedBatches(ds, 1, rank=0, world_size=2)
    d.load_state_dict(state)
    assert [next(d)["caption"][0] for _ in range(2)] == first[1:]
    with pytest.raises(ValueError, match="cannot give"):
        ShardedBatches(ds, 4, rank=0, world_size=2)


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_video_grid_files(tmp_path, ext):
    path = save_video_grid(torch.rand(3, 4, 3, 16, 16), str(tmp_path / f"grid.{ext}"), fps=4)
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 4 and frames[0].width >= 128
