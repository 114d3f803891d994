"""The main job's few-step student in the stock diffusers pipeline, under the schedulers a user would try.

The main job samples its student with the project's consistency sampler, which is LCMScheduler step for step. A user
loads the student into ``TextToVideoSDPipeline`` (``pisces_fast.load_lora``; a guidance-conditioned student gets its w
folded into the weights) and picks a scheduler. This benchmark does exactly that on the world and scores the clips
with the world's analyzer. Rows, at the run's ``world.student_row`` step count (4 in the main job):

* LCMScheduler (on the main job's 50-step grid at 4 steps: 999, 759, 499, 259, its "after" row), first checked
  against the project's sampler on the same latents and noise (they must agree to PARITY_TOL, or the run stops);
* TCDScheduler with gamma (the pipeline's ``eta``) in [0, 1]: each step moves the consistency function's x0
  deterministically to s = (1 - gamma) t_next with the model's own noise estimate and re-noises only from s to t_next
  (gamma = 0: a deterministic DDIM-like multistep sampler). Unlike LCMScheduler its last step returns the sample at
  t = 0 (x0 plus the model's noise estimate times sqrt(1 - alpha_bar_0), 0.03 on the world's schedule) rather than
  x0, and it applies no boundary condition; its gamma = 1 row measures what those two differences alone cost;
* LCMScheduler with other timestep schedules on the run's grid (``LCMScheduler.set_timesteps(timesteps=)``; the
  pipeline only passes ``num_inference_steps``, so a small subclass hands the schedule over);
* LCMScheduler at more steps (8), for reference.

The prompts are the main job's held-out prompt list *continued* (by default prompts 17..64): the 16 the main job's report
scores are not used to pick a scheduler. Initial latents and re-noising noise per seed are the main job's
(``pisces_fast.world.job.seed_noise``), the same for every row; each row records the timesteps the scheduler ran.

    deepspeed train.py                                                      # the main job -> outputs/world
    python benchmarks/world_student_schedulers.py --run outputs/world        # ~3 min on 2 cores
    python benchmarks/world_student_schedulers.py --run outputs/world --guidance 1 3

Writes ``<out>/world_student_schedulers.json`` and ``.md``.
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
sys.path.insert(0, os.path.dirname(HERE))

DEFAULT_SCHEDULES = ([999, 699, 399, 199], [999, 599, 299, 99], [999, 759, 499, 139], [999, 799, 599, 399])
# The stock pipeline and the project's sampler differ only by float reassociation (the folded w; 9.4e-6 measured on
# the main job's student).
PARITY_TOL = 1e-4
SHOWN = ("total", "quality", "semantic", "background_consistency", "temporal_flickering", "motion_smoothness",
         "imaging_quality")


def parse_schedule(text: str) -> list:
    try:
        schedule = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer timesteps, got {text!r}") from None
    if any(a <= b for a, b in zip(schedule, schedule[1:])) or schedule[-1] < 0 or schedule[0] > 999:
        raise argparse.ArgumentTypeError(f"expected strictly decreasing timesteps in [0, 999], got {text!r}")
    return schedule


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True,
                   help="a main job's output directory (its config.json and lora_diffusers/, e.g. outputs/world)")
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="guidance scales w (folded into a guidance-conditioned student, else the pipeline's CFG); "
                        "default: the run's world.student_row (3 in the main job)")
    p.add_argument("--tcd_gamma", type=float, nargs="*", default=[0.0, 0.3, 0.5, 0.7, 1.0],
                   help="TCDScheduler gammas (the pipeline's eta), each in [0, 1]")
    p.add_argument("--schedules", type=parse_schedule, nargs="*", default=[list(s) for s in DEFAULT_SCHEDULES],
                   help="other LCMScheduler timestep schedules, each as 999,699,399,199, on the run's consistency grid "
                        "(t + 1 a multiple of 1000 / cd.num_ddim_timesteps)")
    p.add_argument("--reference_steps", type=int, nargs="*", default=[8],
                   help="LCMScheduler step counts sampled for reference")
    p.add_argument("--prompts", type=int, default=48, help="validation prompts: the held-out list after the report's")
    p.add_argument("--offset", type=int, default=16,
                   help="validation prompts start after this many of the held-out list (the main job scores the first 16)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (the main job's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=os.path.join(HERE, "results", "world_student_schedulers"),
                   help="output directory of the JSON and the Markdown table")
    args = p.parse_args(argv)
    from pisces_fast.world.job import run_dir_problem

    if run_dir_problem(args.run):
        p.error(f"--run: {run_dir_problem(args.run)}")
    if any(not 0.0 <= g <= 1.0 for g in args.tcd_gamma):
        p.error(f"--tcd_gamma: expected values in [0, 1], got {args.tcd_gamma}")
    if any(n < 1 for n in args.reference_steps) or args.prompts < 1 or args.offset < 0:
        p.error(f"--reference_steps and --prompts: expected >= 1; --offset: expected >= 0; got {args.reference_steps}, "
                f"{args.prompts}, {args.offset}")
    return args, p


def check_on_grid(args, parser, cfg) -> None:
    """Schedules on the run's consistency grid and step counts it has (LCMScheduler only warns otherwise)."""
    grid = cfg.cd.num_ddim_timesteps
    ratio = 1000 // grid
    for s in args.schedules:
        if len(s) > grid or any((t + 1) % ratio for t in s):
            parser.error(f"--schedules: {s} is not on the run's consistency grid (at most {grid} timesteps, each t + 1 "
                         f"a multiple of {ratio})")
    if any(n > grid for n in args.reference_steps):
        parser.error(f"--reference_steps: at most cd.num_ddim_timesteps = {grid}, got {args.reference_steps}")


def fixed_timesteps_lcm(config: dict, timesteps: list):
    """An LCMScheduler that, asked for ``len(timesteps)`` steps by the pipeline, uses ``timesteps`` (its documented
    ``set_timesteps(timesteps=...)``; the stock pipeline has no argument for it)."""
    from diffusers import LCMScheduler

    class FixedTimestepsLCMScheduler(LCMScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            if num_inference_steps != len(timesteps):
                raise ValueError(f"this scheduler holds {len(timesteps)} timesteps, asked for {num_inference_steps}")
            super().set_timesteps(device=device, timesteps=list(timesteps))

    return FixedTimestepsLCMScheduler.from_config(config)


def rows_of(args, steps: int) -> list:
    """``(label, scheduler name, steps, options)`` of every row, the main job's sampler first."""
    rows = [(f"LCM, {steps} steps (the main job's sampler)", "lcm", steps, {})]
    rows += [(f"TCD, {steps} steps, gamma {g:g}", "tcd", steps, {"eta": g}) for g in args.tcd_gamma]
    rows += [(f"LCM, timesteps {', '.join(map(str, s))}", "lcm_fixed", len(s), {"timesteps": s})
             for s in args.schedules]
    rows += [(f"LCM, {n} steps", "lcm", n, {}) for n in args.reference_steps if n != steps]
    return rows


def stock_pipeline(run: str, guidance: Optional[float], generator_dir: str):
    """The world generator as ``TextToVideoSDPipeline`` with the run's student LoRA (w folded in unless None)."""
    import warnings

    from diffusers import TextToVideoSDPipeline

    import pisces_fast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT where CLIP is expected; the pipeline's deprecation notice
        pipe = TextToVideoSDPipeline.from_pretrained(generator_dir)
    pipe.set_progress_bar_config(disable=True)
    return pisces_fast.load_lora(pipe, os.path.join(run, "lora_diffusers"), guidance_scale=guidance)


def sample_stock(pipe, scheduler, prompts: list, steps: int, seeds: list, gen, meta: dict, guidance: float,
                 eta: float = 0.0) -> tuple:
    """Videos ``(len(seeds) * len(prompts), T, 3, H, W)``, seed-major, from the main job's latents and noise, and
    the timesteps the scheduler ran."""
    from pisces_fast.world import job

    pipe.scheduler = scheduler
    out = []
    for seed in seeds:
        latents, noise = job.seed_noise(gen, len(prompts), seed)
        frames = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, eta=eta, latents=latents,
                      generator=noise, output_type="pt", num_frames=meta["num_frames"], height=meta["height"],
                      width=meta["width"]).frames
        out.append(torch.as_tensor(frames).float())
    return torch.cat(out).clamp(0, 1), [int(t) for t in scheduler.timesteps]


def write_outputs(out: str, meta: dict, results: list) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "world_student_schedulers.json"), "w") as fh:
        json.dump({"meta": meta, "rows": results}, fh, indent=1)
    lines = [f"# The main job's student ({meta['run']}) in TextToVideoSDPipeline, by scheduler", "",
             f"`{meta['command']}`", "",
             f"Validation prompts: held-out prompts {meta['offset'] + 1}..{meta['offset'] + len(meta['prompts'])} "
             f"(the main job's report scores the first {meta['offset']}) x seeds {meta['seeds']}; the main job's "
             f"initial latents and re-noising noise per seed. The stock pipeline's LCM row equals the project's "
             f"sampler to max |diff| {meta['parity_max_abs_diff']:.1e} (pixels in [0, 1]). ± = std over seeds.", "",
             "| w | scheduler | timesteps | " + " | ".join(k.replace("_", " ") for k in SHOWN) + " |",
             "|---|---|---|" + "---|" * len(SHOWN)]
    for r in results:
        cells = [f"{r['mean'][k]:.3f}" + (f" ± {r['std'][k]:.3f}" if k in ("total", "quality", "semantic") else "")
                 for k in SHOWN]
        ts = ", ".join(map(str, r["timesteps_run"]))
        lines.append(f"| {r['guidance']:g} | {r['label']} | {ts} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "world_student_schedulers.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> list:
    args, parser = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import LCMScheduler, TCDScheduler

    from pisces_fast.training.sampling import consistency_scheduler_config
    from pisces_fast.world import job
    from pisces_fast.world.assets import world_generator_meta, world_generator_path

    cfg, gen = job.load_run(args.run, ["--world.eval_prompts", str(args.offset + args.prompts)])
    check_on_grid(args, parser, cfg)
    prompts = job.held_out_prompts(cfg)[args.offset:]
    generator_dir = str(world_generator_path(cfg.model.path))
    meta_clip = world_generator_meta(generator_dir)
    student = cfg.world.student_row
    folded = bool(gen.w_conditioned)  # a guidance-conditioned student takes w in its weights, else CFG in the pipeline
    t0 = time.time()
    config = consistency_scheduler_config(gen)  # the grid and scaling the project's sampler uses
    results, parity = [], 0.0
    for w in args.guidance or [float(student["guidance"])]:
        pipe = stock_pipeline(args.run, w if folded else None, generator_dir)
        for label, kind, steps, options in rows_of(args, int(student["steps"])):
            if kind == "lcm":
                scheduler = LCMScheduler.from_config(config)
            elif kind == "tcd":
                scheduler = TCDScheduler.from_config(config)
            else:
                scheduler = fixed_timesteps_lcm(config, options["timesteps"])
            videos, timesteps = sample_stock(pipe, scheduler, prompts, steps, args.seeds, gen, meta_clip,
                                             1.0 if folded else w, eta=options.get("eta", 0.0))
            if label.endswith("(the main job's sampler)"):  # the stock pipeline must reproduce the project's sampler
                row = {"sampler": "consistency", "steps": steps, "guidance": w}
                mine = job.sample_row(gen, gen.denoiser, prompts, row, args.seeds[:1])
                diff = float((videos[:len(prompts)] - mine).abs().max())
                if diff > PARITY_TOL:
                    raise RuntimeError(f"the stock pipeline's LCM row differs from the main job's sampler by {diff:.2e} "
                                       f"(> {PARITY_TOL:g}): the run's LoRA or config does not match its generator")
                parity = max(parity, diff)
            scores = job.score_row(videos, prompts, args.seeds)
            results.append({"label": label, "guidance": w, "scheduler": kind, "steps": steps, **options,
                            "timesteps_run": timesteps, "mean": scores["mean"], "std": scores["std"],
                            "per_seed": scores["per_seed"]})
            m = scores["mean"]
            print(f"w {w:g}  {label:42s} total {m['total']:.3f}  quality {m['quality']:.3f}  "
                  f"semantic {m['semantic']:.3f}", flush=True)
    command = " ".join(["python benchmarks/world_student_schedulers.py"] + (sys.argv[1:] if argv is None else list(argv)))
    meta = {"run": args.run, "prompts": prompts, "offset": args.offset, "seeds": args.seeds,
            "parity_max_abs_diff": parity, "seconds": round(time.time() - t0, 1), "command": command}
    write_outputs(args.out, meta, results)
    return results


if __name__ == "__main__":
    main()
