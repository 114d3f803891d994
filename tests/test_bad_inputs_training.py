"""Bad input to training and the OT-map CLI ends in one line naming the file or field: broken YAML, non-finite
numbers, missing / truncated / garbage checkpoint files (never silently swapped for another checkpoint), NaN LoRA
weights, unreadable embedding files, bad numeric flags, a map that would not be finite. Plus the one video check,
the one atomic-write helper and `train.py --help`."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pisces_fast.training.checkpoint import CheckpointError
from pisces_fast.training.config import config_from_argv, load_config
from pisces_fast.training.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cd.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out_dir, **over):
    base = {"deepspeed": None, "output_dir": str(out_dir), "checkpoint_every": 0, "export_lora": False, "max_steps": 1,
            "validation": {"every": 0}, "data": {"batch_size": 1}, "model": {"num_frames": 4}}
    base.update(over)
    return load_config(TINY, base)


# ----------------------------------------------------------------------------------------------------------
# config


def test_broken_yaml_is_one_line_naming_file_and_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: cd\nmax_steps: [1,\n")
    with pytest.raises(ValueError, match=r"^--config .*bad\.yaml: not valid YAML: .* at line 3, column 1$"):
        config_from_argv(["--config", str(bad)])
    with pytest.raises(ValueError, match=r"`--reward\.weights`: .*line 1"):
        config_from_argv(["--config", TINY, "--reward.weights", "{quality: 1"])


@pytest.mark.parametrize("flag,value", [("optim.lr", "inf"), ("optim.lr", ".nan"), ("lora.alpha", "-.inf"),
                                        ("cd.huber_c", "1e999")])
def test_non_finite_numbers_are_refused_at_validation(flag, value):
    with pytest.raises(ValueError, match=rf"config `{flag}`: expected a finite number"):
        config_from_argv(["--config", TINY, f"--{flag}", value])


def test_train_py_reports_bad_input_in_one_line_with_exit_code_2(run_train, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [cd\n")
    for args, expected in ((["--config", str(bad)], "not valid YAML"),
                           (["--config", TINY, "--optim.lr", "inf"], "config `optim.lr`: expected a finite number")):
        r = run_train(args, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: ") and expected in lines[0], r.stderr[-2000:]


def test_train_py_help_lists_sections_and_fields_with_their_help(run_train):
    r = run_train(["--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for needle in ("\n  optim:", "--optim.lr (float, default 1e-06)", "\n  validation:", "--validation.every (int",
                   "--cd.ema_decay (float | null, default 0.95): EMA target theta^-",
                   "--checkpoint_every (int, default 50): Save a checkpoint every"):
        assert needle in r.stdout, needle


# ----------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 1-step run (its final checkpoint, EMA adapter included)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny(out))
    return out


def truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(max(1, os.path.getsize(path) // 2))


def write_nan_lora(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")  # one flipped weight
    save_file(state, str(path), metadata=meta)


CKPT = os.path.join("checkpoints", "checkpoint-00000001")


@pytest.mark.parametrize("damage,expected", [
    (lambda d: truncate(d / CKPT / "lora.safetensors"), r"checkpoint file corrupt: .*lora\.safetensors: "),
    (lambda d: write_nan_lora(d / CKPT / "lora.safetensors"), r"lora\.safetensors: .*NaN or Inf"),
    (lambda d: os.remove(d / CKPT / "lora_ema.safetensors"), r"checkpoint file missing: .*lora_ema\.safetensors"),
    (lambda d: truncate(d / CKPT / "optimizer.pt"), r"checkpoint file corrupt: .*optimizer\.pt: "),
    (lambda d: os.remove(d / CKPT / "optimizer.pt"), r"checkpoint file missing: .*optimizer\.pt"),
    (lambda d: truncate(d / CKPT / "trainer_state.json"), r"checkpoint file corrupt: .*trainer_state\.json: "),
    (lambda d: os.remove(d / CKPT / "trainer_state.json"), r"checkpoint-00000001 is incomplete: trainer_state\.json is missing"),
    (lambda d: (d / CKPT / "trainer_state.json").write_text('{"step": "one"}'), r"trainer_state\.json: expected"),
    (lambda d: truncate(d / CKPT / "rng" / "rank0.json"), r"checkpoint file corrupt: .*rank0\.json: "),
    (lambda d: truncate(d / CKPT / "rng" / "rank0.safetensors"), r"checkpoint file corrupt: .*rank0\.safetensors: "),
    (lambda d: (d / "checkpoints" / "latest").write_bytes(b"\x00\xffgarbage"), r"checkpoint file corrupt: .*latest: "),
    (lambda d: (d / "checkpoints" / "latest").write_text("checkpoint-00000099"), r"names checkpoint-00000099, which does not exist"),
    (lambda d: os.remove(d / "checkpoints" / "latest"), r"latest is missing but .* holds 1 checkpoint"),
])
def test_damaged_checkpoint_is_reported_never_swapped(saved_run, tmp_path, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    damage(run)
    with pytest.raises(CheckpointError, match=expected) as info:
        Trainer(tiny(run, max_steps=2, resume="latest"))
    assert "\n" not in str(info.value)


def test_resume_drops_a_metrics_line_cut_short_by_the_kill(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "lo')  # killed mid-write, after the checkpoint of step 1
    Trainer(tiny(run, max_steps=2, resume="latest"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]


def test_resume_from_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"incomplete: trainer_state\.json is missing"):
        Trainer(tiny(tmp_path / "run", resume=str(tmp_path)))


def test_train_py_reports_a_damaged_checkpoint_in_one_line(saved_run, tmp_path, run_train):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    os.remove(run / CKPT / "trainer_state.json")
    r = run_train(["--config", TINY, "--deepspeed", "null", "--output_dir", str(run), "--max_steps", "2",
                   "--model.num_frames", "4", "--data.batch_size", "1", "--resume", "latest"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: checkpoint ") and "trainer_state.json is missing" in last
    assert "Traceback" not in r.stderr


def test_nan_lora_weights_are_refused_at_load(saved_run, tmp_path):
    from pisces_fast.training.lora import read_lora

    path = tmp_path / "lora.safetensors"
    shutil.copy(saved_run / CKPT / "lora.safetensors", path)
    read_lora(str(path))
    write_nan_lora(path)
    with pytest.raises(ValueError, match=r"LoRA file .*lora\.safetensors: 1 tensor\(s\) hold NaN or Inf"):
        read_lora(str(path))
    with pytest.raises(ValueError, match=r"lora\.safetensors: 1 tensor"):
        Trainer(tiny(tmp_path / "run", lora={"init_from": str(path)}))


# ----------------------------------------------------------------------------------------------------------
# the OT-map CLI


def run_ot_map_cli(capsys, *args):
    from pisces_fast.rewards.ot_map import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--no-progress", "--steps", "2", "--log-every", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return info.value.code, err


@pytest.fixture
def embeddings(tmp_path):
    g = torch.Generator().manual_seed(0)
    src, tgt = tmp_path / "src.safetensors", tmp_path / "tgt.safetensors"
    save_file({"e": torch.randn(64, 8, generator=g)}, str(src))
    save_file({"e": torch.randn(64, 8, generator=g) + 1}, str(tgt))
    return src, tgt


def test_ot_map_cli_unreadable_files_are_one_line(capsys, tmp_path, embeddings):
    src, tgt = embeddings
    trunc, garbage = tmp_path / "trunc.safetensors", tmp_path / "garbage.pt"
    trunc.write_bytes(src.read_bytes()[:100])
    garbage.write_bytes(b"not a torch file")
    for bad in (trunc, garbage):
        code, err = run_ot_map_cli(capsys, "--source", str(bad), "--target", str(tgt), "--out", str(tmp_path / "o"))
        assert code == 2 and len(err) == 1 and f"embedding file {bad}: not a readable" in err[0], err


@pytest.mark.parametrize("flag,value,expected", [("--steps", "0", "steps must be"), ("--lr", "nan", "lr must be"),
                                                 ("--val-fraction", "2", "val_fraction must be"),
                                                 ("--batch-size", "-1", "batch_size must be")])
def test_ot_map_cli_bad_numeric_flags_are_one_line(capsys, tmp_path, embeddings, flag, value, expected):
    src, tgt = embeddings
    code, err = run_ot_map_cli(capsys, "--source", str(src), "--target", str(tgt), "--out", str(tmp_path / "o"), flag, value)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o" / "ot_map.safetensors").exists()


def test_ot_map_fit_on_huge_embeddings_saves_a_finite_map_or_nothing(tmp_path, embeddings):
    from pisces_fast.rewards.ot_map import OTMap, main

    src, tgt = embeddings
    big_src, big_tgt = tmp_path / "bs.safetensors", tmp_path / "bt.safetensors"
    save_file({"e": load_file(str(src))["e"] * 1e19}, str(big_src))  # finite, but its variance overflows float32
    save_file({"e": load_file(str(tgt))["e"] * 1e19}, str(big_tgt))
    out = tmp_path / "map"
    assert main(["fit", "--no-progress", "--steps", "2", "--log-every", "1", "--source", str(big_src), "--target",
                 str(big_tgt), "--out", str(out)]) == 0
    saved = load_file(str(out / "ot_map.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in saved.values()), {k: v for k, v in saved.items() if v.numel() == 1}
    mapped = OTMap.load(out)(load_file(str(big_src))["e"][:4])
    assert bool(torch.isfinite(mapped).all())
    summary = json.loads((out / "config.json").read_text())["fit_summary"]["history"][-1]
    assert all(v == v and abs(v) != float("inf") for v in summary.values()), summary


def test_ot_map_save_refuses_a_non_finite_map(tmp_path):
    from pisces_fast.rewards.ot_map import OTMap, OTMapConfig

    ot_map = OTMap(OTMapConfig(dim=4, hidden=8, residual=True))
    ot_map.scale.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"OTMap\.save: refusing to write .*: scale hold NaN or Inf"):
        ot_map.save(tmp_path / "map")
    assert not (tmp_path / "map").exists()


# ----------------------------------------------------------------------------------------------------------
# one video check, one atomic write


def test_training_uses_the_one_video_check():
    from pisces_fast.rewards.backbones import preprocess
    from pisces_fast.training import generators, toy_rewards

    assert generators.check_video is preprocess.check_video and toy_rewards.check_video is preprocess.check_video
    gen = generators.build_tiny_generator("unet3d", "pixel")
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\].*v / 255"):
        gen.encode_video(torch.full((1, 4, 3, 16, 16), 200.0))  # a uint8-range video is caught, not trained on


def test_one_atomic_write_helper(tmp_path):
    from pisces_fast import fileio
    from pisces_fast.rewards import ot_map
    from pisces_fast.training import checkpoint, trainer

    assert checkpoint.atomic_write_text is fileio.atomic_write_text and trainer.atomic_write_text is fileio.atomic_write_text
    assert ot_map.atomic_write is fileio.atomic_write
    target = tmp_path / "f.txt"
    fileio.atomic_write_text(target, "old")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]  # no temporary left behind
