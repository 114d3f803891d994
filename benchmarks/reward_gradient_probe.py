"""Does following a reward's gradient raise the analyzer's scores? Reward ascent on a model's own samples.

Reward validity (``reward_validity.py``) asks whether a reward *ranks* clips the way the ground truth does. Direct
reward backprop (Eq. 5) uses something else: the reward's *gradient* at the model's samples. This probe measures that
direction without any training noise. It samples a model on the main job's held-out prompts, initial latents and
re-noising noise (``pisces_fast.world.job.sample_row_latents``), then runs gradient ascent with Adam on each clip's final
latents, through the VAE decoder, on one reward at a time, and scores the decoded clips with the world's analyzer
every ``--every`` steps. A reward whose gradient points at what the analyzer calls better raises its scores along the
way; a reward whose gradient is dominated by directions the analyzer calls worse (flicker, texture, noise) lowers
them while the reward itself climbs. Nothing but the latents moves: no model weight, no sampler.

    python benchmarks/reward_gradient_probe.py --run outputs/world      # the main job's student (its LoRA, OT map)
    python benchmarks/reward_gradient_probe.py                          # the shipped teacher at its best row
    python benchmarks/reward_gradient_probe.py --quick                  # CI: 2 prompts, 1 seed, 4 ascent steps
                                                                        # (discriminators: 8 clips, 3 steps)
    python benchmarks/reward_gradient_probe.py --run outputs/world --smooth 4   # ascend each reward's mean over 4
                                                                        # noisy, flickering copies of the clip

Rewards (the main job's world VLM): ``quality`` (OT-mapped cosine, Eq. 2), ``quality_plain`` (plain cosine),
``semantic`` (POT-fused VTM, m = 0.9, Eq. 4), ``semantic_vanilla`` (vanilla cross-attention). ``--discriminators``
also ascends what adversarial post-training would follow: discriminators trained here on real train-split clips vs
the model's own samples (``vlm``: a head on the frozen world VLM's video tokens; ``latent``: a 3D CNN on the clip's
VAE latents; ``pixel``: a 3D CNN on its pixels). ``--smooth K`` ascends each one's mean over K noisy, flickering
copies of the clip instead (a cheap robustification of its gradient).
Writes ``<out>/reward_gradient_probe.json`` (every number), ``.md`` (the table) and ``.png`` (the curves).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

# name -> (PiscesRewards options, which output is ascended)
REWARDS = {
    "quality": ({"use_ot_map": True, "use_pot": True}, "quality"),
    "quality_plain": ({"use_ot_map": False, "use_pot": True}, "quality"),
    "semantic": ({"use_ot_map": False, "use_pot": True}, "semantic"),
    "semantic_vanilla": ({"use_ot_map": False, "use_pot": False}, "semantic"),
}
# Discriminators (real clips vs the probed model's own samples), ascended like a reward: what adversarial post-training
# would follow. "vlm": a head on the frozen world VLM's video tokens; "latent": a 3D CNN on the VAE latents of the clip
# (encoded, so the gradient still reaches the sample through decode -> encode); "pixel": a 3D CNN on the pixels.
DISCRIMINATORS = ("vlm", "latent", "pixel")
SHOWN = ("total", "quality", "semantic", "background_consistency", "temporal_flickering", "motion_smoothness",
         "imaging_quality")


def parse_args(argv=None):
    from pisces_fast.world.config import parse_grid_row
    from pisces_fast.world.job import run_dir_problem

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None,
                   help="a main job's output directory: probe its student (lora_diffusers/) with its OT map (ot_map/) "
                        "at its config's world.student_row (default: the shipped teacher, with an OT map fitted here)")
    p.add_argument("--row", default=None,
                   help="SAMPLER:STEPS:GUIDANCE the clips are sampled with (default: the run's student row, or the "
                        "teacher's best row of the main job, consistency:8:1)")
    p.add_argument("--rewards", nargs="*", default=list(REWARDS), choices=list(REWARDS), help="rewards to ascend")
    p.add_argument("--discriminators", nargs="*", default=[], choices=DISCRIMINATORS,
                   help="also ascend discriminators trained here on real train-split clips vs the probed model's own "
                        "samples (same row) on those clips' captions: 'vlm' (a head on the frozen world VLM's video "
                        "tokens), 'latent' (a 3D CNN on the clip's VAE latents), 'pixel' (a 3D CNN on its pixels)")
    p.add_argument("--disc_clips", type=int, default=256,
                   help="real and generated clips each for the discriminators (75%% train, 25%% held out)")
    p.add_argument("--disc_steps", type=int, default=300, help="discriminator training steps (Adam, batch 32)")
    p.add_argument("--lr", type=float, nargs="+", default=[0.002, 0.02], help="Adam learning rates on the latents")
    p.add_argument("--steps", type=int, default=40, help="ascent steps")
    p.add_argument("--every", type=int, default=10, help="analyzer scores every this many steps")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts (the main job's first N)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (the main job's)")
    p.add_argument("--smooth", type=int, default=0, metavar="K",
                   help="K >= 1: ascend the reward's mean over K randomly perturbed copies of each clip instead of the "
                        "reward itself (expectation over transformations, a cheap robustification of its gradient: "
                        "per-frame brightness flicker of +-SMOOTH_FLICKER, then pixel noise of std SMOOTH_NOISE, from "
                        "pisces_fast.training.distortions); the records still report the clean clip's reward")
    p.add_argument("--smooth_noise", type=float, default=0.05, help="pixel-noise std of --smooth's copies")
    p.add_argument("--smooth_flicker", type=float, default=0.05, help="brightness-flicker amplitude of --smooth's copies")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (JSON, Markdown, plot)")
    p.add_argument("--work", default=os.path.join("outputs", "reward_gradient_probe"),
                   help="where the teacher's OT map is fitted (once per world VLM, then reused)")
    p.add_argument("--quick", action="store_true",
                   help="2 prompts, 1 seed, 4 steps at the last rate; the teacher's OT map from 256 clips, 30 steps; "
                        "discriminators on 8 clips each for 3 steps (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.seeds, args.steps, args.every, args.lr = 2, args.seeds[:1], 4, 2, args.lr[-1:]
        args.disc_clips, args.disc_steps = 8, 3
    if not args.rewards and not args.discriminators:
        p.error("--rewards / --discriminators: nothing to ascend")
    if args.disc_clips < 4 or args.disc_steps < 1:
        p.error(f"--disc_clips: expected >= 4; --disc_steps: >= 1; got {args.disc_clips}, {args.disc_steps}")
    if args.run is not None and run_dir_problem(args.run):
        p.error(f"--run: {run_dir_problem(args.run)}")
    if args.steps < 1 or args.every < 1 or args.prompts < 1:
        p.error("--steps, --every and --prompts must be >= 1")
    if args.smooth < 0 or not args.smooth_noise > 0 or not 0 < args.smooth_flicker < 1:
        p.error(f"--smooth: expected >= 0; --smooth_noise: > 0; --smooth_flicker: in (0, 1); got {args.smooth}, "
                f"{args.smooth_noise}, {args.smooth_flicker}")
    if any(not (lr > 0) for lr in args.lr):
        p.error(f"--lr: expected positive learning rates, got {args.lr}")
    if args.row is not None:
        try:
            parse_grid_row(args.row, "--row")
        except ValueError as err:
            p.error(str(err))
    return args


def load_model(args):
    """(generator, config, row, OT map directory, label) of the probed model."""
    from pisces_fast.world import load_world_generator
    from pisces_fast.world.assets import world_vlm_path
    from pisces_fast.world.config import parse_grid_row, world_config_from_argv
    from pisces_fast.world.job import directory_digest, fit_world_ot_map, load_run

    if args.run is None:
        overrides = ["--world.eval_prompts", str(args.prompts)]
        if args.quick:  # a small OT map (Algorithm 2 over 256 clips, 30 steps)
            overrides += ["--world.ot_map_clips", "256", "--world.ot_map_steps", "30"]
        cfg = world_config_from_argv(overrides)
        gen = load_world_generator(cfg.model.path)
        row = parse_grid_row(args.row or "consistency:8:1", "--row")
        # Algorithm 2 as the main job fits it; it depends on the VLM (and the job's seed), so it is kept per VLM.
        vlm_digest = directory_digest(str(world_vlm_path(cfg.world.vlm)))
        w = cfg.world
        name = f"ot_map_seed{cfg.seed}_{w.ot_map_clips}clips_{w.ot_map_steps}steps_vlm{vlm_digest}"
        ot_dir = fit_world_ot_map(cfg, os.path.join(args.work, name))
        return gen, cfg, row, ot_dir, "teacher (shipped generator)"
    cfg, gen = load_run(args.run, ["--world.eval_prompts", str(args.prompts)])
    row = parse_grid_row(args.row, "--row") if args.row else dict(cfg.world.student_row)
    return gen, cfg, row, os.path.join(args.run, "ot_map"), f"student ({args.run})"


# The probed model's samples for the discriminators use seeds from here on: none is an evaluation seed, so no
# generated training clip shares its initial latents or re-noising noise with a probed clip.
DISC_SEED_BASE = 10_000


class VLMTokenHead(torch.nn.Module):
    """On the frozen world VLM's video tokens (B, M, C): a per-token projection, then a linear read-out of all."""

    def __init__(self, num_tokens: int, width: int, hidden: int = 64):
        super().__init__()
        self.token = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.LeakyReLU(0.2))
        self.out = torch.nn.Linear(hidden * num_tokens, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.token(tokens).flatten(1)).squeeze(-1)


class ConvHead(torch.nn.Module):
    """A 3D CNN on (B, C, T, H, W): stride 1 then 2 in space, then 2 in time and space twice, mean pool, linear."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        act = torch.nn.LeakyReLU(0.2)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(channels, width, 3, padding=1), act,
            torch.nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), act,
            torch.nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1), act,
            torch.nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1), act)
        self.out = torch.nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x).mean(dim=(2, 3, 4))).squeeze(-1)


def discriminator_data(gen, cfg, row: dict, n: int) -> tuple:
    """(real, generated) clips (n, T, 3, H, W): train-split clips of the world and the probed model's samples at
    ``row`` on their captions (train prompts, so none of the probe's held-out prompts; seeds from DISC_SEED_BASE)."""
    from pisces_fast.data.shapes import make_clips
    from pisces_fast.world import job

    clips = make_clips(n, split="train", seed=cfg.seed + 1, config=job.world_config_of(cfg))
    chunk = 64
    fake = [job.sample_row(gen, gen.denoiser, clips.captions[i:i + chunk], row, [DISC_SEED_BASE + i])
            for i in range(0, n, chunk)]
    return clips.videos.float(), torch.cat(fake)


def discriminator_features(kind: str, gen, vlm_dir):
    """What a discriminator of ``kind`` reads from a video (B, T, 3, H, W); frozen, differentiable in the video."""
    if kind == "vlm":
        from pisces_fast.world import load_world_vlm

        backbone = load_world_vlm(vlm_dir)  # frozen
        return lambda video: backbone.encode_video(video).tokens
    if kind == "latent":  # the codec itself: VideoGenerator.encode_video is no_grad, and the ascent needs the gradient
        return lambda video: gen.codec.encode(video).float()
    return lambda video: video.transpose(1, 2)


def train_discriminator(kind: str, gen, vlm_dir, real: torch.Tensor, fake: torch.Tensor, steps: int) -> tuple:
    """A discriminator of ``kind`` (a callable video -> logit, real > 0) trained with the logistic GAN loss on the
    first 75% of the clips' features (computed once), frozen; and its accuracy on the last 25%."""
    import torch.nn.functional as F

    features = discriminator_features(kind, gen, vlm_dir)
    with torch.no_grad():
        feat_real = torch.cat([features(v) for v in real.split(64)])
        feat_fake = torch.cat([features(v) for v in fake.split(64)])
    torch.manual_seed(0)
    head = VLMTokenHead(feat_real.shape[1], feat_real.shape[2]) if kind == "vlm" else ConvHead(feat_real.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    n_train = max(2, int(0.75 * len(real)))
    for _ in range(steps):
        idx = torch.randint(0, n_train, (min(32, n_train),))
        loss = F.softplus(-head(feat_real[idx])).mean() + F.softplus(head(feat_fake[idx])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    with torch.no_grad():
        accuracy = 0.5 * (float((head(feat_real[n_train:]) > 0).float().mean())
                          + float((head(feat_fake[n_train:]) < 0).float().mean()))
    return (lambda video: head(features(video))), accuracy


def smoothed_reward(reward, video: torch.Tensor, prompts: list, smooth: tuple, generator: torch.Generator) -> dict:
    """The reward's mean over ``k`` perturbed copies of ``video`` (``smooth`` = (k, noise std, flicker amplitude))."""
    from pisces_fast.training.distortions import add_noise, brightness_flicker

    k, noise_std, flicker = smooth
    values = [reward(add_noise(brightness_flicker(video, flicker, generator), noise_std, generator), prompts)
              for _ in range(k)]
    return {key: sum(v[key] for v in values) / k for key in values[0]}


def ascend(gen, reward, output: str, latents: torch.Tensor, prompts: list, seeds: list, lr: float, steps: int,
           every: int, smooth: Optional[tuple] = None) -> list:
    """Adam ascent of ``reward(decode(z))[output]`` over z from ``latents`` (with ``smooth``, of its mean over
    perturbed copies: `smoothed_reward`); a record every ``every`` steps."""
    from pisces_fast.world.job import score_row

    z = latents.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    batch_prompts = list(prompts) * len(seeds)
    records = []
    noise = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        video = gen.decode_latents(z).float().clamp(0, 1)
        recorded = step % every == 0 or step == steps
        if smooth is None:
            values = reward(video, batch_prompts)
        elif recorded:  # the clean clip's reward, for the record only
            with torch.no_grad():
                values = reward(video, batch_prompts)
        if recorded:
            scores = score_row(video.detach().cpu(), prompts, seeds)
            records.append({"step": step, "reward": {k: float(v.detach().mean()) for k, v in values.items()},
                            "analyzer": scores["mean"], "analyzer_std": scores["std"],
                            "latent_shift": float((z.detach() - latents).norm() / latents.norm())})
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        if smooth is not None:
            values = smoothed_reward(reward, video, batch_prompts, smooth, noise)
        (-values[output].mean()).backward()
        opt.step()
    return records


def write_outputs(out: str, meta: dict, runs: list) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reward_gradient_probe.json"), "w") as fh:
        json.dump({"meta": meta, "runs": runs}, fh, indent=1)
    head = ["reward", "Adam lr", "step", "reward value", "latent shift"] + [k.replace("_", " ") for k in SHOWN]
    lines = [f"# Reward ascent on the {meta['model']}'s clips ({meta['row_label']}; {len(meta['prompts'])} held-out "
             f"prompts x {len(meta['seeds'])} seeds)", "", f"`{meta['command']}`", "",
             "Gradient ascent on each clip's final latents (through the VAE decoder) on one reward; analyzer scores of "
             "the decoded clips (mean over seeds). Step 0 is the model's own sample."
             + (f" Smoothed runs ascend the reward's mean over {meta['smooth'][0]} copies of each clip with per-frame "
                f"brightness flicker of ±{meta['smooth'][2]:g} and pixel noise of std {meta['smooth'][1]:g}; their "
                f"'reward value' is the clean clip's." if meta.get("smooth") else "")]
    discs = [r["discriminator"] for r in runs if r.get("discriminator")]
    if discs:
        seen = {d["kind"]: d for d in discs}
        lines += ["", "Discriminators (real train-split clips vs the model's own samples on their captions; held-out "
                  "accuracy on the last 25%): " + ", ".join(f"{k} {d['held_out_accuracy']:.3f} ({d['clips']} clips "
                                                            f"each, {d['steps']} steps)" for k, d in seen.items()) + "."]
    lines += ["",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for rec in run["records"]:
            cells = [run["reward"], f"{run['lr']:g}", str(rec["step"]), f"{rec['reward'][run['output']]:.3f}",
                     f"{rec['latent_shift']:.3f}"] + [f"{rec['analyzer'].get(k, float('nan')):.3f}" for k in SHOWN]
            lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out, "reward_gradient_probe.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(os.path.join(out, "reward_gradient_probe.png"), meta, runs)


def plot(path: str, meta: dict, runs: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward value", None), ("analyzer Quality", "quality"), ("analyzer Semantic", "semantic"),
              ("analyzer Total", "total"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, key) in zip(axes, panels):
        for run in runs:
            steps = [r["step"] for r in run["records"]]
            ys = [r["reward"][run["output"]] if key is None else r["analyzer"][key] for r in run["records"]]
            ax.plot(steps, ys, marker="o", label=f"{run['reward']}, lr {run['lr']:g}")
        ax.set_title(title)
        ax.set_xlabel("ascent step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Reward ascent on the {meta['model']}'s clips ({meta['row_label']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from pisces_fast.world import job

    gen, cfg, row, ot_dir, model = load_model(args)
    prompts = job.held_out_prompts(cfg)
    t0 = time.time()
    latents = job.sample_row_latents(gen, gen.denoiser, prompts, row, args.seeds)  # no_grad inside
    smooth = (args.smooth, args.smooth_noise, args.smooth_flicker) if args.smooth else None
    suffix = f" (smoothed x{args.smooth})" if smooth else ""
    runs = []

    def probe(name: str, reward, output: str, **extra) -> None:
        for lr in args.lr:
            records = ascend(gen, reward, output, latents, prompts, args.seeds, lr, args.steps, args.every, smooth)
            runs.append({"reward": name + suffix, "output": output, "lr": lr, "smooth": list(smooth) if smooth else None,
                         **extra, "records": records})
            first, last = records[0], records[-1]
            print(f"{name:22s} lr {lr:<6g} reward {first['reward'][output]:.3f} -> {last['reward'][output]:.3f}   "
                  + "  ".join(f"{k} {first['analyzer'][k]:.3f} -> {last['analyzer'][k]:.3f}"
                              for k in ("total", "quality", "semantic")), flush=True)

    for name in args.rewards:
        options, output = REWARDS[name]
        probe(name, job.world_reward(ot_map=ot_dir, vlm=cfg.world.vlm, **options), output)
    if args.discriminators:
        real, fake = discriminator_data(gen, cfg, row, args.disc_clips)
    for kind in args.discriminators:
        disc, accuracy = train_discriminator(kind, gen, cfg.world.vlm, real, fake, args.disc_steps)
        probe(f"discriminator ({kind})", lambda video, prompts, disc=disc: {"realness": disc(video)}, "realness",
              discriminator={"kind": kind, "clips": args.disc_clips, "steps": args.disc_steps,
                             "held_out_accuracy": accuracy})
    command = " ".join(["python benchmarks/reward_gradient_probe.py"] + (sys.argv[1:] if argv is None else list(argv)))
    meta = {"model": model, "row": row, "row_label": job.row_label(row), "prompts": prompts, "seeds": args.seeds,
            "smooth": list(smooth) if smooth else None,
            "steps": args.steps, "every": args.every, "seconds": round(time.time() - t0, 1), "command": command}
    write_outputs(args.out, meta, runs)
    return runs


if __name__ == "__main__":
    main()
