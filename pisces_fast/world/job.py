"""The main job on the embedded shapes world: PISCES end to end, with no downloads.

``deepspeed train.py`` (or ``python train.py``) with no ``--config`` runs this:

1. embed real train clips and their captions with the shipped world VLM and fit the neural OT map
   text → real video (Algorithm 2), saved in ``OUTPUT_DIR/ot_map``;
2. "before": sample the shipped generator (the teacher, as shipped) on held-out prompts over a grid of samplers —
   DDIM 20/50 and the consistency ("stochastic multistep") sampler at 4/8 steps, each at CFG 1 and 3 — with fixed
   seeds, and score every clip with the rule-based analyzer (``pisces_fast.eval.analyzer``); the teacher's best
   row by Total is "before" (the paper compares its 4-step student with the teacher at its best);
3. post-train the generator with LoRA: consistency distillation (guidance-conditioned student) + the OT-aligned
   quality and semantic rewards (Eq. 5), through the ordinary training loop (checkpoints, metrics.jsonl, resume);
4. "after": sample the student over the same grid, same prompts and the same initial latents and fresh noise per
   seed; its consistency sampler at 4 steps (``world.student_row``) is "after";
5. write ``report.json``, ``report.md`` (headline, the whole grid for both models, same-sampler differences,
   per-dimension rows, seed spread), a before/after GIF grid and the reward/loss curves.

The teacher's grid does not depend on training: it is cached in ``OUTPUT_DIR/teacher_grid.json`` keyed by the
generator's weights, the prompts, the seeds and the row, so resumed or repeated runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from pisces_fast.data.shapes import ShapesDataset, WorldConfig
from pisces_fast.eval.analyzer import DIMENSIONS, analyze
from pisces_fast.fileio import atomic_write_text

from .assets import load_world_vlm
from .config import WORLD_REWARD, WorldTrainConfig, row_key

HEADLINE = ("total", "quality", "semantic")


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

    backbone = load_world_vlm(vlm)
    ot = OTMap.load(ot_map) if (use_ot_map and ot_map) else None
    return PiscesRewards(backbone, ot, use_ot_map=use_ot_map and ot is not None, use_pot=use_pot,
                         pot=POTConfig(**(pot or {})), weights=weights)


def world_config_of(cfg) -> WorldConfig:
    return WorldConfig(num_frames=cfg.model.num_frames, height=cfg.model.height, width=cfg.model.width)


def fit_world_ot_map(cfg: WorldTrainConfig, out_dir: str) -> str:
    """Algorithm 2 on the world: text [CLS] of train captions → [CLS] of real train clips."""
    from pisces_fast.rewards import collect_embeddings, fit_ot_map

    w = cfg.world
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir  # fitted by an earlier (resumed) run or another rank
    backbone = load_world_vlm(w.vlm)
    data = ShapesDataset(w.ot_map_clips, "train", seed=cfg.seed + 17, config=world_config_of(cfg))
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


def run_dir_problem(run_dir: str) -> Optional[str]:
    """What keeps ``run_dir`` from being a finished main job's output directory (:func:`load_run`), or None."""
    if os.path.isfile(os.path.join(run_dir, "config.json")) and os.path.isdir(os.path.join(run_dir, "lora_diffusers")):
        return None
    return f"expected a main job's output directory with config.json and lora_diffusers/, got {run_dir!r}"


def load_run(run_dir: str, overrides: Optional[list] = None) -> tuple:
    """``(config, student)`` of a finished main job's output directory: its ``config.json`` (plus ``overrides``, e.g.
    ``["--world.eval_prompts", "64"]``) and its generator with the student's LoRA (``lora_diffusers/``, the w
    projection included), in eval mode, sampled on the consistency grid and boundary condition its CD trained."""
    from pisces_fast.training.lora import load_diffusers_lora_into_denoiser

    from .assets import load_world_generator
    from .config import world_config_from_argv

    problem = run_dir_problem(run_dir)
    if problem:
        raise FileNotFoundError(f"run_dir: {problem}")
    cfg = world_config_from_argv(["--config", os.path.join(run_dir, "config.json")] + list(overrides or []))
    gen = load_world_generator(cfg.model.path)
    load_diffusers_lora_into_denoiser(gen.denoiser, gen.arch, os.path.join(run_dir, "lora_diffusers"))
    gen.denoiser.eval()
    gen.use_consistency_config(cfg.cd)  # as ConsistencyDistillation does on the trainer's generator
    return cfg, gen


def held_out_prompts(cfg: WorldTrainConfig) -> list:
    """The evaluation prompts: the first ``world.eval_prompts`` distinct held-out captions."""
    data = ShapesDataset(100_000, "heldout", seed=cfg.world.eval_seed, config=world_config_of(cfg))
    prompts, i = [], 0
    while len(prompts) < cfg.world.eval_prompts:
        caption = data.__getitems__([i])[0]["caption"]
        if caption not in prompts:
            prompts.append(caption)
        i += 1
    return prompts


# ------------------------------------------------------------------------------------------------------------
# the evaluation grid


def row_label(row: dict) -> str:
    sampler, steps, guidance = row_key(row)
    name = "DDIM" if sampler == "ddim" else "consistency"
    return f"{name} {steps} steps, CFG {guidance:g}"


def seed_noise(gen, num_prompts: int, seed: int, draw: int = 0) -> tuple:
    """The initial latents and the generator of the consistency sampler's fresh noise for one eval seed: the same
    for every model and row, so differences come from the model and the sampler only. `draw` > 0 keeps the initial
    latents and gives another re-noising sequence (the evaluation uses draw 0)."""
    latents = torch.randn(gen.latent_shape(num_prompts), generator=torch.Generator().manual_seed(int(seed)))
    return latents, torch.Generator().manual_seed(int(seed) + 7919 + 104729 * int(draw))


def summarize(scores: dict) -> dict:
    """The numbers a reader compares: quality, semantic, total, and every dimension's mean."""
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "num_clips"}


def sample_row_latents(gen, forward: Callable, prompts: list, row: dict, seeds: list, on_step=None,
                       draw: int = 0) -> torch.Tensor:
    """Final latents ``(len(seeds) * len(prompts), C, F, h, w)`` of one grid row, seed-major (`draw`: `seed_noise`)."""
    from pisces_fast.training.sampling import sample_latents

    sampler, steps, guidance = row_key(row)
    out = []
    for seed in seeds:
        latents, noise = seed_noise(gen, len(prompts), seed, draw)
        out.append(sample_latents(gen, forward, prompts, steps, guidance, generator=noise, on_step=on_step,
                                  sampler=sampler, latents=latents))
    return torch.cat(out)


def sample_row(gen, forward: Callable, prompts: list, row: dict, seeds: list, on_step=None) -> torch.Tensor:
    """Videos ``(len(seeds) * len(prompts), T, 3, H, W)`` of one grid row, seed-major (decoded seed by seed)."""
    latents = sample_row_latents(gen, forward, prompts, row, seeds, on_step=on_step)
    videos = [gen.decode_latents(chunk) for chunk in latents.split(len(prompts))]
    return torch.cat(videos).float().clamp(0, 1).cpu()


def score_row(videos: torch.Tensor, prompts: list, seeds: list, diagnostics: bool = False) -> dict:
    """Analyzer scores per seed, their mean and their standard deviation across seeds; with `diagnostics`, also
    subject consistency's raw value and the analyzer's diagnostics (its factors), averaged over the seeds."""
    n = len(prompts)
    results = [analyze(videos[i * n:(i + 1) * n], prompts) for i in range(len(seeds))]
    per_seed = [summarize(r) for r in results]
    keys = [k for k in per_seed[0] if all(k in s for s in per_seed)]
    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in keys}
    std = {k: float(np.std([s[k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0 for k in keys}
    out = {"mean": mean, "std": std, "per_seed": per_seed}
    if diagnostics:
        found = [{"subject_consistency_raw": r["raw"]["subject_consistency"], **r["diagnostics"]} for r in results]
        values = {k: [f[k] for f in found if f[k] is not None] for k in found[0]}
        out["diagnostics"] = {k: float(np.mean(v)) if v else None for k, v in values.items()}
    return out


def _grid_steps(rows: list, seeds: list) -> int:
    return len(seeds) * sum(int(r["steps"]) for r in rows)


def evaluate_grid(gen, forward: Callable, prompts: list, rows: list, seeds: list, desc: str, progress: bool = True,
                  cache: Optional[dict] = None, cache_key: Optional[str] = None, keep: Optional[dict] = None,
                  on_row: Optional[Callable[[], None]] = None) -> dict:
    """Scores of every row ``{label: {"row", "mean", "std", "per_seed"}}``. ``cache`` (a dict, updated in place)
    holds rows already scored under ``cache_key``; ``keep`` (a dict) receives the videos of every row sampled;
    ``on_row`` is called after each row sampled (e.g. to save the cache, so an interrupted run keeps its rows)."""
    from tqdm.auto import tqdm

    out = {}
    todo = [r for r in rows if not (cache is not None and f"{cache_key}|{row_label(r)}" in cache)]
    bar = tqdm(total=_grid_steps(todo, seeds), desc=desc, disable=not progress)
    for row in rows:
        label = row_label(row)
        key = f"{cache_key}|{label}"
        if cache is not None and key in cache:
            out[label] = cache[key]
            continue
        videos = sample_row(gen, forward, prompts, row, seeds, on_step=lambda: bar.update(1))
        out[label] = {"row": dict(row), **score_row(videos, prompts, seeds)}
        if cache is not None:
            cache[key] = out[label]
        if keep is not None:
            keep[label] = videos
        if on_row is not None:
            on_row()
    bar.close()
    return out


def best_row(grid: dict, by: str = "total") -> str:
    return max(grid, key=lambda label: grid[label]["mean"][by])


def directory_digest(directory: str) -> str:
    """A digest of every file under ``directory`` (a model's weights and configs), for caches keyed by a model
    (the teacher grid here, the ablation's runs)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# the report


def _fmt(stats: dict, key: str) -> str:
    m, s = stats["mean"].get(key), stats["std"].get(key)
    if m is None:
        return "–"
    return f"{m:.3f} ± {s:.3f}" if s else f"{m:.3f}"


def _deltas(a: dict, b: dict) -> dict:
    """``a - b`` on the headline scores (both are grid rows)."""
    return {k: a["mean"][k] - b["mean"][k] for k in HEADLINE}


def _best_of(grid: dict, keep: Callable[[tuple], bool]) -> Optional[str]:
    labels = [label for label in grid if keep(row_key(grid[label]["row"]))]
    return best_row({label: grid[label] for label in labels}) if labels else None


def verdict(teacher: dict, student: dict, before_label: str, after_label: str) -> dict:
    """Where "after" stands against "before", and what the two grids of this run say about any gap. Each finding is
    ``{"row": the rows compared, "change": headline differences}`` and is present only where the grids hold its rows:

    * ``same_sampler``: student − teacher at the after row;
    * ``teacher_best_at_student_steps``: student − the teacher's best row at the after row's number of steps;
    * ``teacher_steps``: the teacher at the before row's sampler and guidance, from the after row's number of steps to
      the before row's (what the extra steps give it);
    * ``student_best_at_before_steps``: the student's best row at the before row's number of steps − before."""
    before, after = teacher[before_label], student[after_label]
    out = {"above": [k for k in HEADLINE if after["mean"][k] > before["mean"][k]],
           "not_above": [k for k in HEADLINE if after["mean"][k] <= before["mean"][k]]}
    b_sampler, b_steps, b_guidance = row_key(before["row"])
    a_steps = row_key(after["row"])[1]
    if after_label in teacher:
        out["same_sampler"] = {"row": after_label, "change": _deltas(after, teacher[after_label])}
    equal = _best_of(teacher, lambda key: key[1] == a_steps)
    if equal is not None:
        out["teacher_best_at_student_steps"] = {"row": equal, "change": _deltas(after, teacher[equal])}
    fewer = _best_of(teacher, lambda key: key == (b_sampler, a_steps, b_guidance))
    if fewer is not None and b_steps != a_steps:
        out["teacher_steps"] = {"row": f"{fewer} → {before_label}", "change": _deltas(before, teacher[fewer])}
    more = _best_of(student, lambda key: key[1] == b_steps)
    if more is not None and b_steps != a_steps:
        out["student_best_at_before_steps"] = {"row": more, "change": _deltas(student[more], before)}
    return out


VERDICT_TEXT = {  # finding -> how the report states it
    "same_sampler": "Same sampler and guidance ({row}), student − teacher",
    "teacher_best_at_student_steps": "Same number of steps, against the teacher's best row there ({row}), "
                                     "student − teacher",
    "teacher_steps": "The teacher from the student's number of steps to the before row's ({row})",
    "student_best_at_before_steps": "The student at the before row's number of steps ({row}), student − before",
}


def verdict_lines(v: dict) -> list:
    """The report's "Verdict" section, from :func:`verdict`."""
    if not v["not_above"]:
        return ["The student is **above** the teacher's best row on " + ", ".join(v["above"]) + "."]
    head = "The student is " + (f"**above** the teacher's best row on {', '.join(v['above'])} and " if v["above"] else "")
    lines = [head + f"**not above** it on {', '.join(v['not_above'])}. What this run's grids say about the gap:", ""]
    for name, text in VERDICT_TEXT.items():
        if name in v:
            changes = ", ".join(f"{k} {d:+.3f}" for k, d in v[name]["change"].items())
            lines.append("- " + text.format(row=v[name]["row"]) + f": {changes}.")
    lines += ["", "The README's \"What blocks the 4-step win\" measures what else was tried (step counts, schedulers, "
                  "CD length and weight, distribution matching, discriminators, the rewards' gradients)."]
    return lines


def write_report(out_dir: str, teacher: dict, student: dict, before_label: str, after_label: str, prompts: list,
                 meta: dict) -> dict:
    before, after = teacher[before_label]["mean"], student[after_label]["mean"]
    findings = verdict(teacher, student, before_label, after_label)
    report = {"before": before, "after": after, "before_row": before_label, "after_row": after_label,
              "verdict": findings, "teacher_grid": teacher, "student_grid": student, "prompts": prompts, **meta}
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    dims = [d for d in DIMENSIONS if d in before and d in after]
    seeds = meta["eval_seeds"]
    lines = [
        "# PISCES on the shapes world",
        "",
        f"Held-out prompts: {len(prompts)} × seeds {seeds} (each seed fixes the initial latents and the "
        f"consistency sampler's noise, shared by both models). Post-training: {meta['mode']} for {meta['steps']} steps "
        f"({meta['train_seconds']:.0f} s). Scores from the rule-based analyzer (1 = perfect); ± is the standard "
        f"deviation across seeds.",
        "",
        f"**before** = the teacher at its best sampler: {before_label}. **after** = the PISCES student: {after_label}.",
        "",
        "| score | before (teacher, best row) | after (student) | change |",
        "|---|---|---|---|",
    ]
    for k in list(HEADLINE) + dims:
        lines.append(f"| {k} | {_fmt(teacher[before_label], k)} | {_fmt(student[after_label], k)} | "
                     f"{after[k] - before[k]:+.3f} |")
    lines += ["", "## Verdict", ""] + verdict_lines(findings)
    lines += ["", "## The whole grid", "",
              "| sampler | teacher total | teacher quality | teacher semantic | student total | student quality | "
              "student semantic | Δ total | Δ quality | Δ semantic |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label in list(dict.fromkeys(list(teacher) + list(student))):
        t, s = teacher.get(label), student.get(label)
        cells = [label + (" (before)" if label == before_label else "") + (" (after)" if label == after_label else "")]
        cells += [_fmt(t, k) if t else "–" for k in HEADLINE] + [_fmt(s, k) if s else "–" for k in HEADLINE]
        cells += [f"{s['mean'][k] - t['mean'][k]:+.3f}" if (s and t) else "–" for k in HEADLINE]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per dimension, same sampler (the student's row)", ""]
    if after_label in teacher:
        t = teacher[after_label]
        lines += ["| dimension | teacher | student | change |", "|---|---|---|---|"]
        for k in list(HEADLINE) + dims:
            lines.append(f"| {k} | {_fmt(t, k)} | {_fmt(student[after_label], k)} | "
                         f"{student[after_label]['mean'][k] - t['mean'][k]:+.3f} |")
    else:
        lines.append(f"(the teacher grid has no row {after_label!r})")
    lines += ["", "Grid: `before_after.gif` (left: before, right: after; rows in the order below).", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    return report


# ------------------------------------------------------------------------------------------------------------
# the job


def teacher_grid(cfg: WorldTrainConfig, prompts: list, progress: bool, keep: dict) -> dict:
    """The shipped generator as shipped (no LoRA, no guidance input) over ``world.teacher_grid``, cached."""
    from pisces_fast.training.generators import generator_from_config

    w = cfg.world
    cache_path = os.path.join(cfg.output_dir, "teacher_grid.json")
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as fh:
            cache = json.load(fh)
    digest = directory_digest(cfg.resolve_path(cfg.model.path)) if cfg.model.path else f"tiny-{cfg.model.tiny}-{cfg.seed}"
    key = hashlib.sha256(json.dumps([digest, prompts, list(w.eval_seeds)]).encode()).hexdigest()[:16]
    torch.manual_seed(cfg.seed)  # a tiny model (tests) is built from the global RNG
    teacher = generator_from_config(cfg.model)
    teacher.denoiser.eval()
    with torch.no_grad():
        return evaluate_grid(teacher, teacher.denoiser, prompts, w.teacher_grid, w.eval_seeds, "teacher grid", progress,
                             cache, key, keep, on_row=lambda: atomic_write_text(cache_path, json.dumps(cache)))


def run_world_job(cfg: WorldTrainConfig) -> dict:
    from pisces_fast.training.trainer import Trainer
    from pisces_fast.training.video_io import save_video_grid

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

    w = cfg.world
    prompts = held_out_prompts(cfg)
    trainer = Trainer(cfg)
    rng_state = torch.random.get_rng_state()  # the teacher's grid must not shift the training's random stream
    progress = trainer.rank == 0
    after_label = row_label(w.student_row)
    teacher_videos: dict = {}
    teacher = {}
    if trainer.rank == 0:
        # Which teacher row is best is known only after scoring; keep every sampled row's videos for the GIF.
        teacher = teacher_grid(cfg, prompts, progress, teacher_videos)
        torch.random.set_rng_state(rng_state)
    trainer.backend.barrier()

    start = time.time()
    result = trainer.train()
    train_seconds = time.time() - start

    student_videos: dict = {}
    trainer.gen.denoiser.eval()
    with torch.no_grad():
        student = evaluate_grid(trainer.gen, trainer.backend.forward, prompts, w.student_grid, w.eval_seeds,
                                "student grid", progress, keep=student_videos)
    if trainer.rank == 0:
        before_label = best_row(teacher)
        meta = {"mode": cfg.mode, "steps": cfg.max_steps, "train_seconds": train_seconds,
                "eval_seeds": list(w.eval_seeds), "guidance_conditioning": bool(cfg.cd.guidance_conditioning)}
        write_report(cfg.output_dir, teacher, student, before_label, after_label, prompts, meta)
        before_v = teacher_videos.get(before_label)
        if before_v is None:  # the best row came from the cache: sample it again (same latents, same clips)
            from pisces_fast.training.generators import generator_from_config

            torch.manual_seed(cfg.seed)
            gen = generator_from_config(cfg.model)
            gen.denoiser.eval()
            before_v = sample_row(gen, gen.denoiser, prompts, teacher[before_label]["row"], w.eval_seeds)
        pairs = torch.stack([before_v, student_videos[after_label]], dim=1).flatten(0, 1)  # before_i, after_i, ...
        save_video_grid(pairs, os.path.join(cfg.output_dir, "before_after.gif"), fps=4, ncol=2)
        result.update({"before": teacher[before_label]["mean"], "after": student[after_label]["mean"],
                       "before_row": before_label, "after_row": after_label,
                       "report": os.path.join(cfg.output_dir, "report.json")})
    trainer.backend.barrier()
    return result
