"""Prepare the PISCES quality reward for a real run: embed real (video, caption) pairs, fit the OT map.

    python -m pisces_fast.rewards.prepare --backbone-config recipe.yaml --data pairs.csv --out reward_prep/

1. ``--backbone-config``: a YAML holding the backbone section (the mapping itself, under ``backbone:``,
   or a training recipe's ``reward: backbone:``; schema in :mod:`pisces_fast.rewards.build`).
2. ``--data``: a CSV/JSONL index of (video, caption) rows (:mod:`pisces_fast.data.video_dataset`);
   clips are decoded with PyAV at the backbone's frame count and input size.
3. Each pair's joint-space text [CLS] and video [CLS] embeddings (the ``y_[CLS]`` and ``x_[CLS]`` of
   Eq. 2) are written in shards, ``OUT/embeddings/shard-*.safetensors``, then gathered into
   ``OUT/embeddings.safetensors`` (tensors ``text`` and ``video``, ``(n, E)`` float32).
4. Algorithm 2 (:func:`pisces_fast.rewards.ot_map.fit_ot_map`) fits the text → real-video map into
   ``OUT/ot_map/``: point ``reward.ot_map`` at it.

Resumable: a rerun with the same arguments skips the shards that exist and continues the OT-map fit
from its last checkpoint (``OUT/ot_map/fit_state.pt``, written every ``--checkpoint-every`` steps). A
rerun with a different backbone or data file is refused (use another ``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .build import BackboneSpec, backbone_input_size, build_backbone, load_backbone_yaml
from .ot_map import add_fit_arguments, fit_hyperparameters

MANIFEST = "manifest.json"


def _shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.safetensors"


def _atomic_save(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _collate(items):
    return torch.stack([it["video"] for it in items]), [it["caption"] for it in items]


def embed_pairs(
    backbone,
    dataset,
    out_dir,
    *,
    identity: dict,
    batch_size: int = 8,
    shard_size: int = 512,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Embed every (video, caption) pair of ``dataset`` into shards under ``out_dir`` (resumable).

    ``identity`` (JSON-able: backbone spec, data file, ...) is stored in the manifest; an existing
    directory written with another identity is refused. Returns ``{"text": (n, E), "video": (n, E)}``.
    """
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    manifest = {"rows": n, "shard_size": shard_size, "embed_dim": int(backbone.embed_dim), **identity}
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old != json.loads(json.dumps(manifest)):
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != json.loads(json.dumps(manifest)).get(k))
            raise ValueError(f"{out_dir} holds embeddings of another run (different {', '.join(changed)}); "
                             "use another --out or delete it")
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2))
    n_shards = (n + shard_size - 1) // shard_size
    done = [i for i in range(n_shards) if _shard_path(out_dir, i).is_file()]
    rows_done = sum(min(shard_size, n - i * shard_size) for i in done)
    bar = tqdm(total=n, initial=rows_done, desc="embed pairs", unit="pair", disable=not progress, dynamic_ncols=True)
    was_training = backbone.training
    backbone.eval()
    try:
        for shard in range(n_shards):
            if shard in done:
                continue
            start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
            loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers, collate_fn=_collate)
            texts, videos = [], []
            with torch.inference_mode():
                for video, captions in loader:
                    texts.append(backbone.encode_text(captions).embed.float().cpu())
                    videos.append(backbone.encode_video(video.to(backbone.device)).embed.float().cpu())
                    bar.update(len(captions))
            _atomic_save({"text": torch.cat(texts).contiguous(), "video": torch.cat(videos).contiguous()},
                         _shard_path(out_dir, shard), {"start": str(start), "stop": str(stop)})
    finally:
        backbone.train(was_training)
        bar.close()
    shards = [load_file(str(_shard_path(out_dir, i))) for i in range(n_shards)]
    out = {key: torch.cat([s[key] for s in shards]) for key in ("text", "video")}
    if out["text"].shape[0] != n:
        raise RuntimeError(f"{out_dir}: the shards hold {out['text'].shape[0]} pairs, expected {n}; delete the directory")
    return out


def _identity(spec: BackboneSpec, args) -> dict:
    spec_dict = dataclasses.asdict(spec)
    spec_dict.pop("field")
    return {"backbone": spec_dict, "data": os.path.abspath(args.data), "video_root": args.video_root, "fps": args.fps,
            "clip_frames": args.clip_frames}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pisces_fast.rewards.prepare", description=__doc__.strip().split("\n")[0])
    p.add_argument("--backbone-config", required=True,
                   help="YAML with the backbone section (or a training recipe with reward: backbone:)")
    p.add_argument("--data", required=True, help="CSV/JSONL index of real (video, caption) pairs")
    p.add_argument("--out", required=True, help="output directory (embeddings + ot_map/)")
    p.add_argument("--video-root", default=None, help="directory relative video paths start from (default: the index's)")
    p.add_argument("--fps", type=float, default=None, help="resample clips to this frame rate before sampling (default: native)")
    p.add_argument("--clip-frames", type=int, default=None,
                   help="frames decoded around each clip's centre (default: the backbone's num_frames); the backbone "
                        "then samples its num_frames uniformly from them")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per backbone forward")
    p.add_argument("--shard-size", type=int, default=512, help="pairs per embedding shard (the unit of resumption)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding videos")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cuda if available, else cpu)")
    p.add_argument("--embed-only", action="store_true", help="stop after the embeddings")
    fit = p.add_argument_group("OT map (Algorithm 2; see python -m pisces_fast.rewards.ot_map fit --help)")
    add_fit_arguments(fit, steps_flag="--fit-steps", batch_flag="--fit-batch-size")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pisces_fast.data.video_dataset import VideoTextDataset

    from .ot_map import OTMap, fit_ot_map

    parser = _build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "shard_size", "fit_steps", "fit_batch_size", "inner_steps", "hidden", "log_every",
                 "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        parser.error(f"--num-workers: expected an integer >= 0, got {args.num_workers}")
    if args.clip_frames is not None and args.clip_frames < 1:
        parser.error(f"--clip-frames: expected an integer >= 1, got {args.clip_frames}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        spec = load_backbone_yaml(args.backbone_config)
        backbone = build_backbone(spec, device)
        frames, size = backbone_input_size(backbone)
        dataset = VideoTextDataset(args.data, num_frames=args.clip_frames or frames, height=size, width=size,
                                   fps=args.fps, video_root=args.video_root)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    out = Path(args.out)
    progress = not args.no_progress
    try:
        emb = embed_pairs(backbone, dataset, out / "embeddings", identity=_identity(spec, args), batch_size=args.batch_size,
                          shard_size=args.shard_size, num_workers=args.num_workers, progress=progress)
    except ValueError as exc:
        parser.error(str(exc))
    _atomic_save(emb, out / "embeddings.safetensors")
    n, dim = emb["text"].shape
    print(f"embedded {n} pairs ({dim}-d joint space) -> {out / 'embeddings.safetensors'}")
    if args.embed_only:
        return 0
    del backbone
    ot_dir = out / "ot_map"
    ot_map = fit_ot_map(
        emb["text"], emb["video"], **fit_hyperparameters(args), progress=progress, device=device, checkpoint_dir=ot_dir,
    )
    ot_map.save(ot_dir)
    OTMap.load(ot_dir)  # what training will read: fail here, not there
    last = ot_map.fit_summary["history"][-1] if ot_map.fit_summary["history"] else {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
    print(f"OT map ({dim}-d) -> {ot_dir}; {summary}\nset `reward.ot_map: {ot_dir}` in the training recipe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
