"""The statistics of the world's benchmarks (reward validity, ablation CIs and paired tests) against independent
computations: scipy, brute force over pairs, and closed forms."""
import argparse
import itertools
import json
import math
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import reward_validity as rv  # noqa: E402
import world_ablation as wa  # noqa: E402


def test_rank_correlations_match_scipy_and_skip_constant_pools():
    rng = np.random.default_rng(0)
    r, t = rng.normal(size=12), rng.normal(size=12)
    s, k = rv.rank_correlations(r, t)
    assert s == pytest.approx(stats.spearmanr(r, t).statistic)
    assert k == pytest.approx(stats.kendalltau(r, t).statistic)
    assert all(math.isnan(v) for v in rv.rank_correlations(r, np.ones(12)))


def test_pairwise_accuracy_by_brute_force():
    reward = np.array([0.1, 0.5, 0.5, 0.9, 0.3])
    target = np.array([0.0, 1.0, 0.2, 1.0, 0.5])
    agree, pairs = 0.0, 0
    for i, j in itertools.combinations(range(5), 2):
        if target[i] == target[j]:
            continue  # a tie in the target says nothing about the order
        pairs += 1
        if reward[i] == reward[j]:
            agree += 0.5
        elif (reward[i] - reward[j]) * (target[i] - target[j]) > 0:
            agree += 1
    acc, n = rv.pairwise_accuracy(reward, target)
    assert n == pairs == 9 and acc == pytest.approx(agree / pairs)
    assert rv.pairwise_accuracy(reward, reward)[0] == 1.0 and rv.pairwise_accuracy(reward, -reward)[0] == 0.0
    assert math.isnan(rv.pairwise_accuracy(reward, np.zeros(5))[0])


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(1)
    small = rng.normal(0.3, 0.2, size=8)
    large = rng.normal(0.3, 0.2, size=200)
    m, lo, hi = rv.bootstrap_ci(np.append(small, np.nan), 2000, seed=0)
    assert m == pytest.approx(small.mean()) and lo < m < hi  # NaN prompts are dropped
    _, lo2, hi2 = rv.bootstrap_ci(large, 2000, seed=0)
    assert hi2 - lo2 < hi - lo
    # the percentile interval of the mean is close to the normal one for many prompts
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * large.std(ddof=1) / math.sqrt(len(large)), rel=0.15)


def test_validity_table_on_a_reward_that_is_the_target():
    rng = np.random.default_rng(2)
    targets = {"quality": [rng.random(6) for _ in range(5)]}
    rewards = {"perfect": [t * 2 + 1 for t in targets["quality"]], "reversed": [-t for t in targets["quality"]]}
    table = rv.validity_table(rewards, targets, n_boot=200, seed=0)
    assert table["perfect"]["quality"]["spearman"][0] == pytest.approx(1.0)
    assert table["perfect"]["quality"]["pairwise"][:3] == pytest.approx((1.0, 1.0, 1.0))
    assert table["reversed"]["quality"]["kendall"][0] == pytest.approx(-1.0)
    assert table["perfect"]["quality"]["prompts"] == 5 and table["perfect"]["quality"]["pairs"] == 5 * 15


def test_ablation_mean_ci_is_the_student_t_interval():
    values = [0.31, 0.35, 0.29]
    m, h = wa.mean_ci(values)
    lo, hi = stats.t.interval(0.95, df=2, loc=np.mean(values), scale=stats.sem(values))
    assert m == pytest.approx(np.mean(values)) and h == pytest.approx((hi - lo) / 2)
    assert math.isnan(wa.mean_ci([0.3])[1]) and wa.mean_std([0.3]) == "0.300"


def test_ablation_paired_test_matches_scipy_and_enumerates_sign_flips():
    a, b = [0.40, 0.42, 0.38, 0.45], [0.35, 0.41, 0.36, 0.40]
    out = wa.paired_test(a, b)
    assert out["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert out["t_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    # every difference is positive: only the all-plus and all-minus sign patterns are as extreme (2 of 16)
    assert out["perm_p"] == pytest.approx(2 / 16)
    assert wa.paired_test([0.1, 0.2], [0.1, 0.2])["perm_p"] == 1.0


def test_ablation_caches_are_dropped_when_the_models_or_arguments_change(tmp_path):
    """Cached runs, OT maps and analyses are reused only under the key they were made with (a new VLM once reused
    the previous one's analyses silently)."""
    def populate():
        (tmp_path / "runs" / "full" / "seed0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ot_map_seed0").mkdir(exist_ok=True)
        (tmp_path / "analyses.txt").write_text("tables")
        (tmp_path / "table.md").write_text("kept")

    populate()
    key = {"vlm": "aaaa", "max_steps": 60}
    assert wa.drop_stale_caches(str(tmp_path), key)  # made without a key: not trusted
    assert not (tmp_path / "runs").exists() and not (tmp_path / "analyses.txt").exists()
    populate()
    assert not wa.drop_stale_caches(str(tmp_path), dict(key))  # same key: reused
    assert (tmp_path / "runs" / "full" / "seed0").is_dir() and (tmp_path / "analyses.txt").read_text() == "tables"
    assert wa.drop_stale_caches(str(tmp_path), {**key, "vlm": "bbbb"})  # another VLM: recomputed
    assert not (tmp_path / "ot_map_seed0").exists() and (tmp_path / "table.md").read_text() == "kept"
    assert json.loads((tmp_path / "cache_key.json").read_text())["vlm"] == "bbbb"


def test_ablation_cache_key_names_the_models_and_run_arguments():
    args = argparse.Namespace(vlm=None, max_steps=60, grpo_steps=12, eval_prompts=8, sampler="consistency:4:3",
                              table5_clips=2048, table5_steps=300, table8_clips=512)
    key = wa.cache_key(args)
    assert len(key["vlm"]) == len(key["generator"]) == 16 and key["max_steps"] == 60
    assert wa.cache_key(argparse.Namespace(**{**vars(args), "max_steps": 120})) != key


def test_ablation_reuses_a_run_only_under_its_rows_recipe(tmp_path):
    """A cached run is reused only if it was made with the row's current overrides: GRPO's sampling steps changed
    once while its cached runs would have been reused under the same models and arguments."""
    args = argparse.Namespace(vlm=None, max_steps=60, grpo_steps=12, eval_prompts=8, sampler="consistency:4:3")
    run = tmp_path / "runs" / "grpo" / "seed0"
    overrides = wa.row_overrides("GRPO", 0, args, str(run))
    assert overrides["max_steps"] == 12 and overrides["grpo"]["sde_steps"] == 2 and overrides["seed"] == 0
    assert wa.cached_report(str(run), overrides) is None  # nothing there
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"after": {"total": 0.5}}))
    assert wa.cached_report(str(run), overrides) is None  # a report without its recipe: not trusted
    (run / "row_overrides.json").write_text(json.dumps(overrides))
    assert wa.cached_report(str(run), overrides) == {"after": {"total": 0.5}}
    changed = json.loads(json.dumps(overrides))
    changed["grpo"]["num_sampling_steps"] = 4
    assert wa.cached_report(str(run), changed) is None
    other = wa.row_overrides("full", 0, args, str(run))
    assert wa.cached_report(str(run), other) is None
    assert wa.row_config("GRPO", 0, args, str(run)).grpo.num_sampling_steps == overrides["grpo"]["num_sampling_steps"]
