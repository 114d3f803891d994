"""Config loading, overrides and clear errors; the train.py entry point's failure modes."""
import os
import subprocess
import sys

import pytest

from pisces_fast.training.config import config_from_argv, load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cd.yaml")


def test_yaml_and_overrides():
    cfg = config_from_argv(["--config", TINY, "--local_rank=1", "--max_steps", "7", "--cd.skip_k=2", "--optim.lr", "3e-4",
                            "--resume", "latest", "--reward.weights", "{semantic: 2.0}"])
    assert cfg.mode == "cd" and cfg.max_steps == 7 and cfg.cd.skip_k == 2 and cfg.optim.lr == 3e-4
    assert cfg.resume == "latest" and cfg.reward.weights["semantic"] == 2.0
    assert cfg.resolve_path(cfg.deepspeed).endswith(os.path.join("configs", "ds_tiny_zero2.json"))
    for name in ("tiny_grpo.yaml", "tiny_dpo.yaml"):
        assert load_config(os.path.join(ROOT, "configs", name)).mode in ("grpo", "dpo")
    path, over = parse_overrides(["--a.b.c", "1", "--flag=true"])
    assert path is None and over == {"a": {"b": {"c": 1}}, "flag": True}


@pytest.mark.parametrize("argv,exc,match", [
    (["--mode", "ppo"], ValueError, r"`mode`: expected one of"),
    (["--max_steps", "0"], ValueError, r"`max_steps`"),
    (["--optim.lr", "fast"], ValueError, r"`optim.lr`: expected float"),
    (["--cd.skip_k", "50"], ValueError, r"`cd.skip_k`"),
    (["--grpo.group_size", "1"], ValueError, r"`grpo.group_size`"),
    (["--colour", "red"], ValueError, r"`colour`: unknown key"),
    (["--cd.skipk", "2"], ValueError, r"`cd.skipk`: unknown key"),
    (["--model.path", "/nonexistent/model"], ValueError, r"exactly one of them"),
    (["--model.tiny", "null", "--model.path", "/nonexistent/model"], FileNotFoundError, r"model.path.*not found"),
    (["--data.kind", "file", "--data.path", "/nonexistent.csv"], FileNotFoundError, r"data.path.*not found"),
    (["--deepspeed", "missing_ds.json"], FileNotFoundError, r"DeepSpeed JSON not found"),
    (["--resume", "/nonexistent/ckpt"], FileNotFoundError, r"resume"),
    (["--reward.kind", "clip"], ValueError, r"reward.kind"),
    (["--dpo.curriculum", "[{ops: [melt]}]"], ValueError, r"curriculum\[0\].ops"),
    (["--max_steps"], ValueError, r"needs a value"),
    (["stray"], ValueError, r"--key value"),
])
def test_bad_configs_give_clear_errors(argv, exc, match):
    with pytest.raises(exc, match=match):
        config_from_argv(["--config", TINY] + argv)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="--config"):
        config_from_argv(["--config", "/nonexistent.yaml"])


def test_train_py_reports_bad_config(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--optim.lr", "-1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "config `optim.lr`: expected a positive number" in r.stderr


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_train_py_sets_the_openmp_wait_policy_before_torch_loads(preset, expected):
    # libgomp reads OMP_WAIT_POLICY once, when torch is first imported: record its value at that moment.
    spy = ("import os, sys\nseen = []\nclass Spy:\n    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'torch' and not seen:\n            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
           f"sys.meta_path.insert(0, Spy())\nsys.path.insert(0, {ROOT!r})\nimport train\nprint(seen[0])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    r = subprocess.run([sys.executable, "-c", spy], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expected
