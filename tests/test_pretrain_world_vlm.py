"""scripts/pretrain_world_vlm.py: the caption-facts objective reads the caption right, and a killed run resumes
to the same weights as an uninterrupted one (with the fact read-outs in the checkpoint)."""
import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file

from pisces_fast.data import shapes as S

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "pretrain_world_vlm.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_world_vlm", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slot(color: str) -> int:
    return S.COLORS.index(color)


def test_caption_fact_targets_state_what_the_caption_says(script):
    captions = ["a small red circle to the left of a large blue square, both moving up", "a green cross staying still"]
    t = script.caption_fact_targets(captions)
    red, blue, green, n = _slot("red"), _slot("blue"), _slot("green"), len(S.COLORS)
    assert t["shape"][0, red] == S.SHAPES.index("circle") and t["shape"][0, blue] == S.SHAPES.index("square")
    assert t["motion"][0, red] == t["motion"][0, blue] == S.MOTIONS.index("up")
    assert t["size"][0, red] == S.SIZES.index("small") and t["size"][0, blue] == S.SIZES.index("large")
    # the relation is stated both ways, nothing else is
    assert t["relation"][0, red * n + blue] == S.RELATIONS.index("left of")
    assert t["relation"][0, blue * n + red] == S.RELATIONS.index("right of")
    assert int((t["relation"][0] >= 0).sum()) == 2
    assert int((t["motion"][0] >= 0).sum()) == 2 and int((t["shape"][0] >= 0).sum()) == 2
    # second caption: one object, no size stated, no relation
    assert t["motion"][1, green] == S.MOTIONS.index("still") and t["shape"][1, green] == S.SHAPES.index("cross")
    assert int((t["size"][1] >= 0).sum()) == 0 and int((t["relation"][1] >= 0).sum()) == 0
    assert int((t["motion"][1] >= 0).sum()) == 1


def test_caption_fact_heads_train_the_tokens(script):
    torch.manual_seed(0)
    heads = script.CaptionFactHeads(32)
    tokens = torch.randn(3, 17, 32, requires_grad=True)
    captions = ["a red circle moving left", "a blue square above a white diamond, both staying still",
                "a small cyan triangle moving down and a large yellow cross moving right"]
    out = heads(tokens, script.caption_fact_targets(captions))
    assert out["loss"].ndim == 0 and bool(torch.isfinite(out["loss"]))
    assert {"fact_acc_motion", "fact_acc_shape", "fact_acc_size", "fact_acc_relation"} <= set(out)
    out["loss"].backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("argv, message", [
    (["--reinit_vision"], "--reinit_vision needs --init_from"),
    (["--fact_weight", "-1"], "--fact_weight must be a finite number >= 0"),
    (["--fact_weight", "nan"], "--fact_weight must be a finite number >= 0"),
    (["--negative_weight", "colour=2"], "KIND must be one of"),
    (["--negative_weight", "relation=lots"], "W must be a number"),
    (["--negative_weight", "relation=-1"], "W must be a finite number >= 0"),
])
def test_bad_flags_are_named(script, tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        script.main(argv + ["--pool_size", "8", "--width", "32", "--embed_dim", "16", "--vision_depth", "1",
                            "--text_depth", "2", "--fusion_layers", "1", "--no_progress",
                            "--out", str(tmp_path / "m"), "--report_dir", str(tmp_path / "r")])


def _run(script, tmp, steps, extra=()):
    script.main(["--steps", str(steps), "--batch_size", "6", "--pool_size", "24", "--eval_clips", "8",
                 "--reward_pairs", "0", "--warmup", "1", "--save_every", "1", "--width", "32", "--embed_dim", "16",
                 "--vision_depth", "1", "--text_depth", "2", "--fusion_layers", "1", "--tubelet_size", "2",
                 "--fact_weight", "1", "--counterfactual_prob", "0.5", "--threads", "1", "--no_progress",
                 "--out", str(tmp / "model"), "--report_dir", str(tmp / "report"), *extra])
    return load_file(str(tmp / "model" / "model.safetensors"))


def test_killed_run_resumes_to_the_uninterrupted_weights(script, tmp_path, monkeypatch):
    whole = _run(script, tmp_path / "whole", steps=3)

    real_lr_at = script.lr_at

    def killed_at_step_2(step, args):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return real_lr_at(step, args)

    monkeypatch.setattr(script, "lr_at", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        _run(script, tmp_path / "split", steps=3)
    ckpt = tmp_path / "split" / "report" / "checkpoint"
    assert (ckpt / "fact_heads.safetensors").is_file()
    monkeypatch.setattr(script, "lr_at", real_lr_at)
    resumed = _run(script, tmp_path / "split", steps=3, extra=["--resume"])
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, msg=key)
