"""GRPO and DF-DPO learn: held-out learning curves on the embedded shapes world, over several seeds.

    python benchmarks/learning_curves.py                      # every mode, seeds 0 1 2 (sequential)
    python benchmarks/learning_curves.py --modes dpo --seeds 0

Each run is the ordinary trainer (`pisces_fast.training.trainer.Trainer`) on the shipped world generator, trained
in chunks of `--eval_every` steps; after each chunk the objective is measured on held-out data that training never
sees, with fixed noise:
- grpo / grpo_cd (GRPO, Eq. 6, alone and + CD): the mean reward (quality + semantic of the world VLM, the
  weighted sum GRPO's advantages are computed from) of G SDE samples for each held-out prompt, drawn with fixed seeds
  (`GRPO.rollout` with a seeded generator: the same prompts and noise at every evaluation). Also the paired
  difference to step 0 over the (prompt, noise seed) groups with its 95 % confidence half-width ("diff", "diff_ci95"):
  the same prompts and noise before and after, so what it measures is the policy's change;
- dpo (DF-DPO): implicit reward accuracy, margin and DPO loss of policy vs reference on held-out real clips paired
  with their distorted copies, per distortion operator, with fixed noise and timesteps (`DFDPO.evaluate`).
Output (in --out): <mode>.csv per mode (mode, seed, step, metric, value; a later invocation for other modes keeps
them), learning_curves.png (mean ± std over seeds, from every <mode>.csv there), and each run's own curves.png of its
metrics.jsonl diagnostics (ratios, clip fraction, approx. KL, advantage std, reward mean/std; DPO implicit accuracy,
margin, curriculum stage) as <mode>_seed<k>_curves.png.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

DEFAULT_OUT = os.path.join(HERE, "results", "learning_curves")

# Overrides of the world job's defaults (pisces_fast.world.config.WORLD_DEFAULTS) for each mode. The world reward
# runs without the OT map and POT patching here (no Algorithm 2 fit per seed): "w/o OT" rewards, still the
# quality + semantic objective of the world VLM. GRPO: 2 prompts x G = 8 per step, DDIM eta 1 at 8 steps of which
# the first 2 are stochastic and trained (grpo.sde_steps: at 4 steps the last two had std 0.04 / 0.02, their noise
# moved the reward by ~0.006 std against ~0.15 for the first two, yet their log-prob gradients were the largest: with
# every step trained the held-out reward rose in 2 of 5 seeds). 8 sampling steps, not 4: at the generator's 8 frames
# the 4-step samples start at a negative quality cosine (-0.05; 8 steps: 0.22) and GRPO rose in 1 of 3 seeds (paired
# +0.12, +0.02, -0.08); with 8 steps in all 3 (+0.15 +- 0.08, +0.10 +- 0.06, +0.16 +- 0.14).
# GRPO + CD: the CD term on the batch's clips at CD_WEIGHT.
# The GRPO loss averages log-probs over latent elements, so its gradient is small (norm ~0.004 on the world) while
# CD's is 0.04-0.2 and points slightly against it (cosine -0.14): at cd_weight 0.1 the CD gradient dominated and the
# held-out reward rose only +0.012 +- 0.009 in 10 steps (seed 0); at 0.01 CD is an anchor of at most GRPO's size.
COMMON = {"checkpoint_every": 0, "export_lora": False, "validation": {"every": 0}, "deepspeed": None,
          "reward": {"kwargs": {"use_ot_map": False, "use_pot": False}, "fusion": "equal"}}
GRPO = {"group_size": 8, "num_sampling_steps": 8, "sde_steps": 2, "guidance_scale": 1.0, "eta": 1.0,
        "timestep_fraction": 1.0, "clip_range": 1e-3, "updates_per_rollout": 1, "cd_weight": 0.0, "kl_beta": 0.0,
        "shared_noise": True}
CD_WEIGHT = 0.01
MODES = {
    "grpo": {"mode": "grpo", "data": {"batch_size": 2}, "grpo": GRPO, "optim": {"lr": 2e-3, "max_grad_norm": 1.0}},
    "grpo_cd": {"mode": "grpo", "data": {"batch_size": 2}, "grpo": {**GRPO, "cd_weight": CD_WEIGHT},
                "cd": {"guidance_conditioning": False}, "optim": {"lr": 2e-3, "max_grad_norm": 1.0}},
    "dpo": {"mode": "dpo", "reward": {"kind": "none"}, "data": {"batch_size": 2},
            "dpo": {"beta": 5000.0, "sft_weight": 1.0},
            "optim": {"lr": 1e-3, "max_grad_norm": 1.0}},
}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(mode: str, seed: int, steps: int, out_dir: str, args):
    from pisces_fast.training.config import load_config
    from pisces_fast.world.config import WORLD_DEFAULTS

    over = merge(merge(COMMON, MODES[mode]), {"output_dir": out_dir, "seed": seed, "max_steps": steps,
                                               "model": {"num_frames": args.num_frames}})
    if mode == "dpo":
        from pisces_fast.training.distortions import DEFAULT_CURRICULUM

        over["dpo"]["curriculum"] = DEFAULT_CURRICULUM
        over["dpo"]["curriculum_every"] = max(1, steps // len(DEFAULT_CURRICULUM))
    if args.lr is not None:
        over["optim"]["lr"] = args.lr
    return load_config(None, over, WORLD_DEFAULTS)


def held_out(cfg, n: int, seed: int = 0):
    """n distinct held-out captions and one held-out clip for each (the shapes world's 'heldout' split)."""
    from pisces_fast.data.shapes import ShapesDataset, WorldConfig

    data = ShapesDataset(100_000, "heldout", seed=seed,
                         config=WorldConfig(num_frames=cfg.model.num_frames, height=cfg.model.height, width=cfg.model.width))
    items, captions, i = [], [], 0
    while len(items) < n:
        it = data.__getitems__([i])[0]
        if it["caption"] not in captions:
            items.append(it)
            captions.append(it["caption"])
        i += 1
    return torch.stack([it["video"] for it in items]), captions


def dpo_eval_pairs(trainer, args) -> dict:
    """Per operator of the curriculum: held-out pairs at the strength of the first stage that uses the operator."""
    videos, captions = held_out(trainer.cfg, args.dpo_eval_clips)
    strength = {}
    for stage in trainer.mode.curriculum.stages:
        for op in stage["ops"]:
            strength.setdefault(op, float(stage.get("strength", 1.0)))
    pairs = {}
    for op, s in strength.items():
        pairs.update(trainer.mode.heldout_pairs(videos, captions, [op], s, seed=1000, noise_per_pair=args.dpo_eval_noise))
    return pairs


def run(mode: str, seed: int, args, writer) -> None:
    from pisces_fast.training.trainer import Trainer

    steps = args.dpo_steps if mode == "dpo" else args.grpo_steps
    every = args.dpo_eval_every if mode == "dpo" else args.eval_every
    out_dir = os.path.join(args.work, f"{mode}_seed{seed}")
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = build(mode, seed, steps, out_dir, args)
    tr = Trainer(cfg)
    if mode == "dpo":
        pairs = dpo_eval_pairs(tr, args)

        def evaluate():
            return tr.mode.evaluate(pairs)
    else:
        _, prompts = held_out(cfg, args.eval_prompts)
        G = cfg.grpo.group_size
        first: list = []

        def evaluate():
            ros = [tr.mode.rollout(prompts, generator=torch.Generator().manual_seed(10_000 + s))
                   for s in range(args.eval_seeds)]
            groups = torch.cat([ro["reward"].view(-1, G).mean(1) for ro in ros])  # per (noise seed, prompt)
            if not first:
                first.append(groups)
            d = groups - first[0]
            half = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            res = {k: sum(ro["metrics"][k] for ro in ros) / len(ros) for k in ros[0]["metrics"] if k.startswith("reward")}
            return {**res, "diff": float(d.mean()), "diff_ci95": half}

    start = time.time()
    step = 0
    while True:
        res = evaluate()
        for k, v in res.items():
            writer.writerow([mode, seed, step, k, f"{v:.6g}"])
        key = "acc" if mode == "dpo" else "reward_mean"
        print(f"[{mode} seed {seed}] step {step}: held-out {key} {res[key]:.4f} ({time.time() - start:.0f} s)", flush=True)
        if step >= steps:
            break
        step = min(steps, step + every)
        tr.cfg.max_steps = step
        tr.train()
    writer.writerow([mode, seed, steps, "train_seconds", f"{time.time() - start:.1f}"])
    if os.path.isfile(os.path.join(out_dir, "curves.png")):
        shutil.copy(os.path.join(out_dir, "curves.png"), os.path.join(args.out, f"{mode}_seed{seed}_curves.png"))


def read_csv(out: str) -> dict:
    """{(mode, metric): {seed: [(step, value)]}} from every <mode>.csv in `out`."""
    data: dict = {}
    for mode in MODES:
        path = os.path.join(out, f"{mode}.csv")
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            for row in csv.DictReader(fh):
                data.setdefault((row["mode"], row["metric"]), {}).setdefault(int(row["seed"]), []).append(
                    (int(row["step"]), float(row["value"])))
    return data


def mean_std(by_seed: dict):
    steps = sorted({s for pts in by_seed.values() for s, _ in pts})
    means, stds = [], []
    for s in steps:
        vals = [v for pts in by_seed.values() for st, v in pts if st == s]
        m = sum(vals) / len(vals)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return steps, means, stds


def plot(out: str, png_path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_csv(out)
    modes = sorted({m for m, _ in data})
    panels = []
    if any(m.startswith("grpo") for m in modes):
        panels += ["grpo", "grpo_diff"]
    if "dpo" in modes:
        panels += ["dpo_acc", "dpo_loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)

    def band(ax, key, label, **kw):
        if key not in data:
            return
        steps, m, s = mean_std(data[key])
        line, = ax.plot(steps, m, label=f"{label} (n={len(data[key])})", marker="o", ms=3, **kw)
        ax.fill_between(steps, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2,
                        color=line.get_color())

    for ax, panel in zip(axes[0], panels):
        if panel == "grpo":
            band(ax, ("grpo", "reward_mean"), "GRPO")
            band(ax, ("grpo_cd", "reward_mean"), "GRPO + CD")
            ax.set_title("GRPO: held-out mean reward (fixed seeds)")
            ax.set_ylabel("quality + semantic")
        elif panel == "grpo_diff":
            band(ax, ("grpo", "diff"), "GRPO")
            band(ax, ("grpo_cd", "diff"), "GRPO + CD")
            ax.axhline(0.0, color="gray", ls=":")
            ax.set_title("GRPO: paired change vs step 0 (same prompts, noise)")
            ax.set_ylabel("held-out reward - step 0")
        elif panel == "dpo_acc":
            band(ax, ("dpo", "acc"), "all operators", lw=2.5, color="k")
            for op in sorted({met.split("/", 1)[1] for m, met in data if m == "dpo" and met.startswith("acc/")}):
                band(ax, ("dpo", f"acc/{op}"), op, lw=1)
            ax.axhline(0.5, color="gray", ls=":")
            ax.set_title("DF-DPO: held-out implicit reward accuracy")
            ax.set_ylim(0, 1.05)
        else:
            band(ax, ("dpo", "loss"), "held-out DPO loss", color="k")
            ax.axhline(math.log(2), color="gray", ls=":", label="ln 2")
            ax.set_title("DF-DPO: held-out loss")
        if panel.startswith("dpo"):
            every = max(1, args.dpo_steps // 3)
            for b in (every, 2 * every):
                ax.axvline(b, color="tab:red", ls="--", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def summary(out: str) -> str:
    data = read_csv(out)
    lines = []
    for (mode, metric) in sorted(data):
        if metric not in ("reward_mean", "reward/quality", "reward/semantic", "acc", "loss") and not metric.startswith("acc/"):
            continue
        steps, m, s = mean_std(data[(mode, metric)])
        lines.append(f"{mode:8s} {metric:18s} step {steps[0]}: {m[0]:.4f} ± {s[0]:.4f} -> step {steps[-1]}: "
                     f"{m[-1]:.4f} ± {s[-1]:.4f} (seeds {sorted(data[(mode, metric)])})")
        if metric == "reward_mean" and (mode, "diff") in data:
            per_seed = []
            for seed, pts in sorted(data[(mode, "diff")].items()):
                half = dict(data[(mode, "diff_ci95")][seed])
                last = max(pts)[0]
                per_seed.append(f"seed {seed}: {dict(pts)[last]:+.4f} ± {half[last]:.4f}")
            lines.append(f"{mode:8s} paired change at the last step (95 % CI over held-out groups): " + ", ".join(per_seed))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["grpo", "grpo_cd", "dpo"], choices=sorted(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--grpo_steps", type=int, default=12)
    p.add_argument("--eval_every", type=int, default=4, help="GRPO steps between held-out evaluations")
    p.add_argument("--eval_prompts", type=int, default=8, help="held-out prompts (GRPO)")
    p.add_argument("--eval_seeds", type=int, default=1, help="fixed noise seeds per evaluation (G samples each)")
    p.add_argument("--dpo_steps", type=int, default=30)
    p.add_argument("--dpo_eval_every", type=int, default=5)
    p.add_argument("--dpo_eval_clips", type=int, default=3)
    p.add_argument("--dpo_eval_noise", type=int, default=1)
    p.add_argument("--num_frames", type=int, default=8, help="frames per clip (the world generator's own: 8)")
    p.add_argument("--lr", type=float, default=None, help="override every mode's learning rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--work", default=os.path.join("outputs", "learning_curves"), help="run directories")
    p.add_argument("--plot_only", action="store_true", help="only re-plot (and summarise) the <mode>.csv files already in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if not args.plot_only:
        for mode in args.modes:
            with open(os.path.join(args.out, f"{mode}.csv"), "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["mode", "seed", "step", "metric", "value"])
                for seed in args.seeds:
                    run(mode, seed, args, writer)
                    fh.flush()
    plot(args.out, os.path.join(args.out, "learning_curves.png"), args)
    print(summary(args.out))


if __name__ == "__main__":
    main()
