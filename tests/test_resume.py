"""Exact resume: validation draws nothing from the global RNG, a killed run with validation on resumes bit-exactly,
extending a finished run equals a straight run, and DeepSpeed's state is read without unpickling."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pisces_fast.training.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough for 2 shared cores, with validation every 2 steps (the UNet3D has dropout p=0.1 layers).
TINY = {"data": {"batch_size": 1}, "model": {"num_frames": 4}, "validation": {"every": 2, "num_steps": 2}}
TINY_ARGS = ["--config", "configs/tiny_cd.yaml", "--deepspeed", "null", "--export_lora", "false", "--data.batch_size", "1",
             "--model.num_frames", "4", "--validation.every", "2", "--validation.num_steps", "2", "--checkpoint_every", "2"]


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_validation_draws_nothing_from_the_global_rng_and_restores_train_mode(tiny_config):
    tr = Trainer(tiny_config("cd", **TINY))
    den = tr.gen.denoiser
    den.train()
    rng = torch.random.get_rng_state()
    first = tr.validate()
    assert torch.equal(rng, torch.random.get_rng_state())  # dropout in train mode would have drawn from it
    assert den.training
    with open(first, "rb") as fh:
        picture = fh.read()
    tr.validate()
    with open(first, "rb") as fh:
        assert fh.read() == picture  # its own generator and eval mode: the same grid every time


def test_extending_a_finished_run_equals_a_straight_run(tiny_config, tmp_path):
    straight = str(tmp_path / "straight")
    extended = str(tmp_path / "extended")
    common = {**TINY, "checkpoint_every": 2}
    train(tiny_config("cd", **common, max_steps=6, output_dir=straight))
    train(tiny_config("cd", **common, max_steps=4, output_dir=extended))
    train(tiny_config("cd", **common, max_steps=6, output_dir=extended, resume="latest"))
    a, b = records(straight), records(extended)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # every loss / reward term / lr, bitwise
    final = os.path.join("checkpoints", "checkpoint-00000006", "lora.safetensors")
    la, lb = load_file(os.path.join(straight, final)), load_file(os.path.join(extended, final))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_kill_and_resume_with_validation_on_is_exact(run_train, tmp_path):
    full, crashed = str(tmp_path / "full"), str(tmp_path / "crashed")
    args = TINY_ARGS + ["--max_steps", "5"]
    r = run_train(args + ["--output_dir", full])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(args + ["--output_dir", crashed], {"PISCES_FAST_CRASH_AFTER_STEP": "3"})
    assert r.returncode == 17, r.stderr[-2000:]  # killed after step 3; the checkpoint is step 2, validated after saving
    assert len(records(crashed)) == 3
    r = run_train(args + ["--output_dir", crashed, "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert records(crashed) == records(full)
    assert sorted(os.listdir(os.path.join(crashed, "validation"))) == sorted(os.listdir(os.path.join(full, "validation")))


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed (one rank, in a subprocess): its checkpoint files are read with torch's weights_only unpickler

DS_ARGS = ["--config", "configs/tiny_cd.yaml", "--deepspeed", "configs/ds_tiny_zero2.json", "--export_lora", "false",
           "--data.batch_size", "1", "--model.num_frames", "4", "--validation.every", "0", "--checkpoint_every", "2"]


def run_ds(args, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "WORLD_SIZE": "1", "RANK": "0",
           "LOCAL_RANK": "0"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = str(tmp_path_factory.mktemp("ds") / "run")
    r = run_ds(DS_ARGS + ["--max_steps", "2", "--output_dir", out], 29641)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class _CreatesAFile:
    """Unpickling this runs `open(path, "w")`: a stand-in for any code a planted pickle could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_deepspeed_resume_refuses_a_planted_pickle(deepspeed_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(deepspeed_run, out)
    ds_dir = os.path.join(out, "checkpoints", "checkpoint-00000002", "deepspeed")
    target = os.path.join(ds_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert os.path.isfile(target)
    marker = str(tmp_path / "pwned")
    torch.save({"optimizer_state_dict": _CreatesAFile(marker)}, target)
    r = run_ds(DS_ARGS + ["--max_steps", "3", "--output_dir", out, "--resume", "latest"], 29642)
    assert not os.path.exists(marker), "the planted pickle ran"
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: checkpoint file refused: ") and target in last


def test_deepspeed_resume_reports_a_truncated_optimizer_state(deepspeed_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(deepspeed_run, out)
    target = os.path.join(out, "checkpoints", "checkpoint-00000002", "deepspeed", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(target, "r+b") as fh:
        fh.truncate(os.path.getsize(target) // 2)
    r = run_ds(DS_ARGS + ["--max_steps", "3", "--output_dir", out, "--resume", "latest"], 29643)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: checkpoint file corrupt: ") and target in last


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_two_rank_deepspeed_extension_with_validation_equals_a_straight_run(tmp_path):
    def launch(args, port):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "train.py", "--config", "configs/tiny_cd.yaml",
               "--export_lora", "false", "--data.batch_size", "1", "--model.num_frames", "4", "--validation.every", "2",
               "--validation.num_steps", "2", "--checkpoint_every", "2", *args]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    straight, extended = str(tmp_path / "straight"), str(tmp_path / "extended")
    launch(["--max_steps", "4", "--output_dir", straight], 29651)
    launch(["--max_steps", "2", "--output_dir", extended], 29652)
    launch(["--max_steps", "4", "--output_dir", extended, "--resume", "latest"], 29653)
    a, b = records(straight), records(extended)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a == b
