"""benchmarks/reward_gradient_probe.py, reduced: it starts from exactly the clips the main job scores for that row,
its ascent raises the reward it ascends, and it writes the table, the JSON and the plot."""
import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(load_repo_module):
    return load_repo_module("benchmarks/reward_gradient_probe.py")


def test_quick_probe_starts_from_the_main_jobs_clips_and_climbs_its_reward(probe, tmp_path):
    from pisces_fast.world import job, load_world_generator
    from pisces_fast.world.config import world_config_from_argv

    out = tmp_path / "out"
    runs = probe.main(["--quick", "--rewards", "quality", "semantic_vanilla", "--row", "consistency:2:1",
                       "--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1"])
    assert [r["reward"] for r in runs] == ["quality", "semantic_vanilla"]
    for run in runs:
        first, last = run["records"][0], run["records"][-1]
        assert [r["step"] for r in run["records"]] == [0, 2, 4]
        assert first["latent_shift"] == 0.0 and last["latent_shift"] > 0.0
        assert last["reward"][run["output"]] > first["reward"][run["output"]], run["reward"]

    # step 0 is the clip the main job's grid scores for this row: same prompts, latents and re-noising noise
    cfg = world_config_from_argv(["--world.eval_prompts", "2"])
    prompts = job.held_out_prompts(cfg)
    gen = load_world_generator(cfg.model.path)
    row = {"sampler": "consistency", "steps": 2, "guidance": 1.0}
    with torch.no_grad():
        expected = job.score_row(job.sample_row(gen, gen.denoiser, prompts, row, [0]), prompts, [0])["mean"]
    for run in runs:
        assert run["records"][0]["analyzer"] == pytest.approx(expected, abs=1e-6)

    saved = json.loads((out / "reward_gradient_probe.json").read_text())
    assert saved["meta"]["row_label"] == "consistency 2 steps, CFG 1" and len(saved["runs"]) == 2
    rows = [line.split(" | ")[0] for line in (out / "reward_gradient_probe.md").read_text().splitlines()]
    assert rows.count("| quality") == 3 and rows.count("| semantic_vanilla") == 3
    assert os.path.getsize(out / "reward_gradient_probe.png") > 10_000
    # the teacher's OT map is fitted once per (seed, size, VLM) and reused
    assert len(os.listdir(tmp_path / "work")) == 1


def test_bad_arguments_are_named(probe, tmp_path):
    with pytest.raises(SystemExit):
        probe.parse_args(["--run", str(tmp_path)])  # no lora_diffusers/ there
    with pytest.raises(SystemExit):
        probe.parse_args(["--row", "consistency:four:3"])
    with pytest.raises(SystemExit):
        probe.parse_args(["--lr", "0"])
