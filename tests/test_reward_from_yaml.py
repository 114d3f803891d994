"""The real PISCES reward from YAML: checkpoint conversion, the preparation command, ``reward.kind: pisces``,
errors that name the field, and the one reward fusion used by CD and GRPO.

Everything runs on a tiny random InternVideo2-style model saved in the official stage-2 key layout (a pickled
DeepSpeed-style ``.pt``), tiny BLIP, and a handful of tiny videos written with PyAV.
"""
import argparse
import json
import os
import shutil

import av
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BlipForImageTextRetrieval

from pisces_fast.data.video_dataset import decode_video
from pisces_fast.rewards import (
    BlipVideoBackbone,
    InternVideo2,
    InternVideo2Backbone,
    InternVideo2Config,
    OTMap,
    OTMapConfig,
    PiscesRewards,
    build_word_tokenizer,
    tiny_blip_config,
)
from pisces_fast.rewards import convert_internvideo2 as convert_cli
from pisces_fast.rewards import prepare as prepare_cli
from pisces_fast.rewards.build import build_backbone, load_backbone_yaml
from pisces_fast.training.config import load_config
from pisces_fast.training.rewards_loader import build_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a red blue green circle square triangle moving left right up down".split()
CAPTIONS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
            "a red square moving down", "a blue circle moving right", "a green circle moving up"]
COLORS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 60)}


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def write_clip(path, color, frames=8, h=36, w=40, fps=8):
    """A coloured square sliding over a dark background."""
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.full((h, w, 3), 20, dtype=np.uint8)
            x = 2 + 3 * i
            img[10:24, x:x + 12] = color
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def official_layout(model: InternVideo2) -> dict:
    """A DeepSpeed-style official stage-2 checkpoint: keys under "module" (text under text_encoder.bert.),
    training-only extras, and a pickled non-tensor object (as the real .pt has)."""
    state = {(k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder.") else k): v.clone()
             for k, v in model.state_dict().items()}
    state["text_encoder.cls.predictions.bias"] = torch.zeros(5)
    state["vision_encoder.clip_decoder.0.head.weight"] = torch.zeros(2, 2)
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(4)[None]
    return {"module": state, "args": argparse.Namespace(lr=1e-4, batch_size=32)}


@pytest.fixture(scope="module")
def module_one_thread():
    """The module-scoped fixtures below also run with one intra-op thread (conftest's `one_thread` is per test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, module_one_thread):
    """tok/, iv2_tiny.json, stage2.pt (pickled), iv2.safetensors (converted), clips + pairs.csv, backbone.yaml."""
    d = tmp_path_factory.mktemp("reward_assets")
    tok = build_word_tokenizer(WORDS)
    tok.save_pretrained(str(d / "tok"))
    torch.manual_seed(0)
    config = InternVideo2Config.tiny(vocab_size=len(tok))
    model = InternVideo2(config).eval()
    (d / "iv2_tiny.json").write_text(json.dumps(config.to_dict()))
    torch.save(official_layout(model), d / "stage2.pt")
    assert convert_cli.main([str(d / "stage2.pt"), str(d / "iv2.safetensors"), "--trust-pickle",
                             "--config", str(d / "iv2_tiny.json")]) == 0
    (d / "clips").mkdir()
    rows = ["video,caption"]
    for i, caption in enumerate(CAPTIONS):
        write_clip(d / "clips" / f"{i}.mp4", COLORS[caption.split()[1]], frames=6 + i % 3)
        rows.append(f"clips/{i}.mp4,{caption}")
    (d / "pairs.csv").write_text("\n".join(rows) + "\n")
    backbone = {"kind": "internvideo2", "checkpoint": "iv2.safetensors", "tokenizer": "tok", "config": "iv2_tiny.json"}
    (d / "backbone.yaml").write_text(yaml.safe_dump({"backbone": backbone}))
    absolute = {k: (str(d / v) if k in ("checkpoint", "tokenizer", "config") else v) for k, v in backbone.items()}
    return {"dir": d, "model": model, "tokenizer": tok, "backbone": backbone, "abs_backbone": absolute}


def prepare(assets, out, *extra):
    d = assets["dir"]
    return prepare_cli.main(["--backbone-config", str(d / "backbone.yaml"), "--data", str(d / "pairs.csv"), "--out", str(out),
                             "--batch-size", "2", "--shard-size", "4", "--fit-steps", "30", "--fit-batch-size", "6",
                             "--inner-steps", "2", "--hidden", "16", "--log-every", "10", "--checkpoint-every", "10",
                             "--lr", "1e-3", "--device", "cpu", "--no-progress", *extra])


@pytest.fixture(scope="module")
def prepared(assets):
    out = assets["dir"] / "prep"
    assert prepare(assets, out) == 0
    return out


# -- conversion ------------------------------------------------------------------------------------
def test_convert_refuses_pickle_without_the_flag(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_cli.main([str(assets["dir"] / "stage2.pt"), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "--trust-pickle" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_converted_checkpoint_loads_without_unpickling(assets, monkeypatch):
    d = assets["dir"]
    meta_keys = load_file(str(d / "iv2.safetensors")).keys()
    assert "text_encoder.cls.predictions.bias" not in meta_keys and "itm_head.weight" in meta_keys

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called: something unpickled")

    monkeypatch.setattr(torch, "load", no_pickle)
    backbone = build_backbone(load_backbone_yaml(d / "backbone.yaml"))
    reference = InternVideo2Backbone(assets["model"], assets["tokenizer"]).eval()
    video = torch.rand(2, 5, 3, 30, 34)
    a = reference.match_logits(reference.encode_text(CAPTIONS[:2]), reference.encode_video(video))
    b = backbone.match_logits(backbone.encode_text(CAPTIONS[:2]), backbone.encode_video(video))
    assert torch.equal(a, b)


def test_convert_rejects_other_families_and_shapes(assets, tmp_path):
    blip = BlipForImageTextRetrieval(tiny_blip_config(len(assets["tokenizer"])))
    torch.save({"module": blip.state_dict()}, tmp_path / "blip.pt")
    with pytest.raises(ValueError, match="not an official InternVideo2 stage-2 checkpoint"):
        convert_cli.convert_internvideo2(tmp_path / "blip.pt", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="does not match the InternVideo2 architecture"):  # 1B layout vs tiny weights
        convert_cli.convert_internvideo2(assets["dir"] / "stage2.pt", tmp_path / "x.safetensors", trust_pickle=True)


# -- preparation ----------------------------------------------------------------------------------
def test_prepare_embeds_pairs_and_fits_the_map(assets, prepared):
    emb = load_file(str(prepared / "embeddings.safetensors"))
    assert emb["text"].shape == emb["video"].shape == (len(CAPTIONS), 16)
    # Independent computation: the source model on the decoded clips.
    ref = InternVideo2Backbone(assets["model"], assets["tokenizer"]).eval()
    cfg = ref.config
    clips = torch.stack([decode_video(str(assets["dir"] / "clips" / f"{i}.mp4"), cfg.num_frames, None, cfg.image_size,
                                      cfg.image_size) for i in range(len(CAPTIONS))])
    with torch.no_grad():
        torch.testing.assert_close(emb["text"], ref.encode_text(CAPTIONS).embed, rtol=0, atol=1e-5)
        torch.testing.assert_close(emb["video"], ref.encode_video(clips).embed, rtol=0, atol=1e-5)
    ot_map = OTMap.load(prepared / "ot_map")
    assert ot_map.dim == 16 and ot_map.fit_summary["steps"] == 30


def test_prepare_resumes_and_refuses_another_backbone(assets, prepared, tmp_path):
    out = tmp_path / "prep"
    shutil.copytree(prepared, out)
    shard0, shard1 = out / "embeddings" / "shard-00000.safetensors", out / "embeddings" / "shard-00001.safetensors"
    before = load_file(str(out / "embeddings.safetensors"))
    map_before = load_file(str(out / "ot_map" / "ot_map.safetensors"))
    shard1.unlink()
    (out / "ot_map" / "ot_map.safetensors").unlink()
    os.utime(shard0, (1, 1))  # a recomputed shard would get a fresh mtime
    assert prepare(assets, out) == 0
    assert os.stat(shard0).st_mtime == 1 and shard1.is_file()
    after = load_file(str(out / "embeddings.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    map_after = load_file(str(out / "ot_map" / "ot_map.safetensors"))  # the fit resumed from its final checkpoint
    assert all(torch.equal(map_before[k], map_after[k]) for k in map_before)

    other = dict(assets["backbone"], num_frames=2)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"reward": {"backbone": other}}))
    for key in ("checkpoint", "tokenizer", "config"):
        other[key] = str(assets["dir"] / other[key])
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"reward": {"backbone": other}}))
    with pytest.raises(SystemExit):
        prepare_cli.main(["--backbone-config", str(tmp_path / "other.yaml"), "--data", str(assets["dir"] / "pairs.csv"),
                          "--out", str(out), "--embed-only", "--no-progress", "--device", "cpu"])


# -- reward.kind: pisces --------------------------------------------------------------------------
def train_yaml(tmp_path, assets, reward_overrides=None, **top):
    """A tiny CD recipe whose reward is the prepared PISCES reward (paths relative to the YAML)."""
    d = assets["dir"]
    rel = os.path.relpath(d, tmp_path)
    reward = {"kind": "pisces", "weights": {"quality": 1.0, "semantic": 1.0}, "fusion": "equal", "num_frames": 4,
              "backbone": {k: (f"{rel}/{v}" if k in ("checkpoint", "tokenizer", "config") else v)
                           for k, v in assets["backbone"].items()},
              "ot_map": f"{rel}/prep/ot_map", "pot": {"backend": "reference", "max_iter": 20}}
    for k, v in (reward_overrides or {}).items():
        if v is None:
            reward.pop(k, None)
        else:
            reward[k] = v
    cfg = {"mode": "cd", "output_dir": str(tmp_path / "run"), "max_steps": 1, "checkpoint_every": 0, "export_lora": False,
           "model": {"tiny": "unet3d", "num_frames": 4, "height": 16, "width": 16},
           "data": {"kind": "synthetic", "synthetic_size": 2, "batch_size": 2},
           "reward": reward, "cd": {"num_ddim_timesteps": 10, "skip_k": 1}, "validation": {"every": 0}, **top}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pisces_reward_builds_from_yaml_and_trains(assets, prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # relative paths resolve next to the YAML, not the working directory
    cfg = load_config(str(train_yaml(tmp_path, assets)))
    reward = build_reward(cfg.reward, torch.device("cpu"))
    assert isinstance(reward, PiscesRewards) and isinstance(reward.backbone, InternVideo2Backbone)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    # The same reward assembled by hand from the source model and the fitted map.
    from pisces_fast.rewards import POTConfig

    by_hand = PiscesRewards(InternVideo2Backbone(assets["model"], assets["tokenizer"]), OTMap.load(prepared / "ot_map"),
                            pot=POTConfig(backend="reference", max_iter=20))
    video = torch.rand(2, 4, 3, 16, 16)
    got, want = reward(video, CAPTIONS[:2]), by_hand(video, CAPTIONS[:2])
    for name in ("quality", "semantic"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)

    from pisces_fast.training.trainer import Trainer

    tr = Trainer(cfg)
    tr.train()
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as fh:
        m = json.loads(fh.readline())
    assert np.isfinite(m["loss"]) and "reward/semantic" in m and "reward/quality" in m


def _blip_dir(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(tiny_blip_config(len(tokenizer))).eval()
    model.save_pretrained(tmp_path / "blip")
    tokenizer.save_pretrained(str(tmp_path / "blip"))
    return model


def test_blip_backbone_from_yaml(assets, tmp_path):
    model = _blip_dir(tmp_path, assets["tokenizer"])
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"backbone": {"kind": "blip", "path": "blip", "num_frames": 3}}))
    backbone = build_backbone(load_backbone_yaml(tmp_path / "b.yaml"))
    reference = BlipVideoBackbone(model, assets["tokenizer"], num_frames=3).eval()
    video = torch.rand(2, 5, 3, 30, 34)
    a = reference.match_logits(reference.encode_text(CAPTIONS[:2]), reference.encode_video(video))
    b = backbone.match_logits(backbone.encode_text(CAPTIONS[:2]), backbone.encode_video(video))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    InternVideo2Backbone(assets["model"], assets["tokenizer"]).save_pretrained(tmp_path / "iv2dir")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"backbone": {"kind": "blip", "path": "iv2dir"}}))
    with pytest.raises(ValueError, match=r"backbone\.path: .* not BLIP image-text matching"):
        build_backbone(load_backbone_yaml(tmp_path / "c.yaml"))


def _other_tokenizer(tmp_path):
    tok = build_word_tokenizer(WORDS + ["purple", "star"])
    tok.save_pretrained(str(tmp_path / "tok2"))
    return str(tmp_path / "tok2")


def _blip_checkpoint(tmp_path, assets):
    from safetensors.torch import save_file

    blip = BlipForImageTextRetrieval(tiny_blip_config(len(assets["tokenizer"])))
    save_file({k: v.contiguous() for k, v in blip.state_dict().items()}, str(tmp_path / "blip.safetensors"))
    return str(tmp_path / "blip.safetensors")


def _small_map(tmp_path):
    OTMap(OTMapConfig(dim=8, hidden=4)).save(tmp_path / "map8")
    return str(tmp_path / "map8")


BAD = {  # name: (reward overrides given tmp_path/assets, error type, message pattern)
    "missing checkpoint": (lambda t, a: {"backbone": {**a["abs_backbone"], "checkpoint": str(t / "nope.safetensors")}},
                           FileNotFoundError, r"reward\.backbone\.checkpoint: file not found"),
    "pickled checkpoint": (lambda t, a: {"backbone": {**a["abs_backbone"], "checkpoint": str(a["dir"] / "stage2.pt")}},
                           ValueError, r"reward\.backbone\.checkpoint: .* not a \.safetensors .*convert_internvideo2"),
    "wrong family": (lambda t, a: {"backbone": {**a["abs_backbone"], "checkpoint": _blip_checkpoint(t, a)}},
                     ValueError, r"reward\.backbone\.checkpoint: .* not an InternVideo2 stage-2 checkpoint .* kind: blip"),
    "config vs checkpoint": (lambda t, a: {"backbone": {**a["abs_backbone"], "config": "stage2_1b"}},
                             ValueError, r"reward\.backbone\.checkpoint: .* does not fit reward\.backbone\.config"),
    "tokenizer mismatch": (lambda t, a: {"backbone": {**a["abs_backbone"], "tokenizer": _other_tokenizer(t)}},
                           ValueError, r"reward\.backbone\.tokenizer: .* has 25 tokens but the checkpoint's vocabulary has 23"),
    "ot map dimension": (lambda t, a: {"ot_map": _small_map(t)},
                         ValueError, r"reward\.ot_map: .* maps 8-d embeddings but the backbone's joint space is 16-d"),
    "ot map missing": (lambda t, a: {"ot_map": None}, ValueError, r"reward\.ot_map: required when use_ot_map"),
    "no backbone": (lambda t, a: {"backbone": None}, ValueError, r"reward\.backbone: required for kind pisces"),
    "backbone kind": (lambda t, a: {"backbone": {**a["abs_backbone"], "kind": "clip"}}, ValueError,
                      r"reward\.backbone\.kind: expected one of \('internvideo2', 'blip'\)"),
    "misplaced key": (lambda t, a: {"backbone": {"kind": "blip", "path": str(a["dir"]), "checkpoint": "x"}}, ValueError,
                      r"reward\.backbone\.checkpoint: unknown key for kind blip \(kind internvideo2 takes it\)"),
    "pot key": (lambda t, a: {"pot": {"mas": 0.9}}, ValueError, r"reward\.pot\.mas: unknown key"),
    "pot value": (lambda t, a: {"pot": {"mass": 1.5}}, ValueError, r"reward\.pot: .*mass"),
    "weights": (lambda t, a: {"weights": {"quality": 1.0, "motion": 1.0}}, ValueError, r"reward\.weights\.motion"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_reward_sections_name_the_field(case, assets, prepared, tmp_path):
    make, exc, pattern = BAD[case]
    overrides = make(tmp_path, assets)
    with pytest.raises(exc, match=pattern):
        cfg = load_config(str(train_yaml(tmp_path, assets, overrides)))
        build_reward(cfg.reward, torch.device("cpu"))


def test_reward_sections_outside_kind_pisces_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"config `reward.ot_map`: expected unset unless reward.kind is 'pisces'"):
        load_config(os.path.join(ROOT, "configs", "tiny_cd.yaml"), {"reward": {"ot_map": "x"}})


# -- one fusion: CD with per-prompt groups, GRPO normalised once ----------------------------------------
def _tiny(mode, tmp_path, **over):
    base = {"deepspeed": None, "output_dir": str(tmp_path / mode), "checkpoint_every": 0, "export_lora": False,
            "validation": {"every": 0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(os.path.join(ROOT, "configs", f"tiny_{mode}.yaml"), base)


class Spy(torch.nn.Module):
    """Wraps a reward and records what it was called with and returned."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, video, prompts):
        out = self.inner(video, prompts)
        self.calls.append((list(prompts), {k: v.detach().clone() for k, v in out.items()}))
        return out


def test_cd_group_fusion_gives_a_nonzero_reward_gradient(tmp_path):
    from pisces_fast.training.lora import lora_parameters
    from pisces_fast.training.trainer import Trainer

    with pytest.raises(ValueError, match="reward.group_size"):
        _tiny("cd", tmp_path, reward={"fusion": "group"})
    cfg = _tiny("cd", tmp_path, reward={"fusion": "group", "group_size": 3}, cd={"cd_weight": 0.0},
                model={"num_frames": 4}, data={"synthetic_size": 2, "batch_size": 2}, lora={"init": "gaussian"})
    tr = Trainer(cfg)
    tr.mode.reward = spy = Spy(tr.mode.reward)
    batch = [tr.dataset[0], tr.dataset[1]]
    assert batch[0]["caption"] != batch[1]["caption"]
    batch = {"video": torch.stack([b["video"] for b in batch]), "caption": [b["caption"] for b in batch]}
    torch.manual_seed(0)
    loss, metrics = tr.mode.loss(batch, 0)  # cd_weight 0: loss = -mean of the group-fused reward
    prompts, rewards = spy.calls[-1]
    p0, p1 = batch["caption"]
    assert prompts == [p0, p0, p0, p1, p1, p1]  # groups are prompts (3 generations each), not the whole batch
    assert abs(float(loss.detach())) < 1e-5  # normalised within each group: zero mean ...
    params = [p for _, p in lora_parameters(tr.gen.denoiser)]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = sum(float(g.norm()) for g in grads if g is not None)
    print(f"reward-gradient norm over the LoRA parameters: {norm:.3e}")
    assert norm > 1e-6  # ... but the detached statistics leave a gradient (∇r / std per prompt)


def test_grpo_advantages_equal_a_single_normalisation_by_hand(tmp_path):
    from pisces_fast.training.trainer import Trainer

    cfg = _tiny("grpo", tmp_path, reward={"weights": {"quality": 1.0, "semantic": 0.5}}, grpo={"adv_clip": 100.0})
    assert cfg.reward.fusion == "group"
    tr = Trainer(cfg)
    tr.mode.reward = spy = Spy(tr.mode.reward)
    torch.manual_seed(0)
    ro = tr.mode.rollout(["a red square moving right", "a blue square moving left"])
    prompts, rewards = spy.calls[-1]
    G = cfg.grpo.group_size
    assert prompts == ["a red square moving right"] * G + ["a blue square moving left"] * G

    def norm(x):
        g = x.double().view(2, G)
        return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)

    expected = norm(rewards["quality"]) + 0.5 * norm(rewards["semantic"])
    torch.testing.assert_close(ro["adv"].double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ro["adv"].double(), norm(expected), rtol=1e-3, atol=1e-3)  # not normalised twice
