"""scripts/pretrain_world_vlm.py: the caption-facts objective reads the caption right, and a killed run resumes
to the same weights as an uninterrupted one (with the fact read-outs in the checkpoint)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from pisces_fast.data import shapes as S
from pisces_fast.rewards.tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def script(load_repo_module):
    return load_repo_module("scripts/pretrain_world_vlm.py")


def _slot(color: str) -> int:
    return S.COLORS.index(color)


def _word_tokens(texts):
    """The captions' token ids (padded) and the colours' token ids, as the script's training batches have them."""
    tok = build_word_tokenizer(S.VOCAB, max_length=32)
    return (tok(texts, padding="longest", return_tensors="pt")["input_ids"],
            torch.tensor(tok.convert_tokens_to_ids(list(S.COLORS))), tok)


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


def test_matching_relation_targets_are_what_the_clip_shows_for_the_captions_pair(script):
    clip = "a small red circle to the left of a large blue square, both moving up"
    texts = [clip,
             "a small red circle to the right of a large blue square, both moving up",  # wrong word: the truth stays
             "a large blue square to the left of a small red circle",  # the pair seen from blue
             "a red circle moving up and a blue square moving up",  # no relation stated
             "a green cross above a white diamond"]  # colours the clip does not relate
    ids, color_ids, _ = _word_tokens(texts)
    t = script.matching_fact_targets([clip] * len(texts), texts, ids, color_ids)["relation"]
    left, right = S.RELATIONS.index("left of"), S.RELATIONS.index("right of")
    assert t.tolist() == [left, left, right, -100, -100]


def test_matching_fact_targets_read_the_clip_at_the_captions_colour_words(script):
    clip = "a small red circle to the left of a large blue square, both moving up"
    text = "a large red square to the right of a small blue circle, both moving down"  # every fact wrong
    ids, color_ids, tok = _word_tokens([text, clip])
    t = script.matching_fact_targets([clip, clip], [text, clip], ids, color_ids)
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    red, blue = words.index("red"), words.index("blue")
    for row in (0, 1):  # the clip's truth, whatever the caption claims
        assert t["shape"][row, red] == S.SHAPES.index("circle") and t["shape"][row, blue] == S.SHAPES.index("square")
        assert t["size"][row, red] == S.SIZES.index("small") and t["motion"][row, blue] == S.MOTIONS.index("up")
        assert int((t["shape"][row] >= 0).sum()) == 2  # only the two colour words carry targets
        assert t["relation"][row] == S.RELATIONS.index("left of")
    assert t["agreement"].tolist() == [0, 1]
    assert (int(t["subject_pos"][0]), int(t["reference_pos"][0])) == (red, blue)


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
    (["--matching_fact_weight", "-0.5"], "--matching_fact_weight must be a finite number >= 0"),
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
                 "--fact_weight", "1", "--matching_fact_weight", "1", "--counterfactual_prob", "0.5", "--threads", "1",
                 "--no_progress",
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


def _tiny_args(script, **overrides):
    argv = ["--width", "32", "--embed_dim", "16", "--vision_depth", "1", "--tubelet_size", "2"]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return script.parse_args(argv)


def test_init_from_adds_fusion_layers_on_top(script, tmp_path):
    """A deeper matching head starts from the saved one: the loaded layers keep their place, the new ones add nothing
    to their residual streams but LayerNorm, so the match logits move little; a depth that moves the text-only
    layers is a named error."""
    torch.manual_seed(0)
    saved = script.build_model(_tiny_args(script, text_depth=3, fusion_layers=1), 40).eval()
    saved.save_pretrained(tmp_path / "saved")
    torch.manual_seed(1)
    deeper = script.build_model(_tiny_args(script, text_depth=5, fusion_layers=3), 40).eval()
    script.init_from_saved(deeper, str(tmp_path / "saved"))
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(deeper.state_dict()[key], value, msg=key)
    for i in (3, 4):
        assert not deeper.text_encoder.encoder.layer[i].output.dense.weight.detach().any()
    video = torch.randn(2, 3, 8, 32, 32)
    ids = torch.randint(4, 40, (2, 7))

    def match_probability(model):
        tokens, _, token_mask, grid = model.encode_vision(video.transpose(1, 2))
        text, text_mask = model.encode_text(ids, torch.ones_like(ids))
        frame_idx, coords = model.video_positions(grid, tokens.device)
        return model.vtm_logits(text, text_mask, tokens, token_mask, frame_idx, coords).softmax(-1)[:, 1]

    with torch.no_grad():
        torch.testing.assert_close(match_probability(deeper), match_probability(saved), atol=0.15, rtol=0)
    with pytest.raises(ValueError, match="keeps its 2 text-only layers"):
        script.init_from_saved(script.build_model(_tiny_args(script, text_depth=4, fusion_layers=1), 40),
                               str(tmp_path / "saved"))
