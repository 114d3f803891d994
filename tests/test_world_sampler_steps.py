"""benchmarks/world_sampler_steps.py, reduced: the shipped teacher over two sampler rows, with subject consistency
split into the analyzer's diagnostics (per clip, its raw value = objects found x similarity where found)."""
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_sampler_steps(load_repo_module):
    return load_repo_module("benchmarks/world_sampler_steps.py")


def test_sweep_writes_scores_and_subject_diagnostics(world_sampler_steps, tmp_path):
    results = world_sampler_steps.main(["--steps", "1", "4", "--ddim", "--prompts", "3", "--seeds", "0",
                                        "--conditional_mean", "2", "--threads", "1", "--out", str(tmp_path)])
    assert [r["label"] for r in results] == ["consistency 1 steps, CFG 1", "consistency 4 steps, CFG 1"]
    for r in results:
        d = r["diagnostics"]
        assert set(d) == {"subject_consistency_raw", "subject_presence", "subject_similarity"}
        assert 0.0 <= d["subject_presence"] <= 1.0 and 0.0 <= d["subject_similarity"] <= 1.0
        # raw = the mean over clips of presence x similarity (0 for a clip with no tracked object), so at most either
        assert d["subject_consistency_raw"] <= min(d["subject_presence"], d["subject_similarity"]) + 1e-9
    saved = json.loads((tmp_path / "world_sampler_steps.json").read_text())
    assert saved["rows"][1]["diagnostics"] == results[1]["diagnostics"]
    table = (tmp_path / "world_sampler_steps.md").read_text()
    assert "objects found (presence)" in table and "consistency 4 steps, CFG 1" in table
    assert all("total" in r["conditional_mean"]["mean"] for r in results) and "Mean of 2 samples" in table


def test_conditional_mean_of_one_draw_is_the_row_itself(world_sampler_steps):
    import torch

    from pisces_fast.training.generators import generator_from_config
    from pisces_fast.world import job
    from pisces_fast.world.config import world_config_from_argv

    cfg = world_config_from_argv(["--world.eval_prompts", "2"])
    prompts = job.held_out_prompts(cfg)
    gen = generator_from_config(cfg.model)
    gen.denoiser.eval()
    row = {"sampler": "consistency", "steps": 2, "guidance": 1.0}
    with torch.no_grad():
        one = world_sampler_steps.conditional_mean_videos(gen, prompts, row, [3], 1)
        two = world_sampler_steps.conditional_mean_videos(gen, prompts, row, [3], 2)
        assert torch.equal(one, job.sample_row(gen, gen.denoiser, prompts, row, [3]))
    assert not torch.equal(one, two)
