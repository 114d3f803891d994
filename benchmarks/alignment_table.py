"""Print PISCES Table-5- and Table-8-style comparisons.

Table 5 (alignment maps): fit the OT map (Algorithm 2, unpaired) and the paired baselines
(contrastive, L2, KL mappings) from text to video embeddings on a training split, then report on
held-out pairs the mutual kNN between mapped text and video (alignment) and the Spearman
correlation of the text set's pairwise distances before vs after the map (structure).

Table 8 (cross-attention variants): VTM accuracy on matched vs mismatched (video, caption) pairs
with vanilla cross-attention, full OT, partial OT and the spatio-temporal cost terms in a
backbone's fusion layers.

    python benchmarks/alignment_table.py                      # synthetic embeddings, tiny random backbone
    python benchmarks/alignment_table.py --text t.safetensors --video v.safetensors   # your embeddings (paired rows)
    python benchmarks/alignment_table.py --backbone runs/world_iv2 --videos clips.safetensors --prompts captions.txt

With the defaults everything is synthetic or random: the numbers show the pipeline runs, not the
paper's findings (those need a trained VLM and real data).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from pisces_fast.eval.alignment import (
    MAPPING_METHODS,
    alignment_rows,
    fit_alignment_map,
    format_table,
    synthetic_paired_embeddings,
    vtm_accuracy,
)
from pisces_fast.rewards import fit_ot_map, load_embeddings, table8_variants, vtm_probabilities

MAP_LABELS = {"contrastive": "Contrastive mapping", "l2": "Mapping w/ L2", "kl": "Mapping w/ KL"}


def table5(
    text: torch.Tensor,
    video: torch.Tensor,
    *,
    steps: int = 1000,
    ot_steps: int = 500,
    hidden: int = 256,
    k: int = 10,
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> str:
    """Table-5-style text for paired embedding sets ``text[i] ↔ video[i]``."""
    if text.shape != video.shape:
        raise ValueError(f"text and video embeddings must be paired with equal shapes, got {tuple(text.shape)} and {tuple(video.shape)}")
    n = text.shape[0]
    n_test = max(k + 2, int(round(n * test_fraction)))
    if n - n_test < 4:
        raise ValueError(f"need more pairs: {n} leaves too few for training after holding out {n_test}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[n_test:], perm[:n_test]
    maps = {"No map (raw text embeddings)": lambda y: y}
    timings = {}
    for method in MAPPING_METHODS:
        t0 = time.perf_counter()
        maps[MAP_LABELS[method]] = fit_alignment_map(text[tr], video[tr], method, steps=steps, hidden=hidden, seed=seed,
                                                     progress=progress)
        timings[MAP_LABELS[method]] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The OT map is unpaired: it only sees the two training sets as distributions.
    maps["OT (PISCES)"] = fit_ot_map(text[tr], video[tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed + 1))]],
                                     steps=ot_steps, inner_steps=5, lr=2e-3, hidden=hidden, seed=seed,
                                     progress=progress, log_every=max(1, ot_steps // 10))
    timings["OT (PISCES)"] = time.perf_counter() - t0
    rows = alignment_rows(text[te], video[te], maps, k=k)
    body = [(r.method, r.mutual_knn, r.spearman, f"{timings.get(r.method, 0.0):.1f}") for r in rows]
    return format_table(
        ["Method", "Mutual KNN", "Spearman", "fit s"], body,
        title=f"Table 5-style alignment ({len(tr)} train / {len(te)} held-out pairs, d={text.shape[1]}, k={k})",
    )


def table8(backbone, videos: torch.Tensor, prompts: Sequence[str], *, backend: str = "auto", batch_size: int = 16,
           negatives: Optional[Sequence[str]] = None, title: Optional[str] = None, progress: bool = True) -> str:
    """Table-8-style VTM accuracies on ``backbone`` for matched/mismatched pairs of ``videos``/``prompts``
    (mismatched: ``negatives[i]`` for video i if given, else another prompt of the set)."""
    probs = vtm_probabilities(backbone, videos, prompts, table8_variants(backend), negatives=negatives,
                              batch_size=batch_size, progress=progress)
    base = None
    rows = []
    for name, (pos, neg) in probs.items():
        acc = 100.0 * vtm_accuracy(pos, neg)
        base = acc if base is None else base
        change = "-" if name.startswith("Vanilla") else f"{acc - base:+.2f}"
        rows.append((name, f"{acc:.2f}", change, float(pos.mean()), float(neg.mean())))
    return format_table(
        ["Method", "VTM Acc. (%)", "Change", "mean P(match) pos", "mean P(match) neg"], rows,
        title=title or f"Table 8-style VTM accuracy ({len(prompts)} matched + {len(prompts)} mismatched pairs)",
    )


def tiny_world(n: int = 16, seed: int = 0):
    """A tiny random InternVideo2 backbone and n random clips with captions (pipeline demo only)."""
    from pisces_fast.rewards import InternVideo2, InternVideo2Backbone, InternVideo2Config, build_word_tokenizer

    colors, shapes, motions = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"], ["left", "right", "up", "down"]
    tok = build_word_tokenizer(["a", "moving", *colors, *shapes, *motions])
    torch.manual_seed(seed)
    backbone = InternVideo2Backbone(InternVideo2(InternVideo2Config.tiny(vocab_size=len(tok))), tok).eval()
    g = torch.Generator().manual_seed(seed)
    prompts = [f"a {colors[i % 4]} {shapes[i % 3]} moving {motions[(i // 3) % 4]}" for i in range(n)]
    videos = torch.rand(n, 4, 3, 32, 32, generator=g)
    return backbone, videos, prompts


def _read_prompts(path: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} not found")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def _read_videos(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"videos file {p} not found")
    tensors = load_file(str(p))
    if len(tensors) != 1:
        raise ValueError(f"{p} must hold exactly one tensor (n, T, 3, H, W), found {sorted(tensors)}")
    return next(iter(tensors.values())).float()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", help="(n, d) text embeddings (.safetensors/.pt/.npy); default: synthetic")
    parser.add_argument("--video", help="(n, d) paired video embeddings; default: synthetic")
    parser.add_argument("--n", type=int, default=2000, help="synthetic pairs")
    parser.add_argument("--dim", type=int, default=64, help="synthetic embedding dim")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each baseline map")
    parser.add_argument("--ot-steps", type=int, default=500, help="outer steps of the OT map (5 inner steps each)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--backbone", help="directory of a saved InternVideo2Backbone; default: tiny random")
    parser.add_argument("--videos", help="(n, T, 3, H, W) clips in [0, 1] (.safetensors) for Table 8")
    parser.add_argument("--prompts", help="text file with one caption per line, paired with --videos")
    parser.add_argument("--backend", default="auto", help="OT backend for Table 8")
    parser.add_argument("--skip-table5", action="store_true")
    parser.add_argument("--skip-table8", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.no_progress

    if not args.skip_table5:
        if (args.text is None) != (args.video is None):
            parser.error("--text and --video go together")
        if args.text:
            text, video = load_embeddings(args.text), load_embeddings(args.video)
        else:
            text, video = synthetic_paired_embeddings(args.n, args.dim, seed=args.seed)
        print(table5(text, video, steps=args.steps, ot_steps=args.ot_steps, hidden=args.hidden, k=args.k,
                     seed=args.seed, progress=progress))
        print()
    if not args.skip_table8:
        if (args.videos is None) != (args.prompts is None):
            parser.error("--videos and --prompts go together")
        if args.backbone:
            from pisces_fast.rewards import InternVideo2Backbone

            backbone = InternVideo2Backbone.from_pretrained(args.backbone).eval()
        else:
            backbone, videos, prompts = tiny_world(seed=args.seed)
        if args.videos:
            videos, prompts = _read_videos(args.videos), _read_prompts(args.prompts)
            if videos.shape[0] != len(prompts):
                raise ValueError(f"{args.videos} has {videos.shape[0]} clips but {args.prompts} has {len(prompts)} captions")
        elif args.backbone:
            parser.error("--backbone needs --videos and --prompts")
        print(table8(backbone, videos, prompts, backend=args.backend, progress=progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
