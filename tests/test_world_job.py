"""The main job's pipeline (OT-map fit -> teacher grid -> PISCES post-training -> student grid -> report),
reduced to seconds on tiny random models saved the way the shipped world models are."""
import json
import os

import pytest
import torch

from pisces_fast.data.shapes import VOCAB
from pisces_fast.rewards.backbones import InternVideo2, InternVideo2Backbone, InternVideo2Config
from pisces_fast.rewards.tokenizer import build_word_tokenizer
from pisces_fast.training.generators import build_tiny_generator, save_generator
from pisces_fast.world import WorldTrainConfig, run_world_job, world_config_from_argv
from pisces_fast.training.trainer import plot_run_curves
from pisces_fast.world.job import summarize


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
        "--world.eval_prompts", "2", "--world.eval_seeds", "[0, 1]", "--cd.num_ddim_timesteps", "10",
        "--model.text_max_length", "16",
        "--world.teacher_grid", '[{sampler: ddim, steps: 2, guidance: 1}, {sampler: consistency, steps: 2, guidance: 2}]',
        "--world.student_grid", '[{sampler: consistency, steps: 2, guidance: 2}]',
        "--world.student_row", "{sampler: consistency, steps: 2, guidance: 2}",
    ]
    cfg = world_config_from_argv(argv)
    assert isinstance(cfg, WorldTrainConfig) and cfg.data.kind == "shapes" and cfg.cd.guidance_conditioning
    result = run_world_job(cfg)
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert {"quality", "semantic", "total"} <= set(report[side])
        assert all(0.0 <= v <= 1.0 for v in report[side].values())
    # before = the teacher's best row by total; after = the student's consistency row
    teacher = report["teacher_grid"]
    assert set(teacher) == {"DDIM 2 steps, CFG 1", "consistency 2 steps, CFG 2"}
    assert report["before_row"] == max(teacher, key=lambda k: teacher[k]["mean"]["total"])
    assert report["after_row"] == "consistency 2 steps, CFG 2" and set(report["student_grid"]) == {report["after_row"]}
    for row in list(teacher.values()) + list(report["student_grid"].values()):
        assert len(row["per_seed"]) == 2 and set(row["std"]) == set(row["mean"])
        for k, v in row["mean"].items():  # the mean is the mean over seeds
            assert v == pytest.approx(sum(s[k] for s in row["per_seed"]) / 2)
    assert result["before"] == report["before"] == teacher[report["before_row"]]["mean"]
    assert len(report["prompts"]) == 2
    for name in ("report.md", "before_after.gif", "curves.png", "metrics.jsonl", "ot_map/config.json",
                 "teacher_grid.json"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| semantic |" in md and f"**before** = the teacher at its best sampler: {report['before_row']}" in md
    assert "## The whole grid" in md and "(after)" in md and "## Verdict" in md
    assert sorted(report["verdict"]["above"] + report["verdict"]["not_above"]) == ["quality", "semantic", "total"]
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
    assert plot_run_curves(str(path), str(tmp_path / "c.png")) and os.path.getsize(tmp_path / "c.png") > 1000
    assert plot_run_curves(str(tmp_path / "missing.jsonl"), str(tmp_path / "d.png")) is None


def test_bad_world_config_is_named(tmp_path):
    base = ["--model.path", str(tmp_path)]
    with pytest.raises(ValueError, match="world.eval_prompts"):
        world_config_from_argv(["--world.eval_prompts", "0"] + base)
    with pytest.raises(FileNotFoundError, match="world.vlm"):
        world_config_from_argv(["--world.vlm", str(tmp_path / "nope")] + base)
    with pytest.raises(ValueError, match=r"world.teacher_grid\[0\].sampler"):
        world_config_from_argv(["--world.teacher_grid", "[{sampler: euler, steps: 4, guidance: 1}]"] + base)
    with pytest.raises(ValueError, match="world.student_row"):
        world_config_from_argv(["--world.student_row", "{sampler: consistency, steps: 3, guidance: 3}"] + base)


def test_grid_rows_parse_from_the_command_line():
    from pisces_fast.world.config import parse_grid_row

    assert parse_grid_row("consistency:4:3") == {"sampler": "consistency", "steps": 4, "guidance": 3.0}
    assert parse_grid_row("ddim:20:1") == {"sampler": "ddim", "steps": 20, "guidance": 1.0}
    for text, match in (("consistency:4", "SAMPLER:STEPS:GUIDANCE"), ("consistency:4:3:1", "SAMPLER:STEPS:GUIDANCE"),
                        ("consistency:four:3", "SAMPLER:STEPS:GUIDANCE"), ("euler:4:3", r"--row.sampler"),
                        ("ddim:0:3", r"--row.steps"), ("ddim:4:0.5", r"--row.guidance")):
        with pytest.raises(ValueError, match=match):
            parse_grid_row(text, "--row")


def test_training_config_knows_nothing_of_the_world(tmp_path):
    """C8: the library's TrainConfig has no world section; only the world's config does."""
    from pisces_fast.training.config import TrainConfig, config_from_argv

    assert "world" not in {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    with pytest.raises(ValueError, match="world"):
        config_from_argv(["--world.eval_prompts", "2", "--model.tiny", "unet3d"])


def test_library_does_not_import_the_world_or_eval():
    """Architecture: training never imports eval, and nothing outside pisces_fast/world imports the world."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "pisces_fast"
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        if not rel.startswith("world/"):
            assert not re.search(r"(from|import)\s+(pisces_fast\.world|\.\.?world\b)", text), rel
        if rel.startswith("training/"):
            assert not re.search(r"(from|import)\s+(pisces_fast\.eval|\.\.eval)", text), rel


def test_default_grids_compare_like_with_like(tmp_path):
    """The default evaluation: the teacher over DDIM and the consistency sampler at CFG 1 and 3; every student row
    (its own consistency sampler) has the same row in the teacher's grid, so each difference is the training's;
    "after" is the 4-step student. DDIM 50 stays one override away (FULL_TEACHER_GRID)."""
    from pisces_fast.world.config import FULL_TEACHER_GRID, row_key

    cfg = world_config_from_argv(["--model.path", str(tmp_path)])
    teacher = {row_key(r) for r in cfg.world.teacher_grid}
    student = {row_key(r) for r in cfg.world.student_grid}
    assert {s for s, _, _ in teacher} == {"ddim", "consistency"} and {g for _, _, g in teacher} == {1.0, 3.0}
    assert student <= teacher and {s for s, _, _ in student} == {"consistency"}
    assert row_key(cfg.world.student_row) == ("consistency", 4, 3.0)
    assert teacher < {row_key(r) for r in FULL_TEACHER_GRID}
    full = world_config_from_argv(["--model.path", str(tmp_path), "--world.teacher_grid",
                                   json.dumps(FULL_TEACHER_GRID)])
    assert ("ddim", 50, 3.0) in {row_key(r) for r in full.world.teacher_grid}


def _grid_row(sampler, steps, guidance, total, quality, semantic):
    return {"row": {"sampler": sampler, "steps": steps, "guidance": guidance},
            "mean": {"total": total, "quality": quality, "semantic": semantic}}


def test_verdict_reads_the_gap_from_both_grids():
    from pisces_fast.world.job import verdict, verdict_lines

    teacher = {"c4 g1": _grid_row("consistency", 4, 1, 0.50, 0.60, 0.20),
               "c4 g3": _grid_row("consistency", 4, 3, 0.45, 0.50, 0.30),
               "c8 g1": _grid_row("consistency", 8, 1, 0.60, 0.70, 0.25),
               "d20 g1": _grid_row("ddim", 20, 1, 0.40, 0.45, 0.20)}
    student = {"c4 g3": _grid_row("consistency", 4, 3, 0.55, 0.62, 0.40),
               "c8 g3": _grid_row("consistency", 8, 3, 0.65, 0.68, 0.45)}
    v = verdict(teacher, student, "c8 g1", "c4 g3")
    assert v["above"] == ["semantic"] and v["not_above"] == ["total", "quality"]
    assert v["same_sampler"]["row"] == "c4 g3"
    assert v["same_sampler"]["change"] == pytest.approx({"total": 0.10, "quality": 0.12, "semantic": 0.10})
    # the teacher's best 4-step row by total is CFG 1, not the same-guidance one
    assert v["teacher_best_at_student_steps"]["row"] == "c4 g1"
    assert v["teacher_best_at_student_steps"]["change"] == pytest.approx(
        {"total": 0.05, "quality": 0.02, "semantic": 0.20})
    # before's sampler and guidance at the student's steps: c4 g1 -> c8 g1
    assert v["teacher_steps"]["row"] == "c4 g1 → c8 g1"
    assert v["teacher_steps"]["change"] == pytest.approx({"total": 0.10, "quality": 0.10, "semantic": 0.05})
    assert v["student_best_at_before_steps"]["row"] == "c8 g3"
    assert v["student_best_at_before_steps"]["change"] == pytest.approx(
        {"total": 0.05, "quality": -0.02, "semantic": 0.20})
    text = "\n".join(verdict_lines(v))
    assert "**above** the teacher's best row on semantic and **not above** it on total, quality" in text
    assert "(c4 g3), student − teacher: total +0.100, quality +0.120, semantic +0.100" in text
    assert "(c4 g1 → c8 g1): total +0.100, quality +0.100, semantic +0.050" in text

    # a student above on all three: a one-line verdict, no gap analysis
    student["c4 g3"] = _grid_row("consistency", 4, 3, 0.70, 0.80, 0.30)
    v = verdict(teacher, student, "c8 g1", "c4 g3")
    assert v["not_above"] == [] and verdict_lines(v) == [
        "The student is **above** the teacher's best row on total, quality, semantic."]

    # rows the grids lack are left out, never guessed
    v = verdict({"d20 g1": teacher["d20 g1"]}, {"c4 g3": student["c4 g3"]}, "d20 g1", "c4 g3")
    assert set(v) == {"above", "not_above"}
