"""Reward backbones on tiny random configs: BLIP ITM and the InternVideo2-style model.

Covers the protocol (features, positions), gradients to pixels, the OT patch (swap, restore,
OT-off == vanilla), masking of padding frames (BLIP's dropped cross-attention mask), the
InternVideo2 training losses, persistence and the official-checkpoint key mapping.
"""
import pytest
import torch
from transformers import BlipForImageTextRetrieval

from pisces_fast.ops import OTAttention
from pisces_fast.rewards import (
    BlipVideoBackbone,
    InternVideo2,
    InternVideo2Backbone,
    InternVideo2Config,
    POTConfig,
    SoftmaxAttention,
    build_word_tokenizer,
    load_official_checkpoint,
    patch_cross_attention,
    tiny_blip_config,
)
from pisces_fast.rewards.backbones.internvideo2 import interpolate_pos_embed

WORDS = "a red blue green circle square triangle moving left right up down".split()
PROMPTS = ["a red circle moving left", "a blue square moving up"]
# The reference OT backend: these tests check the patching, not the kernels (tested in tests/test_*ops*).
POT = POTConfig(backend="reference")


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def make_iv2(tokenizer, seed=0):
    torch.manual_seed(seed)
    return InternVideo2Backbone(InternVideo2(InternVideo2Config.tiny(vocab_size=len(tokenizer))), tokenizer).eval()


def make_blip(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(tiny_blip_config(len(tokenizer))).eval()
    return BlipVideoBackbone(model, tokenizer, num_frames=3)


@pytest.fixture(params=["internvideo2", "blip"])
def backbone(request, tokenizer):
    return make_iv2(tokenizer) if request.param == "internvideo2" else make_blip(tokenizer)


def video_batch(b=2, t=5, size=36, requires_grad=False):
    return torch.rand(b, t, 3, size, size + 4).requires_grad_(requires_grad)


def test_features_and_positions(backbone):
    text = backbone.encode_text(PROMPTS)
    video = backbone.encode_video(video_batch())
    t, h, w = video.grid
    assert video.prefix_tokens == 1
    assert video.tokens.shape[:2] == (2, 1 + t * h * w) and video.mask.all()
    assert video.frame_idx.shape == (1 + t * h * w,) and video.coords.shape == (1 + t * h * w, 2)
    # The [CLS] sits at the clip centre; the patches follow frame-major, row-major.
    assert video.frame_idx[0] == (t - 1) / 2 and video.frame_idx[1] == 0 and video.frame_idx[-1] == t - 1
    assert torch.equal(video.coords[1 + w], torch.tensor([1.0, 0.0]))
    for feats in (text, video):
        assert feats.embed.shape == (2, backbone.embed_dim)
        assert torch.allclose(feats.embed.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert text.mask.dtype == torch.bool and text.input_ids[0, 0] == backbone.tokenizer.cls_token_id
    logits = backbone.match_logits(text, video)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_match_probability_backpropagates_to_pixels(backbone):
    video = video_batch(requires_grad=True)
    text = backbone.encode_text(PROMPTS)
    with patch_cross_attention(backbone, POT):
        p = backbone.match_probability(text, backbone.encode_video(video))
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())
    p.sum().backward()
    assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0


def test_patch_swaps_and_restores(backbone):
    text = backbone.encode_text(PROMPTS)
    video = backbone.encode_video(video_batch())
    sites = backbone.fusion_cross_attentions()
    assert len(sites) == 2
    originals = [s.core for s in sites]
    assert all(isinstance(c, SoftmaxAttention) for c in originals)
    state_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    vanilla = backbone.match_logits(text, video)

    with patch_cross_attention(backbone, POT) as patch:
        assert patch.active and all(isinstance(s.core, OTAttention) and s.core.enabled for s in sites)
        assert len({id(s.core) for s in sites}) == len(sites)  # one core per layer
        with_ot = backbone.match_logits(text, video)
    assert all(s.core is c for s, c in zip(sites, originals))  # the very same objects are back
    assert not patch.active
    assert (with_ot - vanilla).abs().max() > 1e-6  # the OT fusion does change the features
    assert torch.equal(backbone.match_logits(text, video), vanilla)  # identical after restore
    state_after = backbone.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)

    with patch_cross_attention(backbone, POT, enabled=False):
        off = backbone.match_logits(text, video)
    torch.testing.assert_close(off, vanilla, rtol=0, atol=1e-6)  # "OT off" is vanilla attention


def test_patch_lifecycle_errors(tokenizer):
    bb = make_iv2(tokenizer)
    outer = patch_cross_attention(bb, POT)
    inner = patch_cross_attention(bb, POT, mass=1.0)
    with pytest.raises(RuntimeError, match="restore the later patch first"):
        outer.restore()
    inner.restore()
    outer.restore()
    assert all(isinstance(s.core, SoftmaxAttention) for s in bb.fusion_cross_attentions())
    with pytest.raises(RuntimeError, match="not applied"):
        outer.restore()
    with pytest.raises(ValueError, match="mass"):
        POTConfig(mass=1.5)
    with pytest.raises(TypeError, match="not a VideoTextBackbone"):
        patch_cross_attention(torch.nn.Linear(2, 2))


def test_blip_vanilla_equals_transformers_forward(tokenizer):
    """Our cross-attention override with the vanilla core reproduces BLIP's own forward (no padding)."""
    bb = make_blip(tokenizer)
    text = bb.encode_text(PROMPTS)
    video = bb.encode_video(video_batch())
    ours = bb.match_logits(text, video)
    hf = bb.model.text_encoder(input_ids=text.input_ids, attention_mask=text.mask.long(),
                               encoder_hidden_states=video.tokens).last_hidden_state
    torch.testing.assert_close(ours, bb.model.itm_head(hf[:, 0]), rtol=0, atol=1e-6)
    # The override is gone after the call: the transformers model is untouched.
    assert all("forward" not in vars(site) for site in bb.fusion_cross_attentions())


@pytest.mark.parametrize("use_pot", [False, True])
def test_padding_frames_are_masked(backbone, use_pot):
    """Outputs must not depend on the pixels of padding frames (BLIP drops its own mask: we mask)."""
    frame_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    video = video_batch()
    changed = video.clone()
    changed[1, 3:] = torch.rand_like(changed[1, 3:])
    text = backbone.encode_text(PROMPTS)

    def run(v, mask):
        feats = backbone.encode_video(v, mask)
        if use_pot:
            with patch_cross_attention(backbone, POT):
                return backbone.match_logits(text, feats), feats.embed
        return backbone.match_logits(text, feats), feats.embed

    logits_a, embed_a = run(video, frame_mask)
    logits_b, embed_b = run(changed, frame_mask)
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(embed_a, embed_b, rtol=0, atol=1e-6)
    # Sensitivity: without the mask the same pixel change does move the output.
    unmasked_a, _ = run(video, None)
    unmasked_b, _ = run(changed, None)
    assert (unmasked_a[1] - unmasked_b[1]).abs().max() > 1e-6


def test_bad_inputs(backbone):
    text = backbone.encode_text(PROMPTS)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        backbone.encode_video(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        backbone.encode_video(video_batch() * 2 - 1.5)
    nan_video = video_batch()
    nan_video[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        backbone.encode_video(nan_video)
    with pytest.raises(ValueError, match="frame_mask must have shape"):
        backbone.encode_video(video_batch(), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="every frame"):
        backbone.encode_video(video_batch(), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="list of strings"):
        backbone.encode_text("a red circle")
    video = backbone.encode_video(video_batch(b=3))
    with pytest.raises(ValueError, match="same size"):
        backbone.match_logits(text, video)


def test_internvideo2_training_losses(tokenizer):
    bb = make_iv2(tokenizer).train()
    model = bb.model
    ids, am = bb.tokenize(["a red circle", "a blue square moving up", "green triangle", "a red square"])
    pixels = torch.randn(4, 4, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = model.training_losses(pixels, ids, am, generator=g)
    assert set(out) == {"loss", "loss_vtc", "loss_vtm", "vtm_accuracy"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name in ("itm_head.weight", "temp", "vision_proj.weight", "text_proj.weight",
                 "vision_encoder.patch_embed.proj.weight", "text_encoder.encoder.layer.3.crossattention.self.key.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Duplicate videos (same idx) are positives for each other; uniform negatives also work.
    out = model.training_losses(pixels, ids, am, idx=torch.tensor([0, 0, 1, 2]), hard_negatives=False, generator=g)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model.training_losses(pixels[:1], ids[:1], am[:1])
    with pytest.raises(ValueError, match="non-matching"):
        model.training_losses(pixels[:2], ids[:2], am[:2], idx=torch.tensor([5, 5]))


def test_internvideo2_learns_a_batch(tokenizer):
    """A few optimizer steps on one batch lower both losses (the losses do train the model)."""
    bb = make_iv2(tokenizer).train()
    ids, am = bb.tokenize(["a red circle", "a blue square", "green triangle", "a red square"])
    pixels = torch.randn(4, 4, 3, 32, 32)
    opt = torch.optim.Adam(bb.model.parameters(), lr=1e-3)
    history = []
    for step in range(15):
        out = bb.model.training_losses(pixels, ids, am, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((float(out["loss_vtc"].detach()), float(out["loss_vtm"].detach())))
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < history[0][1]


def test_internvideo2_save_load_roundtrip(tokenizer, tmp_path):
    bb = make_iv2(tokenizer)
    bb.save_pretrained(tmp_path / "iv2")
    loaded = InternVideo2Backbone.from_pretrained(tmp_path / "iv2").eval()
    video = video_batch()
    a = bb.match_logits(bb.encode_text(PROMPTS), bb.encode_video(video))
    b = loaded.match_logits(loaded.encode_text(PROMPTS), loaded.encode_video(video))
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        InternVideo2.from_pretrained(tmp_path / "missing")


@torch.no_grad()
def test_internvideo2_fuse_can_return_each_fusion_layers_states(tokenizer):
    m = make_iv2(tokenizer).model
    enc = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    text, mask = m.encode_text(enc["input_ids"], enc["attention_mask"])
    pixels = torch.rand(len(PROMPTS), m.config.num_frames, 3, m.config.image_size, m.config.image_size)
    tokens, _, token_mask, grid = m.encode_vision(pixels)
    frame_idx, coords = m.video_positions(grid, tokens.device)
    plain = m.fuse(text, mask, tokens, token_mask, frame_idx, coords)
    out, states = m.fuse(text, mask, tokens, token_mask, frame_idx, coords, output_hidden_states=True)
    assert torch.equal(out, plain) and len(states) == m.config.fusion_layers and torch.equal(states[-1], out)
    assert not torch.equal(states[0], states[-1])


def _official_layout(model: InternVideo2) -> dict:
    """Our state dict renamed to the official stage-2 layout, plus training-only extras."""
    state = {}
    for k, v in model.state_dict().items():
        state[k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder.") else k] = v.clone()
    extras = {
        "text_encoder.cls.predictions.bias": torch.zeros(5),
        "vision_encoder.clip_decoder.0.head.weight": torch.zeros(2, 2),
        "vision_encoder.final_clip_decoder.head.weight": torch.zeros(2, 2),
        "vision_encoder.clip_pos_embed": torch.zeros(1, 3, 2),
        "text_encoder.bert.embeddings.position_ids": torch.arange(4)[None],
    }
    return {"module": {**state, **extras}}


def test_official_checkpoint_mapping(tokenizer, tmp_path):
    src = make_iv2(tokenizer, seed=1)
    torch.save(_official_layout(src.model), tmp_path / "stage2.pt")
    dst = make_iv2(tokenizer, seed=2)
    report = load_official_checkpoint(dst.model, tmp_path / "stage2.pt")
    assert not report.missing and not report.unexpected and len(report.ignored) == 5
    video = video_batch()
    a = src.match_logits(src.encode_text(PROMPTS), src.encode_video(video))
    b = dst.match_logits(dst.encode_text(PROMPTS), dst.encode_video(video))
    assert torch.equal(a, b)

    bad = _official_layout(src.model)
    bad["module"]["vision_encoder.something_new"] = torch.zeros(1)
    del bad["module"]["itm_head.weight"]
    with pytest.raises(ValueError, match="1 missing.*itm_head.weight.*1 unexpected"):
        load_official_checkpoint(dst.model, bad)
    report = load_official_checkpoint(dst.model, bad, strict=False)
    assert report.missing == ["itm_head.weight"]
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(dst.model, tmp_path / "nope.pt")


def test_official_checkpoint_with_fewer_frames_is_resampled(tokenizer):
    src = make_iv2(tokenizer)
    state = _official_layout(src.model)["module"]
    t, h, w = src.config.grid
    c = src.config.vision_width
    # A 2-frame checkpoint whose position embedding is constant over time.
    per_frame = torch.randn(1, 1, h * w, c)
    state["vision_encoder.pos_embed"] = torch.cat([torch.randn(1, 1, c), per_frame.expand(1, 2, h * w, c).reshape(1, -1, c)], 1)
    dst = make_iv2(tokenizer)
    report = load_official_checkpoint(dst.model, state)
    assert report.resized == ["vision_encoder.pos_embed"]
    pos = dst.model.vision_encoder.pos_embed.detach()
    assert pos.shape == (1, 1 + t * h * w, c)
    torch.testing.assert_close(pos[:, 1:].view(t, h * w, c), per_frame[0].expand(t, h * w, c))


def test_interpolate_pos_embed_linear_in_time():
    c = 3
    frames = torch.stack([torch.full((4, c), float(i)) for i in range(2)])  # values 0 and 1 over time
    pos = torch.cat([torch.zeros(1, 1, c), frames.reshape(1, 8, c)], 1)
    out = interpolate_pos_embed(pos, (2, 2, 2), (4, 2, 2))
    per_frame = out[0, 1:].view(4, 4, c)[:, 0, 0]
    assert torch.all(per_frame[1:] >= per_frame[:-1]) and per_frame[0] == 0 and per_frame[-1] == 1
    with pytest.raises(ValueError, match="entries"):
        interpolate_pos_embed(pos[:, :5], (2, 2, 2), (4, 2, 2))


def test_word_tokenizer():
    from pisces_fast.data.shapes import VOCAB

    tok = build_word_tokenizer(VOCAB)
    enc = tok(["A red circle, moving left", "zebra"], padding="longest")
    ids = enc["input_ids"]
    assert ids[0][0] == tok.cls_token_id == 2 and ids[0][len("a red circle , moving left".split()) + 1] == tok.sep_token_id
    assert tok.unk_token_id in ids[1] and tok.pad_token_id == 0
    assert tok.convert_ids_to_tokens(ids[0][1:4]) == ["a", "red", "circle"]
    with pytest.raises(ValueError, match="alphanumeric"):
        build_word_tokenizer(["t-shirt"])
    with pytest.raises(TypeError):
        build_word_tokenizer("red")


def test_blip_from_pretrained_local_directory(tokenizer, tmp_path):
    """The real-checkpoint path (``from_pretrained``) on a tiny model saved locally."""
    bb = make_blip(tokenizer)
    bb.model.save_pretrained(tmp_path / "blip")
    tokenizer.save_pretrained(str(tmp_path / "blip"))
    loaded = BlipVideoBackbone.from_pretrained(str(tmp_path / "blip"), num_frames=3)
    video = video_batch()
    a = bb.match_logits(bb.encode_text(PROMPTS), bb.encode_video(video))
    b = loaded.match_logits(loaded.encode_text(PROMPTS), loaded.encode_video(video))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not loaded.training
