"""PISCES ablations on the embedded shapes world: the paper's Table 3 rows, GRPO and DF-DPO, Tables 5 and 8.

Every post-training row is the main job (``pisces_fast.world.job``, what ``deepspeed train.py``
runs) with one change, repeated over ``--seeds``; each seed sets the training seed *and* the sampling
seeds of the evaluation, so the spread covers both. Every row is sampled the same way (``--sampler``, default:
the consistency sampler at 4 steps, CFG 3, the main job's "after" row; ``vanilla`` is the teacher under that same
sampler and noise). Scores are the rule-based analyzer's (``pisces_fast.eval.analyzer``) on the same held-out
prompts for every row; the table gives mean ± the 95% confidence half-width (Student t over seeds) and a paired
test of full vs. w/o OT (paired t-test and an exact sign-flip permutation test over seeds).

* ``vanilla``: the shipped generator, no post-training (the "before" column of the runs).
* ``CD only``: consistency distillation, no reward (not a paper row; it separates CD from the rewards).
* ``w/o OT``: CD + both rewards from the raw VLM (no OT map, vanilla cross-attention in the VTM head).
* ``quality only`` / ``semantic only``: CD + one OT-aligned reward.
* ``full``: CD + both OT-aligned rewards (the default main job).
* ``GRPO``: Eq. 6 with both OT-aligned rewards, group-relative fusion.
* ``DF-DPO``: discriminator-free DPO, real clips vs. distorted copies (no reward model).

Then Table 5 (alignment maps on world VLM embeddings of real train clips) and Table 8 (VTM accuracy of
the world VLM's matching head with vanilla, full-OT, partial-OT and spatio-temporal cross-attention, on
held-out clips against random and attribute-swapped captions).

    python benchmarks/world_ablation.py                      # the README table (3 seeds, ~2 h on 2 idle cores)
    python benchmarks/world_ablation.py --quick              # 2 seeds, short runs: a smoke test of the statistics
    python benchmarks/world_ablation.py --rows full "w/o OT" --seeds 0 1

Writes ``<out>/runs.csv`` (one line per row and seed), ``<out>/table.md`` (means ± std over seeds, and the
analysis tables) and ``<out>/ablation.png``; every run's own report stays in ``<out>/runs/<row>/seed<k>``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
sys.path.insert(0, HERE)

from learning_curves import MODES as LEARNING_CURVE_MODES  # noqa: E402
from pisces_fast.fileio import atomic_write_text  # noqa: E402
from pisces_fast.world.config import parse_grid_row  # noqa: E402

# Each row: overrides of the main job's configuration (pisces_fast.world.WORLD_DEFAULTS).
ROWS: Dict[str, Optional[dict]] = {
    "vanilla": None,
    # Not a paper row: consistency distillation alone separates what CD does to the generator from
    # what the rewards add.
    "CD only": {"reward": {"kind": "none"}},
    "w/o OT": {"reward": {"kwargs": {"use_ot_map": False, "use_pot": False}}},
    "quality only": {"reward": {"weights": {"quality": 1.0, "semantic": 0.0}}},
    "semantic only": {"reward": {"weights": {"quality": 0.0, "semantic": 1.0}}},
    "full": {},
    # GRPO and DF-DPO with the recipes benchmarks/learning_curves.py shows learning (grpo.sde_steps 2, lr 2e-3;
    # DPO beta 5000 + SFT), here with the OT-aligned rewards and group-relative fusion for GRPO.
    "GRPO": {**LEARNING_CURVE_MODES["grpo"], "reward": {"fusion": "group"}, "cd": {"guidance_conditioning": False}},
    "DF-DPO": {**LEARNING_CURVE_MODES["dpo"], "cd": {"guidance_conditioning": False}},
}
SCORES = ("total", "quality", "semantic")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def row_overrides(name: str, seed: int, args, out_dir: str) -> dict:
    """The main job's overrides for one run of row ``name`` (its recipe, seed, steps and evaluation)."""
    from pisces_fast.training.config import _merge

    row = parse_grid_row(args.sampler)
    overrides = {
        "output_dir": out_dir, "seed": seed, "max_steps": args.max_steps, "checkpoint_every": 0,
        "export_lora": False,
        "world": {"eval_prompts": args.eval_prompts, "eval_seeds": [2 * seed, 2 * seed + 1],
                  "teacher_grid": [row], "student_grid": [row], "student_row": row},
    }
    if args.vlm:
        overrides["world"]["vlm"] = args.vlm
    overrides = _merge(overrides, ROWS[name] or {})
    if name == "GRPO" and args.grpo_steps:
        overrides["max_steps"] = args.grpo_steps
    return overrides


def row_config(name: str, seed: int, args, out_dir: str):
    from pisces_fast.training.config import load_config
    from pisces_fast.world import WORLD_DEFAULTS, WorldTrainConfig

    return load_config(None, row_overrides(name, seed, args, out_dir), WORLD_DEFAULTS, WorldTrainConfig)


def cached_report(out_dir: str, overrides: dict) -> Optional[dict]:
    """An earlier run's report in ``out_dir`` if it was made with exactly these overrides (recorded next to it in
    ``row_overrides.json``); None otherwise, e.g. after a row's recipe changed (GRPO's sampling steps did once)."""
    report, recorded = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "row_overrides.json")
    if not (os.path.isfile(report) and os.path.isfile(recorded)):
        return None
    with open(recorded) as fh:
        if json.load(fh) != json.loads(json.dumps(overrides)):
            return None
    with open(report) as fh:
        return json.load(fh)


def cache_key(args) -> dict:
    """What every result cached under ``--out`` depends on: the models (every file of the VLM and the generator)
    and the arguments that shape a run or the analyses (not which rows or seeds are asked for)."""
    from pisces_fast.world.assets import world_generator_path, world_vlm_path
    from pisces_fast.world.job import directory_digest

    return {
        "vlm": directory_digest(str(world_vlm_path(args.vlm))),
        "generator": directory_digest(str(world_generator_path())),
        **{k: getattr(args, k) for k in ("max_steps", "grpo_steps", "eval_prompts", "sampler", "table5_clips",
                                         "table5_steps", "table8_clips")},
    }


def drop_stale_caches(out: str, key: dict) -> bool:
    """Delete the cached runs, OT maps and analyses under ``out`` unless they were made under ``key`` (recorded in
    ``cache_key.json``); then record ``key``. Returns whether anything was dropped. A changed VLM or argument must
    never reuse results made without it."""
    path = os.path.join(out, "cache_key.json")
    old = None
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
    dropped = False
    if old != key:
        stale = [os.path.join(out, n) for n in os.listdir(out) if n == "runs" or n.startswith("ot_map_seed")
                 or n == "analyses.txt"]
        for item in stale:
            if os.path.isdir(item):
                shutil.rmtree(item)
            else:
                os.remove(item)
        dropped = bool(stale)
        atomic_write_text(path, json.dumps(key, indent=1))
    return dropped


def run_row(name: str, seed: int, args) -> dict:
    from pisces_fast.world.job import fit_world_ot_map, run_world_job

    out_dir = os.path.join(args.out, "runs", slug(name), f"seed{seed}")
    report = os.path.join(out_dir, "report.json")
    overrides = row_overrides(name, seed, args, out_dir)
    if args.overwrite or cached_report(out_dir, overrides) is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = row_config(name, seed, args, out_dir)
        # One OT-map fit per seed, shared by its rows (it depends on the seed only).
        shared = os.path.join(args.out, f"ot_map_seed{seed}")
        if not os.path.isfile(os.path.join(shared, "config.json")):
            fit_world_ot_map(cfg, shared)
        shutil.copytree(shared, os.path.join(out_dir, "ot_map"))
        start = time.time()
        run_world_job(cfg)
        with open(report) as fh:
            data = json.load(fh)
        data["wall_seconds"] = time.time() - start
        with open(report, "w") as fh:
            json.dump(data, fh, indent=1)
        atomic_write_text(os.path.join(out_dir, "row_overrides.json"), json.dumps(overrides, indent=1))
    return cached_report(out_dir, overrides)


def mean_ci(values: List[float], level: float = 0.95) -> tuple:
    """(mean, half-width of the Student-t confidence interval over seeds); half-width NaN with one seed."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    m = float(values.mean())
    if len(values) < 2:
        return m, float("nan")
    sem = float(values.std(ddof=1)) / math.sqrt(len(values))
    return m, float(student_t.ppf(0.5 + level / 2, len(values) - 1)) * sem


def mean_std(values: List[float]) -> str:
    m, h = mean_ci(values)
    return f"{m:.3f}" if h != h else f"{m:.3f} ± {h:.3f}"


def paired_test(a: List[float], b: List[float]) -> dict:
    """a vs b paired over seeds: mean difference, paired t-test p (two-sided) and the exact sign-flip permutation p."""
    import itertools

    from scipy.stats import ttest_rel

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out = {"n": len(d), "mean_diff": float(d.mean()), "t_p": float("nan"), "perm_p": float("nan")}
    if len(d) >= 2:
        out["t_p"] = float(ttest_rel(a, b).pvalue) if np.ptp(d) > 0 else (0.0 if d.mean() != 0 else 1.0)
        observed = abs(d.mean())
        flips = [abs((d * np.array(signs)).mean()) for signs in itertools.product((1, -1), repeat=len(d))]
        out["perm_p"] = float(np.mean([f >= observed - 1e-12 for f in flips]))
    return out


def paired_table(results: Dict[str, Dict[int, dict]], a: str, b: str) -> str:
    if a not in results or b not in results:
        return ""
    seeds = sorted(set(results[a]) & set(results[b]))
    lines = [f"Paired over seeds {seeds}: {a} − {b}", "", "| score | mean diff | paired t p | sign-flip p |",
             "|---|---|---|---|"]
    for k in SCORES:
        t = paired_test([results[a][s]["after"][k] for s in seeds], [results[b][s]["after"][k] for s in seeds])
        lines.append(f"| {k} | {t['mean_diff']:+.4f} | {t['t_p']:.3f} | {t['perm_p']:.3f} |")
    return "\n".join(lines)


def post_training_table(results: Dict[str, Dict[int, dict]], dims: List[str]) -> str:
    head = ["Method", *[s.capitalize() for s in SCORES], *dims, "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_seed in results.items():
        reports = list(by_seed.values())
        side = "before" if name == "vanilla" else "after"
        cells = [mean_std([r[side][k] for r in reports]) for k in (*SCORES, *dims)]
        secs = "-" if name == "vanilla" else f"{sum(r['train_seconds'] for r in reports) / len(reports):.0f}"
        lines.append("| " + " | ".join([name, *cells, secs]) + " |")
    return "\n".join(lines)


def plot(results: Dict[str, Dict[int, dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.2), sharey=False)
    for ax, key in zip(axes, SCORES):
        for i, name in enumerate(names):
            side = "before" if name == "vanilla" else "after"
            vals = [r[side][key] for r in results[name].values()]
            ax.scatter([i] * len(vals), vals, s=14, alpha=0.7)
            ax.errorbar([i], [sum(vals) / len(vals)], fmt="_", ms=18, color="k")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyses(args) -> str:
    """Tables 5 and 8 on the world VLM."""
    from alignment_table import table5, table8

    from pisces_fast.data import shapes as S
    from pisces_fast.rewards import collect_embeddings
    from pisces_fast.world import load_world_vlm

    backbone = load_world_vlm(args.vlm)
    train = S.make_clips(args.table5_clips, split="train", seed=77)
    batches = ((train.videos[i:i + 64], train.captions[i:i + 64]) for i in range(0, len(train.captions), 64))
    with torch.no_grad():
        text, video = collect_embeddings(backbone, batches)
    t5 = table5(text, video, steps=args.table5_steps, ot_steps=args.table5_steps, hidden=128, k=10, seed=0,
                progress=not args.no_progress)

    held = S.make_clips(args.table8_clips, split="heldout", seed=78)
    rng = np.random.default_rng(0)
    swapped = []
    for spec in held.specs:
        options = S.hard_negatives(spec, rng, forbidden_pairs=())
        swapped.append(options[int(rng.integers(len(options)))].caption)
    t8_random = table8(backbone, held.videos, held.captions, progress=not args.no_progress,
                       title=f"Table 8-style VTM accuracy, {len(held.captions)} held-out clips vs another clip's caption")
    t8_swap = table8(backbone, held.videos, held.captions, negatives=swapped, progress=not args.no_progress,
                     title=f"Table 8-style VTM accuracy, {len(held.captions)} held-out clips vs an attribute-swapped caption")
    return "\n\n".join([t5, t8_random, t8_swap])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/world_ablation")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--sampler", default="consistency:4:3", help="SAMPLER:STEPS:GUIDANCE every row is evaluated with")
    p.add_argument("--max_steps", type=int, default=120, help="post-training steps per run (the main job's default)")
    p.add_argument("--grpo_steps", type=int, default=12, help="GRPO steps (each samples 2 prompt groups of 8 trajectories)")
    p.add_argument("--eval_prompts", type=int, default=8)
    p.add_argument("--vlm", default=None, help="world VLM directory (default: the shipped one)")
    p.add_argument("--table5_clips", type=int, default=2048)
    p.add_argument("--table5_steps", type=int, default=500)
    p.add_argument("--table8_clips", type=int, default=512)
    p.add_argument("--skip_analyses", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 seeds, 4 steps, 2 prompts, small analyses")
    p.add_argument("--overwrite", action="store_true", help="rerun rows whose report already exists, and the analyses")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    try:
        parse_grid_row(args.sampler)
    except ValueError as err:
        p.error(str(err))
    if args.quick:
        args.seeds, args.max_steps, args.grpo_steps, args.eval_prompts = args.seeds[:2], 4, 2, 2
        args.table5_clips, args.table5_steps, args.table8_clips = 256, 50, 64
    os.makedirs(args.out, exist_ok=True)
    if drop_stale_caches(args.out, cache_key(args)):
        print(f"{args.out}: cached results were made with other models or arguments; recomputing them", flush=True)

    results: Dict[str, Dict[int, dict]] = {}
    started = time.time()
    for name in args.rows:
        run_name = "full" if name == "vanilla" else name  # vanilla = the "before" column of the full runs
        for seed in args.seeds:
            print(f"[{time.time() - started:7.0f} s] {name} seed {seed}", flush=True)
            results.setdefault(name, {})[seed] = run_row(run_name, seed, args)

    first = next(iter(next(iter(results.values())).values()))
    dims = sorted(k for k in first["before"] if k not in SCORES)
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "seed", "steps", "train_seconds", *SCORES, *dims])
        for name, by_seed in results.items():
            for seed, r in by_seed.items():
                side = "before" if name == "vanilla" else "after"
                steps = 0 if name == "vanilla" else r["steps"]
                writer.writerow([name, seed, steps, f"{r['train_seconds'] if steps else 0:.1f}",
                                 *[f"{r[side][k]:.4f}" for k in (*SCORES, *dims)]])
    table = post_training_table(results, dims)
    plot(results, os.path.join(args.out, "ablation.png"))
    parts = [
        "# PISCES ablations on the shapes world",
        "",
        f"`python benchmarks/world_ablation.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Seeds {args.seeds} (training seed s, evaluation sampling seeds 2s and 2s+1); {args.eval_prompts} held-out prompts; "
        f"{args.max_steps} post-training steps (GRPO: {args.grpo_steps}); every row sampled with {args.sampler} "
        f"(sampler:steps:CFG); analyzer scores, mean ± 95% CI half-width (Student t over seeds).",
        "",
        table,
        "",
        paired_table(results, "full", "w/o OT"),
    ]
    if not args.skip_analyses:
        # Cached like the runs: the analyses depend on the VLM and their own arguments only.
        cache = os.path.join(args.out, "analyses.txt")
        if args.overwrite or not os.path.isfile(cache):
            text = analyses(args)
            with open(cache, "w") as fh:
                fh.write(text)
        with open(cache) as fh:
            parts += ["", "```", fh.read(), "```"]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"done in {time.time() - started:.0f} s; wrote {args.out}/table.md, runs.csv, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
