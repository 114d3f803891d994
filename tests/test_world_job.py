"""The main job's pipeline (OT-map fit -> before eval -> PISCES post-training -> after eval -> report),
reduced to seconds on tiny random models saved the way the shipped world models are."""
import json
import os

import pytest
import torch

from pisces_fast.data.shapes import VOCAB
from pisces_fast.rewards.backbones import InternVideo2, InternVideo2Backbone, InternVideo2Config
from pisces_fast.rewards.tokenizer import build_word_tokenizer
from pisces_fast.training.config import config_from_argv
from pisces_fast.training.generators import build_tiny_generator, save_generator
from pisces_fast.training.world_job import WORLD_DEFAULTS, plot_curves, run_world_job, summarize


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(VOCAB, max_length=24)
    cfg = InternVideo2Config.tiny(vocab_size=len(tokenizer), num_frames=8, max_text_len=24)
    InternVideo2Backbone(InternVideo2(cfg), tokenizer).save_pretrained(root / "vlm")
    save_generator(build_tiny_generator("unet3d", "pixel", num_frames=8, height=32, width=32), str(root / "generator"))
    return root


def test_world_job_end_to_end_reduced(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    argv = [
        "--output_dir", str(out), "--max_steps", "2", "--checkpoint_every", "0",
        "--model.path", str(tiny_world / "generator"), "--world.vlm", str(tiny_world / "vlm"),
        "--data.batch_size", "2", "--world.ot_map_clips", "32", "--world.ot_map_steps", "3",
        "--world.eval_prompts", "2", "--world.eval_seeds", "[0]", "--world.eval_steps", "2",
        "--cd.num_ddim_timesteps", "10",
    ]
    cfg = config_from_argv(argv, defaults=WORLD_DEFAULTS)
    assert cfg.world.enabled and cfg.data.kind == "shapes"
    result = run_world_job(cfg)
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert {"quality", "semantic", "total"} <= set(report[side])
        assert all(0.0 <= v <= 1.0 for v in report[side].values())
    assert result["before"] == report["before"]
    assert len(report["prompts"]) == 2
    for name in ("report.md", "before_after.gif", "curves.png", "metrics.jsonl", "ot_map/config.json"):
        assert (out / name).is_file(), name
    assert "| semantic |" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss_cd", "reward/quality", "reward/semantic"} <= set(rows[0])


def test_summarize_keeps_scores_only():
    scores = {"quality": 0.5, "semantic": 0.25, "total": 0.45, "color": 0.1, "raw": {"color": 3}, "num_clips": 4,
              "per_clip": []}
    assert summarize(scores) == {"quality": 0.5, "semantic": 0.25, "total": 0.45, "color": 0.1}


def test_curves_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / i, "reward/semantic": 0.1 * i}) for i in range(1, 30)))
    assert plot_curves(str(path), str(tmp_path / "c.png")) and os.path.getsize(tmp_path / "c.png") > 1000
    assert plot_curves(str(tmp_path / "missing.jsonl"), str(tmp_path / "d.png")) is None


def test_bad_world_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="world.eval_prompts"):
        config_from_argv(["--world.eval_prompts", "0", "--model.path", str(tmp_path)], defaults=WORLD_DEFAULTS)
    with pytest.raises(FileNotFoundError, match="world.vlm"):
        config_from_argv(["--world.vlm", str(tmp_path / "nope"), "--model.path", str(tmp_path)], defaults=WORLD_DEFAULTS)
