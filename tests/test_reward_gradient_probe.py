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


def test_smoothed_ascent_starts_from_the_same_clips_and_reports_the_clean_reward(probe, tmp_path):
    """--smooth K ascends the reward's mean over K perturbed copies; the records are of the clean clip."""
    common = ["--quick", "--rewards", "quality", "--row", "consistency:2:1", "--work", str(tmp_path / "work"),
              "--threads", "1"]
    plain = probe.main(common + ["--out", str(tmp_path / "plain")])[0]
    smooth = probe.main(common + ["--smooth", "2", "--out", str(tmp_path / "smooth")])[0]
    assert smooth["reward"] == "quality (smoothed x2)" and smooth["smooth"] == [2, 0.05, 0.05]
    assert smooth["records"][0] == plain["records"][0]  # the clean clip's reward and scores at step 0
    assert smooth["records"][-1]["latent_shift"] > 0 and smooth["records"][-1] != plain["records"][-1]

    # the smoothed objective is exactly the mean of the reward over K copies drawn from the generator
    from pisces_fast.training.distortions import add_noise, brightness_flicker

    torch.manual_seed(0)
    video = torch.rand(2, 8, 3, 32, 32)
    reward = lambda v, prompts: {"quality": v.mean(dim=(1, 2, 3, 4))}  # noqa: E731
    value = probe.smoothed_reward(reward, video, ["x", "y"], (3, 0.05, 0.1), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    copies = [add_noise(brightness_flicker(video, 0.1, g), 0.05, g) for _ in range(3)]
    torch.testing.assert_close(value["quality"], sum(c.mean(dim=(1, 2, 3, 4)) for c in copies) / 3, rtol=0, atol=0)
    assert not torch.allclose(value["quality"], video.mean(dim=(1, 2, 3, 4)))


def test_discriminators_are_trained_and_ascended_from_the_same_clips(probe, tmp_path):
    """--discriminators: each kind is trained on real vs generated clips, then ascended from the model's clips."""
    common = ["--quick", "--row", "consistency:2:1", "--work", str(tmp_path / "work"), "--threads", "1"]
    plain = probe.main(common + ["--rewards", "quality", "--out", str(tmp_path / "plain")])[0]
    runs = probe.main(common + ["--rewards", "--discriminators", "vlm", "latent", "pixel", "--out", str(tmp_path / "d")])
    assert [r["reward"] for r in runs] == ["discriminator (vlm)", "discriminator (latent)", "discriminator (pixel)"]
    for run in runs:
        assert run["output"] == "realness" and run["discriminator"]["clips"] == 8
        first, last = run["records"][0], run["records"][-1]
        assert first["analyzer"] == plain["records"][0]["analyzer"]  # the same clips as every reward's step 0
        assert last["reward"]["realness"] > first["reward"]["realness"] and last["latent_shift"] > 0
    assert "Discriminators (real train-split clips" in (tmp_path / "d" / "reward_gradient_probe.md").read_text()


def test_discriminator_data_is_real_train_clips_and_the_models_samples_on_their_captions(probe):
    from pisces_fast.data.shapes import make_clips
    from pisces_fast.world import job, load_world_generator
    from pisces_fast.world.config import world_config_from_argv

    cfg = world_config_from_argv([])
    gen = load_world_generator(cfg.model.path)
    row = {"sampler": "consistency", "steps": 1, "guidance": 1.0}
    real, fake = probe.discriminator_data(gen, cfg, row, 3)
    clips = make_clips(3, split="train", seed=cfg.seed + 1, config=job.world_config_of(cfg))
    assert torch.equal(real, clips.videos.float())
    with torch.no_grad():
        expected = job.sample_row(gen, gen.denoiser, clips.captions, row, [probe.DISC_SEED_BASE])
    assert torch.equal(fake, expected)
    # nothing shared with the probed clips: other prompts, and seeds that are no evaluation seed
    held_out = set(job.held_out_prompts(world_config_from_argv(["--world.eval_prompts", "16"])))
    assert not held_out & set(clips.captions)
    assert probe.DISC_SEED_BASE > max(probe.parse_args([]).seeds + list(cfg.world.eval_seeds))


@pytest.mark.parametrize("kind", ["vlm", "latent", "pixel"])
def test_discriminator_learns_a_separable_difference_and_leaves_its_features_frozen(probe, kind):
    from pisces_fast.world import load_world_generator
    from pisces_fast.world.config import world_config_from_argv

    cfg = world_config_from_argv([])
    gen = load_world_generator(cfg.model.path)
    codec_before = {k: v.clone() for k, v in gen.codec.state_dict().items()}
    torch.manual_seed(0)
    real = torch.rand(16, 8, 3, 32, 32) * 0.5
    fake = (real + 0.4).clamp(0, 1)  # brighter: any of the three can see it
    disc, accuracy = probe.train_discriminator(kind, gen, cfg.world.vlm, real, fake, 25)
    assert accuracy >= 0.9, accuracy
    video = fake[:2].clone().requires_grad_(True)
    disc(video).sum().backward()  # the ascent's gradient reaches the clip ...
    assert video.grad is not None and float(video.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in gen.codec.parameters())  # ... and nothing else trains
    assert all(torch.equal(v, codec_before[k]) for k, v in gen.codec.state_dict().items())


def test_bad_arguments_are_named(probe, tmp_path):
    with pytest.raises(SystemExit):
        probe.parse_args(["--run", str(tmp_path)])  # no lora_diffusers/ there
    with pytest.raises(SystemExit):
        probe.parse_args(["--row", "consistency:four:3"])
    with pytest.raises(SystemExit):
        probe.parse_args(["--lr", "0"])
    for bad in (["--smooth", "-1"], ["--smooth_noise", "0"], ["--smooth_flicker", "1"], ["--rewards"],
                ["--discriminators", "clip"], ["--discriminators", "pixel", "--disc_clips", "2"]):
        with pytest.raises(SystemExit):
            probe.parse_args(bad)
