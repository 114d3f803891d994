"""Look at the shapes world and check the analyzer on it.

Writes into ``--out_dir``:
  * ``world_grid.gif`` -- a grid of sample clips with their captions (and ``world_grid_frame0.png``);
  * ``corruptions.gif`` -- one row per clip: real, then each corruption the analyzer is validated on;
  * ``analyzer_scores.json`` -- analyzer scores of real vs corrupted clips;
and prints the scores as a Markdown table.

    python scripts/preview_world.py --out_dir outputs/preview_world
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
import time

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pisces_fast.data import shapes as S  # noqa: E402
from pisces_fast.eval import analyzer as A  # noqa: E402
from pisces_fast.training import distortions as C  # noqa: E402


def text_strip(text: str, width: int, height: int, fontsize: float = 7.0) -> np.ndarray:
    """A white strip ``(height, width, 3)`` uint8 with ``text`` wrapped in black."""
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    chars = max(8, int(width / (fontsize * 0.8)))
    fig.text(0.5, 0.5, "\n".join(textwrap.wrap(text, chars)), ha="center", va="center", fontsize=fontsize)
    fig.canvas.draw()
    strip = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return strip


def grid_frames(videos: torch.Tensor, labels: list[str], columns: int, scale: int, label_height: int) -> list[np.ndarray]:
    """Frames of a grid GIF: each cell is a clip upscaled by ``scale`` (nearest) above its label."""
    N, T, _, H, W = videos.shape
    cell_w = W * scale
    strips = [text_strip(label, cell_w, label_height) for label in labels]
    rows = int(np.ceil(N / columns))
    pad = 4
    frames = []
    clips = (videos.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # N T H W 3
    for t in range(T):
        canvas = np.full((rows * (H * scale + label_height + pad) + pad, columns * (cell_w + pad) + pad, 3), 255, np.uint8)
        for k in range(N):
            r, c = divmod(k, columns)
            y = pad + r * (H * scale + label_height + pad)
            x = pad + c * (cell_w + pad)
            canvas[y : y + H * scale, x : x + cell_w] = clips[k, t].repeat(scale, 0).repeat(scale, 1)
            canvas[y + H * scale : y + H * scale + label_height, x : x + cell_w] = strips[k]
        frames.append(canvas)
    return frames


def corrupted_versions(batch: S.ClipBatch, seed: int) -> dict[str, tuple[torch.Tensor, list]]:
    """Real clips and each corruption, with the specs they are scored against."""
    videos, specs = batch.videos, batch.specs
    recolored = []
    for lay in batch.layouts:
        used = {o.color for o in lay.objects}
        new = next(c for c in S.COLORS if c not in used)
        recolored.append(lay.with_object(0, color=new, rgb=S.PALETTE[new]))
    multi = [k for k, s in enumerate(specs) if len(s.objects) >= 2]
    morphed = videos.clone()
    morphed[:, videos.shape[1] // 2 :] = S.render_layouts(recolored)[:, videos.shape[1] // 2 :]
    return {
        "real": (videos, specs),
        "blur (sigma 1)": (C.gaussian_blur(videos, 1.0), specs),
        "frame shuffle": (C.shuffle_frames(videos, seed=seed), specs),
        "wrong direction (reversed)": (C.reverse_time(videos), specs),
        "wrong color": (S.render_layouts(recolored), specs),
        "color change mid-clip": (morphed, specs),
        "noise (std 0.05)": (C.add_noise(videos, 0.05, seed=seed), specs),
        "brightness flicker (15%)": (C.brightness_flicker(videos, 0.15, seed=seed), specs),
        "missing object*": (S.render_layouts([batch.layouts[k].without_object(0) for k in multi]), [specs[k] for k in multi]),
        "real*": (videos[multi], [specs[k] for k in multi]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="outputs/preview_world")
    parser.add_argument("--num_clips", type=int, default=16, help="clips in the preview grid")
    parser.add_argument("--num_scored", type=int, default=96, help="clips scored per corruption")
    parser.add_argument("--split", default="heldout", choices=S.SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=5, help="pixel upscaling in the GIFs")
    parser.add_argument("--fps", type=float, default=4.0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    start = time.perf_counter()
    sample = S.make_clips(args.num_clips, split=args.split, seed=args.seed)
    frames = grid_frames(sample.videos, sample.captions, columns=4, scale=args.scale, label_height=56)
    grid_path = os.path.join(args.out_dir, "world_grid.gif")
    imageio.mimsave(grid_path, frames, duration=1.0 / args.fps, loop=0)
    imageio.imwrite(os.path.join(args.out_dir, "world_grid_frame0.png"), frames[0])
    print(f"wrote {grid_path} ({args.num_clips} clips, {time.perf_counter() - start:.1f}s)")

    scored = S.make_clips(args.num_scored, split=args.split, seed=args.seed + 1)
    versions = corrupted_versions(scored, args.seed)
    # A strip of the corruptions for the first few clips (same scene across a row).
    show = [k for k, s in enumerate(scored.specs) if len(s.objects) >= 2][:4]
    rows, labels = [], []
    for k in show:
        for name, (videos, _) in versions.items():
            if name.endswith("*"):
                continue
            rows.append(videos[k])
            labels.append(name)
    frames = grid_frames(torch.stack(rows), labels, columns=len(rows) // len(show), scale=4, label_height=30)
    imageio.mimsave(os.path.join(args.out_dir, "corruptions.gif"), frames, duration=1.0 / args.fps, loop=0)
    imageio.imwrite(os.path.join(args.out_dir, "corruptions_frame0.png"), frames[0])

    analyzer = A.ShapesAnalyzer()
    results = {}
    for name, (videos, specs) in versions.items():
        t0 = time.perf_counter()
        out = analyzer.analyze(videos, specs)
        out.pop("per_clip")
        out["seconds"] = time.perf_counter() - t0
        results[name] = out
    with open(os.path.join(args.out_dir, "analyzer_scores.json"), "w") as f:
        json.dump(results, f, indent=2)

    columns = ["quality", "semantic", "total"] + list(A.DIMENSIONS)
    short = {d: d.replace("_consistency", "_cons").replace("temporal_", "").replace("_relationship", "_rel") for d in columns}
    print(f"\nAnalyzer scores ({args.num_scored} {args.split} clips; * = the {len(versions['real*'][1])} multi-object clips)\n")
    print("| clips | " + " | ".join(short[c] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, out in results.items():
        cells = ["-" if out[c] is None else f"{out[c]:.3f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    total_s = sum(r["seconds"] for r in results.values())
    clips = sum(len(v[1]) for v in versions.values())
    print(f"\nanalyzed {clips} clips in {total_s:.1f}s ({clips / total_s:.0f} clips/s); outputs in {args.out_dir}")


if __name__ == "__main__":
    main()
