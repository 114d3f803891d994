"""scripts/pretrain_world_generator.py --init_from: a saved generator is continued, not rebuilt -- the VAE and the
text tower come back unchanged, the UNet starts from the saved weights and moves, and the summary records every
stage."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from pisces_fast.world.assets import world_generator_path


@pytest.fixture(scope="module")
def script(load_repo_module):
    return load_repo_module("scripts/pretrain_world_generator.py")


def _tensors(directory):
    (name,) = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    return load_file(os.path.join(directory, name))


def test_load_saved_generator_returns_the_shipped_weights_in_float32(script):
    shipped = str(world_generator_path())
    _vae, _bert, tokenizer, unet, previous = script.load_saved_generator(shipped)
    saved = _tensors(os.path.join(shipped, "unet"))
    state = unet.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert set(saved) == set(state)
    assert all(torch.equal(state[k], saved[k].float()) for k in saved)
    assert tokenizer.model_max_length == script.TEXT_MAX_LENGTH
    assert previous is not None and previous["args"]["steps"] >= 1


def test_load_saved_generator_names_what_is_missing(script, tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="vae/ is missing"):
        script.load_saved_generator(str(tmp_path))


def test_init_from_continues_the_saved_generator(script, tmp_path):
    shipped = str(world_generator_path())
    out, report = tmp_path / "gen", tmp_path / "report"
    script.main(["--init_from", shipped, "--out", str(out), "--report_dir", str(report), "--steps", "2",
                 "--warmup", "1", "--batch_size", "2", "--pool_size", "8", "--eval_prompts", "1", "--eval_steps", "1",
                 "--threads", "1", "--no_progress"])
    for sub in ("vae", "text_encoder"):  # reused as they are
        before, after = _tensors(os.path.join(shipped, sub)), _tensors(str(out / sub))
        assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before), sub
    before, after = _tensors(os.path.join(shipped, "unet")), _tensors(str(out / "unet"))
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # two optimizer steps moved the EMA
    # ... and only a little: it started from the saved weights, not a fresh initialisation
    drift = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    assert drift < 0.05, drift
    summary = json.loads((out / "training_summary.json").read_text())
    previous = json.loads((world_generator_path() / "training_summary.json").read_text())
    assert summary["stages"][-1].endswith("--no_progress") and "--init_from" in summary["stages"][-1]
    assert summary["stages"][:-1] == previous.get("stages", [previous["command"]])
    assert summary["total_unet_steps"] == previous.get("total_unet_steps", previous["args"]["steps"]) + 2
