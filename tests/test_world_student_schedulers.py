"""benchmarks/world_student_schedulers.py, reduced: a world student (a w-conditioned LoRA exported as the main job
exports it) sampled in the stock TextToVideoSDPipeline reproduces the main job's sampler, each scheduler row is what
it says, and a pipeline that does not carry the student stops the run."""
import json
import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schedulers(load_repo_module):
    return load_repo_module("benchmarks/world_student_schedulers.py")


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A main job's output directory: its config.json and a random guidance-conditioned LoRA in lora_diffusers/.
    Its CD grid is 25 steps, not diffusers' default 50, so a scheduler built without the run's grid shows."""
    from pisces_fast.training import lora as L
    from pisces_fast.world import load_world_generator
    from pisces_fast.world.config import world_config_from_argv

    run = tmp_path_factory.mktemp("world_run")
    cfg = world_config_from_argv(["--output_dir", str(run), "--cd.num_ddim_timesteps", "25"])
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    gen = load_world_generator(cfg.model.path)
    gen.enable_guidance_conditioning(cfg.cd.guidance_embedding_dim)
    targets = list(cfg.lora.target_modules)
    L.add_lora(gen.denoiser, cfg.lora.rank, cfg.lora.alpha, targets, init="gaussian")
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in L.lora_parameters(gen.denoiser):
            p.normal_(std=0.02)
    L.export_diffusers_lora(L.lora_state_dict(gen.denoiser), "unet3d", str(run / "lora_diffusers"),
                            {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": targets})
    return run


def test_stock_pipeline_rows(schedulers, student_run, tmp_path):
    out = tmp_path / "out"
    results = schedulers.main(["--run", str(student_run), "--prompts", "2", "--seeds", "0", "--tcd_gamma", "0", "0.5",
                               "--schedules", "999,759,519,279", "999,599,199,39", "--reference_steps", "2",
                               "--threads", "1", "--out", str(out)])
    labels = [r["label"] for r in results]
    assert labels == ["LCM, 4 steps (the main job's sampler)", "TCD, 4 steps, gamma 0", "TCD, 4 steps, gamma 0.5",
                      "LCM, timesteps 999, 759, 519, 279", "LCM, timesteps 999, 599, 199, 39", "LCM, 2 steps"]
    lcm, tcd0, tcd_half, fixed_own, fixed_other, two = results
    # LCMScheduler on the run's 25-step grid (diffusers' default grid of 50 would give 999, 759, 499, 259)
    assert lcm["timesteps_run"] == [999, 759, 519, 279] and two["timesteps_run"] == [999, 519]
    assert tcd0["timesteps_run"] == tcd_half["timesteps_run"] == lcm["timesteps_run"]
    # the subclass runs the schedule it holds: LCM's own gives the LCM row's clips, another one other clips
    assert fixed_own["timesteps_run"] == [999, 759, 519, 279] and fixed_own["mean"] == lcm["mean"]
    assert fixed_other["timesteps_run"] == [999, 599, 199, 39] and fixed_other["mean"] != lcm["mean"]
    # gamma reaches TCDScheduler.step (the pipeline's eta): 0 never re-noises with fresh noise, 0.5 does
    assert tcd0["mean"] != tcd_half["mean"] and tcd0["mean"] != lcm["mean"]
    saved = json.loads((out / "world_student_schedulers.json").read_text())
    assert [r["label"] for r in saved["rows"]] == labels
    table = (out / "world_student_schedulers.md").read_text()
    assert "| 3 | TCD, 4 steps, gamma 0 | 999, 759, 519, 279 |" in table and "held-out prompts 17..18" in table


def test_a_pipeline_without_the_student_stops_the_run(schedulers, student_run, tmp_path, monkeypatch):
    import warnings

    from diffusers import TextToVideoSDPipeline

    def plain_pipeline(run, guidance, generator_dir):  # the LoRA never loaded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = TextToVideoSDPipeline.from_pretrained(generator_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    monkeypatch.setattr(schedulers, "stock_pipeline", plain_pipeline)
    with pytest.raises(RuntimeError, match="differs from the main job's sampler"):
        schedulers.main(["--run", str(student_run), "--prompts", "1", "--seeds", "0", "--tcd_gamma",
                         "--schedules", "--reference_steps", "--threads", "1", "--out", str(tmp_path)])


def test_bad_arguments_are_named(schedulers, student_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        schedulers.parse_args(["--run", str(tmp_path)])  # no config.json / lora_diffusers there
    for bad in (["--tcd_gamma", "1.5"], ["--schedules", "259,499"], ["--schedules", "1200,999"],
                ["--schedules", "999,x"], ["--prompts", "0"]):
        with pytest.raises(SystemExit):
            schedulers.parse_args(["--run", str(student_run)] + bad)
    # off the run's 25-step grid (t + 1 a multiple of 40), or more steps than it has: refused before any sampling
    for bad in (["--schedules", "999,759,499,259"], ["--reference_steps", "26", "--schedules"]):
        with pytest.raises(SystemExit):
            schedulers.main(["--run", str(student_run), "--out", str(tmp_path)] + bad)
        assert bad[0] + ":" in capsys.readouterr().err
