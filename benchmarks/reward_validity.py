"""Reward validity on the embedded shapes world: do the PISCES rewards rank clips the way the ground truth does?

Whether an OT-aligned reward is a *better reward* is measurable without any training noise. For each held-out
prompt a fixed pool of clips is scored by every reward variant (with the prompt) and by the world's rule-based
analyzer (``pisces_fast.eval.analyzer``, the ground truth: Quality, Semantic, Total and every dimension):

* the real clip (rendered from the prompt);
* clips of the shipped (vanilla) generator (DDIM 20 steps, CFG 3; with ``--generated 2`` also the consistency
  sampler at 8 steps, CFG 3);
* semantic corruptions, rendered with the real clip's layout seed from an attribute-swapped spec (the prompt is
  still the caption): wrong colour / shape / count / size / direction / relation (the kinds the prompt allows);
* quality corruptions of the real clip (``pisces_fast.training.distortions``): blur (sigma 1), pixel noise
  (std 0.05), brightness flicker (15 %), frame shuffle.

Per variant and target: Spearman and Kendall rank correlation within each prompt's pool, averaged over prompts,
and the pairwise accuracy (pairs whose target differs; reward ties count 1/2), with 95 % bootstrap confidence
intervals over prompts. Variants: the quality reward as plain cosine vs OT-mapped (a map fitted here, Algorithm 2);
the semantic reward (VTM) with vanilla cross-attention vs POT-fused at m in {0.5, 0.7, 0.9, 1.0} (gamma = eta =
0.2) and with the attention-only cost (gamma = eta = 0, m = 0.9); and the fused reward (OT quality + POT m = 0.9).
(A "uniform cost" variant is not measured: the library's POT cost has no switch for it.)

    python benchmarks/reward_validity.py                       # the README table (24 prompts)
    python benchmarks/reward_validity.py --quick               # CI: 6 prompts, a small OT map
    python benchmarks/reward_validity.py --vlm DIR             # another world VLM

Writes ``<out>/reward_validity.json`` (every number) and ``<out>/reward_validity.md`` (the tables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

SEMANTIC_KINDS = ("color", "shape", "count", "size", "direction", "relation")
QUALITY_CORRUPTIONS = ("blur", "noise", "flicker", "shuffle")
TARGETS = ("quality", "semantic", "total")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts (one pool each)")
    p.add_argument("--generated", type=int, default=2, choices=(0, 1, 2), help="generated clips per prompt")
    p.add_argument("--vlm", default=None, help="world VLM directory (default: the shipped one)")
    p.add_argument("--generator", default=None, help="world generator directory (default: the shipped one)")
    p.add_argument("--ot_map", default=None, help="a fitted OT map directory (default: fit one here)")
    p.add_argument("--ot_map_clips", type=int, default=1024)
    p.add_argument("--ot_map_steps", type=int, default=300)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="6 prompts, 1 generated clip, a 256-clip/60-step OT map")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.generated, args.ot_map_clips, args.ot_map_steps, args.bootstrap = 6, 1, 256, 60, 300
    if args.prompts < 2:
        p.error("--prompts must be >= 2")
    return args


# ------------------------------------------------------------------------------------------------------------
# statistics


def rank_correlations(reward: np.ndarray, target: np.ndarray) -> tuple:
    """(Spearman, Kendall tau-b) of one pool; NaN when either side is constant."""
    from scipy.stats import kendalltau, spearmanr

    if np.ptp(reward) == 0 or np.ptp(target) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(reward, target).statistic), float(kendalltau(reward, target).statistic)


def pairwise_accuracy(reward: np.ndarray, target: np.ndarray, tol: float = 1e-9) -> tuple:
    """(accuracy, pairs): over pairs whose target differs, how often the reward orders them the same way (reward
    ties count 1/2). NaN with no such pair."""
    dt = target[:, None] - target[None, :]
    dr = reward[:, None] - reward[None, :]
    upper = np.triu(np.ones_like(dt, dtype=bool), 1) & (np.abs(dt) > tol)
    n = int(upper.sum())
    if n == 0:
        return float("nan"), 0
    agree = np.where(dr[upper] == 0, 0.5, (np.sign(dr[upper]) == np.sign(dt[upper])).astype(float))
    return float(agree.mean()), n


def bootstrap_ci(values: np.ndarray, n: int, seed: int, level: float = 0.95) -> tuple:
    """Percentile bootstrap CI of the mean over prompts (NaN prompts dropped)."""
    values = np.asarray([v for v in values if v == v], dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(values.mean()), float(lo), float(hi)


def validity_table(rewards: Dict[str, List[np.ndarray]], targets: Dict[str, List[np.ndarray]], n_boot: int,
                   seed: int) -> dict:
    """{variant: {target: {spearman, kendall, pairwise: (mean, lo, hi), prompts, pairs}}} over per-prompt pools."""
    out: dict = {}
    for name, per_prompt in rewards.items():
        out[name] = {}
        for tname, tvals in targets.items():
            rho, tau, acc, pairs = [], [], [], 0
            for r, t in zip(per_prompt, tvals):
                keep = ~np.isnan(t)
                if keep.sum() < 2:
                    rho.append(np.nan), tau.append(np.nan), acc.append(np.nan)
                    continue
                s, k = rank_correlations(r[keep], t[keep])
                a, n = pairwise_accuracy(r[keep], t[keep])
                rho.append(s), tau.append(k), acc.append(a)
                pairs += n
            out[name][tname] = {
                "spearman": bootstrap_ci(np.array(rho), n_boot, seed),
                "kendall": bootstrap_ci(np.array(tau), n_boot, seed + 1),
                "pairwise": bootstrap_ci(np.array(acc), n_boot, seed + 2),
                "prompts": int(np.sum(~np.isnan(np.array(acc)))),
                "pairs": pairs,
            }
    return out


# ------------------------------------------------------------------------------------------------------------
# pools


def heldout_prompts(n: int, seed: int) -> list:
    from pisces_fast.data import shapes as S

    data = S.ShapesDataset(100_000, "heldout", seed=seed)
    prompts, i = [], 0
    while len(prompts) < n:
        caption = data.__getitems__([i])[0]["caption"]
        if caption not in prompts:
            prompts.append(caption)
        i += 1
    return prompts


def build_pools(prompts: list, generated: dict, seed: int) -> list:
    """Per prompt: {"prompt", "labels": [...], "videos": (n, T, 3, H, W)}."""
    from pisces_fast.data import shapes as S
    from pisces_fast.training import distortions as D

    pools = []
    rng = np.random.default_rng([seed, 55])
    for k, prompt in enumerate(prompts):
        spec = S.parse_prompt(prompt)
        real = S.make_clips(specs=[spec], split="heldout", seed=seed, indices=[k]).videos
        labels, videos = ["real"], [real]
        for name, vids in generated.items():
            labels.append(name)
            videos.append(vids[k:k + 1])
        negatives = {n.kind: n.spec for n in S.hard_negatives(spec, rng, kinds=SEMANTIC_KINDS, forbidden_pairs=())}
        for kind in SEMANTIC_KINDS:
            if kind in negatives:
                labels.append(f"wrong {kind}")
                videos.append(S.make_clips(specs=[negatives[kind]], split="heldout", seed=seed, indices=[k]).videos)
        corrupt = {"blur": D.gaussian_blur(real, 1.0), "noise": D.add_noise(real, 0.05, seed=seed + k),
                   "flicker": D.brightness_flicker(real, 0.15, seed=seed + k),
                   "shuffle": D.shuffle_frames(real, seed=seed + k)}
        for name in QUALITY_CORRUPTIONS:
            labels.append(name)
            videos.append(corrupt[name])
        pools.append({"prompt": prompt, "labels": labels, "videos": torch.cat(videos).float().clamp(0, 1)})
    return pools


def generate(prompts: list, generator_dir: Optional[str], count: int, seed: int) -> dict:
    from pisces_fast.world import load_world_generator

    if count == 0:
        return {}
    gen = load_world_generator(generator_dir)
    rows = [("generated (DDIM 20, CFG 3)", "ddim", 20), ("generated (consistency 8, CFG 3)", "consistency", 8)][:count]
    out = {}
    with torch.no_grad():
        for i, (name, sampler, steps) in enumerate(rows):
            g = torch.Generator().manual_seed(seed + 100 + i)
            out[name] = gen.sample(gen.denoiser, prompts, steps, 3.0, generator=g, sampler=sampler).float().cpu()
    return out


def fit_map(backbone, clips: int, steps: int, seed: int):
    from pisces_fast.data.shapes import ShapesDataset
    from pisces_fast.rewards import collect_embeddings, fit_ot_map

    data = ShapesDataset(clips, "train", seed=seed + 17)
    batches = ((torch.stack([it["video"] for it in items]), [it["caption"] for it in items])
               for items in (data.__getitems__(list(range(i, min(i + 64, clips)))) for i in range(0, clips, 64)))
    with torch.no_grad():
        text, video = collect_embeddings(backbone, batches)
    return fit_ot_map(text, video, steps=steps, batch_size=128, inner_steps=5, lr=1e-3, hidden=128, seed=seed)


def reward_variants(backbone, ot_map) -> dict:
    """name -> (PiscesRewards, which output). Quality variants read "quality", semantic ones "semantic"."""
    from pisces_fast.rewards import PiscesRewards, POTConfig

    def sem(pot):
        return PiscesRewards(backbone, None, use_ot_map=False, use_pot=pot is not None,
                             pot=pot or POTConfig(), weights={"quality": 0.0, "semantic": 1.0})

    variants = {
        "quality: plain cosine": (PiscesRewards(backbone, None, use_ot_map=False, weights={"quality": 1.0, "semantic": 0.0}),
                                  "quality"),
        "quality: OT-mapped": (PiscesRewards(backbone, ot_map, weights={"quality": 1.0, "semantic": 0.0}), "quality"),
        "semantic: vanilla VTM": (sem(None), "semantic"),
    }
    for m in (0.5, 0.7, 0.9, 1.0):
        variants[f"semantic: POT m={m}"] = (sem(POTConfig(mass=m)), "semantic")
    variants["semantic: POT m=0.9, attention-only cost (γ=η=0)"] = (sem(POTConfig(mass=0.9, gamma=0.0, eta=0.0)),
                                                                     "semantic")
    variants["fused: OT quality + POT m=0.9"] = (PiscesRewards(backbone, ot_map), "fused")
    return variants


@torch.no_grad()
def score_rewards(variants: dict, pools: list) -> Dict[str, List[np.ndarray]]:
    from tqdm.auto import tqdm

    out: Dict[str, List[np.ndarray]] = {name: [] for name in variants}
    for pool in tqdm(pools, desc="rewards"):
        prompts = [pool["prompt"]] * len(pool["labels"])
        for name, (module, key) in variants.items():
            r = module(pool["videos"], prompts)
            value = module.fuse(r) if key == "fused" else r[key]
            out[name].append(value.float().cpu().numpy().astype(np.float64))
    return out


def analyzer_targets(pools: list) -> Dict[str, List[np.ndarray]]:
    from pisces_fast.eval.analyzer import DIMENSIONS, analyze

    targets: Dict[str, List[np.ndarray]] = {k: [] for k in TARGETS + DIMENSIONS}
    for pool in pools:
        per_clip = analyze(pool["videos"], [pool["prompt"]] * len(pool["labels"]))["per_clip"]
        pool["analyzer"] = per_clip
        for k in targets:
            targets[k].append(np.array([np.nan if c.get(k) is None else c[k] for c in per_clip], dtype=np.float64))
    return targets


# ------------------------------------------------------------------------------------------------------------
# report


def _cell(stat) -> str:
    m, lo, hi = stat
    if m != m:
        return "–"
    return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _acc(stat) -> str:
    m, lo, hi = stat
    return "–" if m != m else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def semantics_fixed(pools: list, target: List[np.ndarray]) -> List[np.ndarray]:
    """``target`` with the clips of a wrong scene (the "wrong <kind>" renders) masked out (NaN): the sub-pool of clips
    that all show the prompt's scene -- real, generated, degraded -- where Quality is the only thing that varies by
    design. The quality reward is a cosine *with the prompt*, so on the whole pool a wrong-colour clip (clean, Quality
    1.0) scores low for its semantics; this sub-pool asks whether it also ranks the same scene by Quality."""
    return [np.where([label.startswith("wrong ") for label in pool["labels"]], np.nan, t) for pool, t in zip(pools, target)]


def markdown(table: dict, dims_table: dict, meta: dict, same_scene: dict) -> str:
    lines = [
        f"Pools: {meta['prompts']} held-out prompts × {meta['pool_size']} clips (up to: {', '.join(meta['pool_labels'])}); "
        f"VLM `{meta['vlm']}`; OT map {meta['ot_map']}. Mean over prompts [95% bootstrap CI].",
        "",
        "| reward variant | target | Spearman | Kendall | pairwise acc. |",
        "|---|---|---|---|---|",
    ]
    for name, per_target in table.items():
        own = "quality" if name.startswith("quality") else "semantic" if name.startswith("semantic") else "total"
        for tname in (own, "total") if own != "total" else ("total",):
            st = per_target[tname]
            lines.append(f"| {name} | {tname} | {_cell(st['spearman'])} | {_cell(st['kendall'])} | "
                         f"{_acc(st['pairwise'])} |")
    dims = list(next(iter(dims_table.values())).keys())
    lines += ["", "Pairwise accuracy against each analyzer dimension (pairs whose dimension differs):", "",
              "| reward variant | " + " | ".join(dims) + " |", "|---" * (len(dims) + 1) + "|"]
    for name, per_dim in dims_table.items():
        lines.append(f"| {name} | " + " | ".join(
            "–" if per_dim[d]["pairwise"][0] != per_dim[d]["pairwise"][0] else f"{per_dim[d]['pairwise'][0]:.2f}"
            for d in dims) + " |")
    lines += ["", "The quality rewards on the clips that show the prompt's scene (real, generated, degraded; no \"wrong\" "
              "renders), against Quality:", "", "| reward variant | Spearman | Kendall | pairwise acc. |", "|---|---|---|---|"]
    lines += [f"| {name} | {_cell(st['quality']['spearman'])} | {_cell(st['quality']['kendall'])} | "
              f"{_acc(st['quality']['pairwise'])} |" for name, st in same_scene.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from pisces_fast.eval.analyzer import DIMENSIONS
    from pisces_fast.rewards import OTMap
    from pisces_fast.world import load_world_vlm, world_vlm_path

    t0 = time.time()
    backbone = load_world_vlm(args.vlm)
    prompts = heldout_prompts(args.prompts, args.seed)
    generated = generate(prompts, args.generator, args.generated, args.seed)
    pools = build_pools(prompts, generated, args.seed)
    if args.ot_map:
        ot_map, ot_desc = OTMap.load(args.ot_map), f"`{args.ot_map}`"
    else:
        ot_map = fit_map(backbone, args.ot_map_clips, args.ot_map_steps, args.seed)
        ot_desc = f"fitted here ({args.ot_map_clips} train clips, {args.ot_map_steps} steps)"
    targets = analyzer_targets(pools)
    rewards = score_rewards(reward_variants(backbone, ot_map), pools)
    table = validity_table(rewards, {k: targets[k] for k in TARGETS}, args.bootstrap, args.seed)
    dims_table = validity_table(rewards, {k: targets[k] for k in DIMENSIONS}, args.bootstrap, args.seed)
    quality_rewards = {k: v for k, v in rewards.items() if k.startswith("quality")}
    same_scene = validity_table(quality_rewards, {"quality": semantics_fixed(pools, targets["quality"])}, args.bootstrap,
                                args.seed)
    labels = list(dict.fromkeys(label for pool in pools for label in pool["labels"]))
    sizes = [len(pool["labels"]) for pool in pools]
    meta = {"prompts": len(prompts), "pool_size": f"{min(sizes)}–{max(sizes)}", "pool_labels": labels,
            "vlm": str(world_vlm_path(args.vlm)) if args.vlm else "shipped", "ot_map": ot_desc,
            "seconds": round(time.time() - t0, 1), "command": " ".join(["benchmarks/reward_validity.py"] + sys.argv[1:])}
    # What the ground truth says about each kind of clip (a sanity check of the pools themselves).
    by_label: Dict[str, Dict[str, list]] = {}
    for pool in pools:
        for label, clip in zip(pool["labels"], pool["analyzer"]):
            for k in TARGETS:
                by_label.setdefault(label, {}).setdefault(k, []).append(clip[k])
    pool_means = {label: {k: float(np.mean(v)) for k, v in d.items()} for label, d in by_label.items()}
    os.makedirs(args.out, exist_ok=True)
    result = {"meta": meta, "table": table, "dimensions": dims_table, "quality_same_scene": same_scene,
              "pool_means": pool_means, "prompts": prompts}
    with open(os.path.join(args.out, "reward_validity.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    md = markdown(table, dims_table, meta, same_scene)
    md += "\nAnalyzer scores of each kind of clip (mean over prompts):\n\n| clip | total | quality | semantic |\n|---|---|---|---|\n"
    md += "".join(f"| {label} | {v['total']:.3f} | {v['quality']:.3f} | {v['semantic']:.3f} |\n"
                  for label, v in pool_means.items())
    with open(os.path.join(args.out, "reward_validity.md"), "w") as fh:
        fh.write(md)
    print(md)
    print(f"({meta['seconds']:.0f} s; wrote {args.out}/reward_validity.json and .md)")
    return result


if __name__ == "__main__":
    main()
