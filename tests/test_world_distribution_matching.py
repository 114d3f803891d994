"""benchmarks/world_distribution_matching.py: the DMD term's plumbing on the world's generator (the fake score starts
as the teacher, so at w = 1 it pushes nowhere; its updates move only the fake adapter) and a reduced run of the
main job with it."""
import json
from unittest import mock

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def dmd(load_repo_module):
    return load_repo_module("benchmarks/world_distribution_matching.py")


def _trainer(dmd, tmp_path, *extra):
    from pisces_fast.training import trainer as trainer_module
    from pisces_fast.world.config import world_config_from_argv

    args, _ = dmd.parse_args(list(extra))
    cfg = world_config_from_argv(["--output_dir", str(tmp_path), "--reward.kind", "none", "--data.batch_size", "2",
                                  "--cd.guidance_scale_min", "1", "--cd.guidance_scale_max", "1"])
    with mock.patch.object(trainer_module, "ConsistencyDistillation", dmd.distribution_matching_cd(args)):
        return trainer_module.Trainer(cfg)


def test_fake_score_starts_as_the_teacher_and_only_it_is_updated(dmd, tmp_path):
    from pisces_fast.training.lora import ADAPTER, lora_parameters

    trainer = _trainer(dmd, tmp_path, "--fake_updates", "1")
    mode, den = trainer.mode, trainer.gen.denoiser
    assert mode.sampling_timesteps == [999, 759, 499, 259]
    student_ids = {id(p) for p in trainer.backend.params}
    assert not student_ids & {id(p) for p in mode.fake_params}  # the student's optimizer never steps the fake score
    assert student_ids == {id(p) for _, p in lora_parameters(den, ADAPTER)}
    student_before = [p.detach().clone() for _, p in lora_parameters(den, ADAPTER)]
    fake_before = [p.detach().clone() for p in mode.fake_params]
    den.eval()  # no dropout: the teacher and the untrained fake score are then the same function
    loss, metrics = mode.loss(next(trainer.batches), 0)
    assert metrics["guidance_scale"] == 1.0
    assert metrics["dmd_direction_abs"] == 0.0 and metrics["loss_dmd"] == 0.0
    assert torch.isfinite(loss) and metrics["loss_fake_score"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, mode.fake_params))
    assert all(torch.equal(a, p) for a, (_, p) in zip(student_before, lora_parameters(den, ADAPTER)))
    loss.backward()  # the student's gradient: CD + the (zero) DMD term through its own sampling step
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.backend.params)
    assert all(p.grad is None for p in mode.fake_params)  # cleared after each fake update; the student's loss never reaches them
    # a trained fake score differs from the teacher: the next step's direction is non-zero
    _, metrics = mode.loss(next(trainer.batches), 1)
    assert metrics["dmd_direction_abs"] > 0.0


def test_reduced_run_writes_the_main_jobs_report(dmd, tmp_path):
    out = tmp_path / "run"
    grid = '[{"sampler": "consistency", "steps": 2, "guidance": 1.0}]'
    dmd.main(["--output_dir", str(out), "--no_backward_simulation", "--", "--reward.kind", "none", "--max_steps", "2",
              "--world.eval_prompts", "2", "--world.eval_seeds", "[0]", "--world.teacher_grid", grid,
              "--world.student_grid", grid, "--world.student_row", '{"sampler": "consistency", "steps": 2, "guidance": 1.0}'])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss_dmd"] >= 0 and r["loss_fake_score"] > 0 for r in records)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and "total" in report["after"]


@pytest.mark.parametrize("argv, message", [
    (["--fake_updates", "0"], "--fake_updates"),
    (["--t_min", "500", "--t_max", "400"], "--t_min"),
    (["--", "--output_dir", "x"], "--output_dir"),
    (["--", "--resume", "latest"], "cannot be resumed"),
])
def test_bad_arguments_are_refused(dmd, argv, message, capsys):
    with pytest.raises(SystemExit):
        dmd.parse_args(argv)
    assert message in capsys.readouterr().err
