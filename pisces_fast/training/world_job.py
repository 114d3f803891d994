"""The main job on the embedded shapes world: PISCES end to end, with no downloads.

``deepspeed train.py`` (or ``python train.py``) with no ``--config`` runs this:

1. embed real train clips and their captions with the shipped world VLM and fit the neural OT map
   text → real video (Algorithm 2), saved in ``OUTPUT_DIR/ot_map``;
2. sample the shipped generator on held-out prompts (fixed seeds) and score the clips with the
   rule-based analyzer (``pisces_fast.eval.analyzer``) — the "before" column;
3. post-train the generator with LoRA: consistency distillation + the OT-aligned quality and
   semantic rewards (Eq. 5), through the ordinary training loop (checkpoints, metrics.jsonl, resume);
4. sample the same prompts and seeds again and score them — the "after" column;
5. write ``report.json``, ``report.md``, a before/after GIF grid and the reward/loss curves.

Both columns use the same deterministic DDIM sampler, steps and guidance, so the comparison
isolates what post-training changed in the denoiser.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional

import torch

from .config import TrainConfig

WORLD_REWARD = "python:pisces_fast.training.world_job:world_reward"
# The shipped text-to-video generator (diffusers format), trained by scripts/pretrain_world_generator.py.
SHIPPED_GENERATOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "world", "generator")

# The main job's configuration when train.py gets no --config. Every key can still be overridden
# on the command line (``--max_steps 20``, ``--world.eval_prompts 4`` ...).
WORLD_DEFAULTS = {
    "mode": "cd",
    "output_dir": "outputs/world",
    "max_steps": 120,
    "checkpoint_every": 40,
    "seed": 0,
    "model": {"path": SHIPPED_GENERATOR, "num_frames": 8, "height": 32, "width": 32},
    "lora": {"rank": 8, "alpha": 8.0},
    "data": {"kind": "shapes", "batch_size": 4, "synthetic_size": 4096},
    "reward": {"kind": WORLD_REWARD, "weights": {"quality": 1.0, "semantic": 1.0}, "fusion": "equal"},
    "cd": {"num_ddim_timesteps": 50, "skip_k": 1, "guidance_scale_min": 2.0, "guidance_scale_max": 4.0,
           "ema_decay": 0.95, "reward_scale": 1.0, "cd_weight": 1.0},
    "optim": {"lr": 2e-4, "max_grad_norm": 1.0},
    "world": {"enabled": True},
}


def world_reward(
    *,
    ot_map: Optional[str] = None,
    vlm: Optional[str] = None,
    use_ot_map: bool = True,
    use_pot: bool = True,
    weights: Optional[dict] = None,
    pot: Optional[dict] = None,
):
    """PiscesRewards on the world VLM (``vlm``: a saved model directory; default: the shipped one)."""
    from pisces_fast.rewards import OTMap, PiscesRewards, POTConfig
    from pisces_fast.rewards.world_vlm import load_world_vlm

    backbone = load_world_vlm(vlm)
    ot = OTMap.load(ot_map) if (use_ot_map and ot_map) else None
    return PiscesRewards(backbone, ot, use_ot_map=use_ot_map and ot is not None, use_pot=use_pot,
                         pot=POTConfig(**(pot or {})), weights=weights)


def fit_world_ot_map(cfg: TrainConfig, out_dir: str) -> str:
    """Algorithm 2 on the world: text [CLS] of train captions → [CLS] of real train clips."""
    from pisces_fast.data.shapes import ShapesDataset, WorldConfig
    from pisces_fast.rewards import collect_embeddings, fit_ot_map
    from pisces_fast.rewards.world_vlm import load_world_vlm

    w = cfg.world
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir  # fitted by an earlier (resumed) run or another rank
    backbone = load_world_vlm(w.vlm)
    data = ShapesDataset(w.ot_map_clips, "train", seed=cfg.seed + 17,
                         config=WorldConfig(num_frames=cfg.model.num_frames, height=cfg.model.height, width=cfg.model.width))
    batches = ((torch.stack([it["video"] for it in items]), [it["caption"] for it in items])
               for items in (data.__getitems__(list(range(i, min(i + 64, len(data))))) for i in range(0, len(data), 64)))
    with torch.no_grad():
        text, video = collect_embeddings(backbone, batches)
    ot_map = fit_ot_map(text, video, steps=w.ot_map_steps, batch_size=128, inner_steps=w.ot_map_inner_steps,
                        lr=w.ot_map_lr, hidden=w.ot_map_hidden, seed=cfg.seed)
    ot_map.save(out_dir)
    return out_dir


def _wait_for(path: str, timeout_s: float = 3600.0) -> None:
    start = time.time()
    while not os.path.isfile(path):
        if time.time() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to write {path}")
        time.sleep(1.0)


def held_out_prompts(cfg: TrainConfig) -> list:
    """The evaluation prompts: the first ``world.eval_prompts`` distinct held-out captions."""
    from pisces_fast.data.shapes import ShapesDataset, WorldConfig

    data = ShapesDataset(100_000, "heldout", seed=cfg.world.eval_seed,
                         config=WorldConfig(num_frames=cfg.model.num_frames, height=cfg.model.height, width=cfg.model.width))
    prompts, i = [], 0
    while len(prompts) < cfg.world.eval_prompts:
        caption = data.__getitems__([i])[0]["caption"]
        if caption not in prompts:
            prompts.append(caption)
        i += 1
    return prompts


def sample_and_score(trainer, prompts: list, cfg: TrainConfig, *, adapter: bool) -> tuple:
    """Sample every prompt with each eval seed (same noise for before and after); analyze."""
    from pisces_fast.eval.analyzer import analyze

    from tqdm.auto import tqdm

    from .lora import adapter_disabled

    w = cfg.world
    videos = []
    bar = tqdm(total=len(w.eval_seeds) * w.eval_steps, desc=f"sample {'after' if adapter else 'before'}",
               disable=trainer.rank != 0)
    for seed in w.eval_seeds:
        g = torch.Generator().manual_seed(int(seed))
        ctx = contextlib.nullcontext() if adapter else adapter_disabled(trainer.gen.denoiser)
        with ctx:
            videos.append(trainer.gen.sample(trainer.backend.forward, prompts, w.eval_steps, w.eval_guidance, generator=g,
                                             on_step=lambda: bar.update(1)))
    bar.close()
    videos = torch.cat(videos).float().clamp(0, 1).cpu()
    captions = prompts * len(w.eval_seeds)
    scores = analyze(videos, captions)
    return videos, scores


def summarize(scores: dict) -> dict:
    """The numbers a reader compares: quality, semantic, total, and every dimension's mean."""
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "num_clips"}


def write_report(out_dir: str, before: dict, after: dict, prompts: list, meta: dict) -> None:
    from .checkpoint import atomic_write_text

    report = {"before": before, "after": after, "prompts": prompts, **meta}
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    keys = ["total", "quality", "semantic"] + sorted(k for k in before if k not in ("total", "quality", "semantic"))
    lines = [
        "# PISCES on the shapes world",
        "",
        f"Held-out prompts: {len(prompts)} × seeds {meta['eval_seeds']}; sampler: DDIM {meta['eval_steps']} steps, "
        f"guidance {meta['eval_guidance']}; post-training: {meta['mode']} for {meta['steps']} steps "
        f"({meta['train_seconds']:.0f} s). Scores from the rule-based analyzer (1 = perfect).",
        "",
        "| score | before | after | change |",
        "|---|---|---|---|",
    ]
    for k in keys:
        if k in after:
            lines.append(f"| {k} | {before[k]:.4f} | {after[k]:.4f} | {after[k] - before[k]:+.4f} |")
    lines += ["", "Grid: `before_after.gif` (left: before, right: after; rows in the order below).", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")


def plot_curves(metrics_path: str, out_path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(metrics_path):
        return None
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        return None
    names = [k for k in ("loss", "loss_cd", "loss_reward", "reward/quality", "reward/semantic") if k in rows[0]]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8))
    axes = axes if len(names) > 1 else [axes]
    steps = [r["step"] for r in rows]
    for ax, name in zip(axes, names):
        values = [r.get(name, float("nan")) for r in rows]
        ax.plot(steps, values, lw=0.8, alpha=0.5)
        window = max(1, len(values) // 10)
        if window > 1:
            smooth = torch.tensor(values).unfold(0, window, 1).mean(-1).tolist()
            ax.plot(steps[window - 1:], smooth, lw=1.6)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def run_world_job(cfg: TrainConfig) -> dict:
    from .trainer import Trainer
    from .video_io import save_video_grid

    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(cfg.output_dir, exist_ok=True)
    ot_dir = os.path.join(cfg.output_dir, "ot_map")
    kwargs = dict(cfg.reward.kwargs)
    if cfg.reward.kind == WORLD_REWARD and kwargs.get("use_ot_map", True):
        if rank == 0:
            fit_world_ot_map(cfg, ot_dir)
        else:
            _wait_for(os.path.join(ot_dir, "config.json"))
        kwargs.setdefault("ot_map", ot_dir)
    if cfg.reward.kind == WORLD_REWARD and cfg.world.vlm is not None:
        kwargs.setdefault("vlm", cfg.world.vlm)
    cfg.reward.kwargs = kwargs

    trainer = Trainer(cfg)
    prompts = held_out_prompts(cfg)
    before_videos, before_scores = sample_and_score(trainer, prompts, cfg, adapter=False)
    start = time.time()
    result = trainer.train()
    train_seconds = time.time() - start
    after_videos, after_scores = sample_and_score(trainer, prompts, cfg, adapter=True)
    if trainer.rank == 0:
        before, after = summarize(before_scores), summarize(after_scores)
        w = cfg.world
        meta = {"mode": cfg.mode, "steps": cfg.max_steps, "train_seconds": train_seconds, "eval_seeds": list(w.eval_seeds),
                "eval_steps": w.eval_steps, "eval_guidance": w.eval_guidance}
        write_report(cfg.output_dir, before, after, prompts, meta)
        pairs = torch.stack([before_videos, after_videos], dim=1).flatten(0, 1)  # before_i, after_i, ...
        save_video_grid(pairs, os.path.join(cfg.output_dir, "before_after.gif"), fps=4, ncol=2)
        plot_curves(os.path.join(cfg.output_dir, "metrics.jsonl"), os.path.join(cfg.output_dir, "curves.png"))
        result.update({"before": before, "after": after, "report": os.path.join(cfg.output_dir, "report.json")})
    trainer.backend.barrier()
    return result
