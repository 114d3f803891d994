"""The procedural shapes world: captions, splits, determinism, rendering truth and hard negatives."""
import math

import numpy as np
import pytest
import torch

from pisces_fast.data import shapes as S


@pytest.fixture(scope="module")
def batch():
    return S.make_clips(12, split="train", seed=3)


@pytest.fixture(scope="module")
def specs():
    return S.sample_specs(400, "train", seed=1) + S.sample_specs(200, "heldout", seed=1)


# ---------------------------------------------------------------------------------------------- captions


def test_vocabulary_is_small_and_covers_every_caption(specs):
    assert len(S.VOCAB) < 60 and len(set(S.VOCAB)) == len(S.VOCAB)
    for spec in specs:
        words = S.tokenize_caption(S.caption_of(spec))
        assert set(words) <= set(S.VOCAB)
        assert len(words) <= S.MAX_CAPTION_WORDS
    # every template the sampler writes shows up, including the longest caption
    lengths = {len(S.tokenize_caption(s.caption)) for s in specs}
    assert S.MAX_CAPTION_WORDS in lengths
    assert {len(s.objects) for s in specs} == {1, 2, 3}
    assert any(s.relations for s in specs)


def test_captions_round_trip_through_parse_prompt(specs):
    for spec in specs:
        assert S.parse_prompt(S.caption_of(spec)) == spec


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a large red circle moving left", S.SceneSpec((S.ObjectSpec("circle", "red", "large", "left"),))),
        ("A blue square.", S.SceneSpec((S.ObjectSpec("square", "blue"),))),
        ("a triangle staying still", S.SceneSpec((S.ObjectSpec("triangle", motion="still"),))),
        (
            "a small white cross to the left of a large green diamond, both moving up",
            S.SceneSpec(
                (S.ObjectSpec("cross", "white", "small", "up"), S.ObjectSpec("diamond", "green", "large", "up")),
                (S.RelationSpec(0, "left of", 1),),
            ),
        ),
        (
            "a red circle moving left above a cyan square staying still",
            S.SceneSpec(
                (S.ObjectSpec("circle", "red", motion="left"), S.ObjectSpec("square", "cyan", motion="still")),
                (S.RelationSpec(0, "above", 1),),
            ),
        ),
        (
            "a red circle moving left, a green square moving up and a blue triangle staying still",
            S.SceneSpec(
                (
                    S.ObjectSpec("circle", "red", motion="left"),
                    S.ObjectSpec("square", "green", motion="up"),
                    S.ObjectSpec("triangle", "blue", motion="still"),
                )
            ),
        ),
        (
            "a red circle and a yellow diamond below a magenta cross",
            S.SceneSpec(
                (S.ObjectSpec("circle", "red"), S.ObjectSpec("diamond", "yellow"), S.ObjectSpec("cross", "magenta")),
                (S.RelationSpec(1, "below", 2),),
            ),
        ),
    ],
)
def test_parse_prompt_reads_every_form(caption, expected):
    spec = S.parse_prompt(caption)
    assert spec == expected
    assert S.parse_prompt(S.caption_of(spec)) == spec


@pytest.mark.parametrize(
    "caption, fragment",
    [
        ("a purple circle moving left", "purple"),
        ("a red hexagon", "hexagon"),
        ("a red circle moving sideways", "sideways"),
        ("red circle", "expected 'a'"),
        ("a red moving left", "a shape"),
        ("a red circle moving", "a direction"),
        ("a red circle, both moving up", "'both' needs exactly two objects"),
        ("a red circle a blue square", "','"),
        ("   ", "empty"),
    ],
)
def test_parse_prompt_errors_name_the_problem(caption, fragment):
    with pytest.raises(ValueError, match="caption") as info:
        S.parse_prompt(caption)
    assert fragment in str(info.value)


def test_parse_prompt_rejects_non_strings():
    with pytest.raises(TypeError, match="caption must be a str"):
        S.parse_prompt(3)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="ObjectSpec.shape"):
        S.ObjectSpec("hexagon")
    with pytest.raises(ValueError, match="ObjectSpec.color"):
        S.ObjectSpec("circle", color="purple")
    with pytest.raises(ValueError, match="RelationSpec.relation"):
        S.RelationSpec(0, "near", 1)
    with pytest.raises(ValueError, match="SceneSpec.relations refers to object 2"):
        S.SceneSpec((S.ObjectSpec("circle"),), (S.RelationSpec(0, "above", 2),))
    with pytest.raises(ValueError, match="SceneSpec.objects must not be empty"):
        S.SceneSpec(())
    with pytest.raises(ValueError, match="consecutive"):
        S.caption_of(S.SceneSpec((S.ObjectSpec("circle"),) * 3, (S.RelationSpec(0, "above", 2),)))
    spec = S.parse_prompt("a small red circle to the left of a large blue square, both moving up")
    assert S.SceneSpec.from_dict(spec.to_dict()) == spec


# ---------------------------------------------------------------------------------------------- splits


def test_train_and_heldout_prompts_are_disjoint():
    train = S.sample_specs(1500, "train", seed=0)
    heldout = S.sample_specs(400, "heldout", seed=0)
    train_captions = {s.caption for s in train}
    heldout_captions = {s.caption for s in heldout}
    assert not train_captions & heldout_captions
    assert all(S.split_of(s) == "train" for s in train)
    assert all(S.split_of(s) == "heldout" for s in heldout)
    # held-out (color, shape) pairs never appear in training
    train_pairs = {(o.color, o.shape) for s in train for o in s.objects}
    assert not train_pairs & S.HELDOUT_PAIRS
    # the held-out set has both kinds: unseen pairs and unseen prompts made of seen pairs
    uses_pair = [any((o.color, o.shape) in S.HELDOUT_PAIRS for o in s.objects) for s in heldout]
    assert 0.3 < np.mean(uses_pair) < 0.95
    heldout_pairs = {(o.color, o.shape) for s in heldout for o in s.objects}
    assert S.HELDOUT_PAIRS <= heldout_pairs
    # every word of the vocabulary is seen in training (held-out prompts need no new words)
    train_words = {w for c in train_captions for w in S.tokenize_caption(c)}
    assert train_words == set(S.VOCAB)


def test_unique_prompt_sets():
    specs = S.sample_specs(64, "heldout", seed=5, unique=True)
    assert len({s.caption for s in specs}) == 64
    assert specs == S.sample_specs(64, "heldout", seed=5, unique=True)
    with pytest.raises(ValueError, match="split"):
        S.sample_specs(4, "test")


# ---------------------------------------------------------------------------------------------- clips


def test_clip_format(batch):
    v = batch.videos
    assert v.shape == (12, 8, 3, 32, 32) and v.dtype == torch.float32
    assert v.min() >= 0 and v.max() <= 1
    assert len(batch.captions) == len(batch.specs) == len(batch.layouts) == 12
    assert all(s.caption == c for s, c in zip(batch.specs, batch.captions))
    assert {lay.background for lay in S.make_clips(40, seed=0).layouts} == {"plain", "textured"}


def test_configurable_geometry():
    cfg = S.WorldConfig(num_frames=5, height=48, width=40)
    b = S.make_clips(3, seed=0, config=cfg)
    assert b.videos.shape == (3, 5, 3, 48, 40)


def test_deterministic_by_seed_and_independent_of_batching(batch):
    again = S.make_clips(12, split="train", seed=3)
    assert torch.equal(batch.videos, again.videos) and batch.captions == again.captions
    other = S.make_clips(12, split="train", seed=4)
    assert not torch.equal(batch.videos, other.videos)
    part = S.make_clips(indices=[7, 2], split="train", seed=3)
    assert torch.equal(part.videos, batch.videos[[7, 2]])
    assert part.captions == [batch.captions[7], batch.captions[2]]
    shifted = S.make_clips(4, split="train", seed=3, start=8)
    assert torch.equal(shifted.videos, batch.videos[8:])
    assert S.make_clips(12, split="heldout", seed=3).captions != batch.captions


def test_dataset_matches_make_clips(batch):
    ds = S.ShapesDataset(12, split="train", seed=3)
    item = ds[5]
    assert torch.equal(item["video"], batch.videos[5]) and item["caption"] == batch.captions[5]
    assert ds.spec(5) == batch.specs[5]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    first = next(iter(loader))
    assert first["video"].shape == (4, 8, 3, 32, 32)
    assert torch.equal(first["video"], batch.videos[:4])
    with pytest.raises(IndexError):
        ds[12]


def test_render_matches_layout_truth(batch):
    T = 8
    for video, layout, spec in zip(batch.videos, batch.layouts, batch.specs):
        for obj, want in zip(layout.objects, spec.objects):
            for key in ("shape", "color", "size", "motion"):
                if getattr(want, key) is not None:
                    assert getattr(obj, key) == getattr(want, key)
            centers = obj.centers(T)
            for t in (0, T - 1):
                x, y = centers[t]
                pixel = video[t, :, int(y), int(x)]  # the box center lies inside every shape
                assert torch.allclose(pixel, torch.tensor(obj.rgb, dtype=pixel.dtype), atol=1e-5)
            move = centers[-1] - centers[0]
            direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[obj.motion]
            assert np.allclose(np.sign(np.round(move, 6)), direction)
            # inside the frame in every frame
            assert np.all(centers - obj.half_size >= 0) and np.all(centers[:, 0] + obj.half_size <= 32)
        for rel in spec.relations:
            a = layout.objects[rel.subject].centers(T)
            b = layout.objects[rel.reference].centers(T)
            dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
            ok = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[rel.relation]
            assert ok.all()
        # objects never overlap: boxes keep the configured gap in every frame
        objs = layout.objects
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                d = np.abs(objs[i].centers(T) - objs[j].centers(T))
                need = objs[i].half_size + objs[j].half_size + S.WorldConfig().gap - 1e-9
                assert np.all((d[:, 0] >= need) | (d[:, 1] >= need))


@pytest.mark.parametrize(
    "shape, area",
    [("circle", math.pi), ("square", 4.0), ("triangle", 2.0), ("diamond", 2.0), ("cross", 2 * (2 * 0.8) - 0.8**2)],
)
def test_rasterisation_is_antialiased_and_area_exact(shape, area):
    """Coverage integrates to the analytic area, edges take intermediate values, and sub-pixel motion moves
    the coverage centroid linearly (no pixel snapping)."""
    half = 6.3
    layout = S.SceneLayout(
        objects=(S.ObjectLayout(shape, "white", (1.0, 1.0, 1.0), "large", half, "right", (12.2, 15.7), (0.37, 0.0)),),
        background="plain",
        background_image=np.zeros((3, 32, 32), dtype=np.float32),
        num_frames=8,
        height=32,
        width=32,
    )
    coverage = S.render_layouts([layout])[0, :, 0]  # (T, H, W), white on black = coverage
    assert torch.allclose(coverage.sum(dim=(1, 2)), torch.full((8,), area * half * half), rtol=0.02)
    partial = ((coverage > 0.02) & (coverage < 0.98)).sum(dim=(1, 2))
    assert (partial > 4).all()  # an anti-aliased rim, not a binary mask
    xs = torch.arange(32, dtype=torch.float32) + 0.5
    cx = (coverage.sum(dim=1) * xs).sum(dim=1) / coverage.sum(dim=(1, 2))
    steps = cx[1:] - cx[:-1]
    # pixel-centre centroids of exact coverage still carry a phase error of a few hundredths of a pixel
    assert torch.allclose(steps, torch.full_like(steps, 0.37), atol=0.05)


def test_world_config_validation():
    with pytest.raises(ValueError, match="num_frames"):
        S.WorldConfig(num_frames=1)
    with pytest.raises(ValueError, match="height/width"):
        S.WorldConfig(height=8)
    with pytest.raises(ValueError, match="small_size"):
        S.WorldConfig(small_size=0.4, large_size=0.3)
    with pytest.raises(ValueError, match="two large objects"):
        S.WorldConfig(large_size=0.45)
    with pytest.raises(ValueError, match="template_probs"):
        S.WorldConfig(template_probs=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(TypeError, match="num_frames"):
        S.WorldConfig(num_frames=8.0)


def test_make_clips_input_errors():
    with pytest.raises(ValueError, match="n must be a positive int"):
        S.make_clips(0)
    with pytest.raises(ValueError, match="split"):
        S.make_clips(2, split="val")
    with pytest.raises(ValueError, match="seed"):
        S.make_clips(2, seed=-1)
    with pytest.raises(ValueError, match="caption"):
        S.make_clips(specs=["a purple circle"])
    with pytest.raises(TypeError, match=r"specs\[0\]"):
        S.make_clips(specs=[42])
    b = S.make_clips(specs=["a large red circle moving left", S.parse_prompt("a blue square")], seed=1)
    assert b.videos.shape[0] == 2 and b.captions[0] == "a large red circle moving left"


# ---------------------------------------------------------------------------------------------- negatives


def test_hard_negatives_change_exactly_one_kind(specs):
    rng = np.random.default_rng(0)
    seen = set()
    for spec in specs[:300]:
        for neg in S.hard_negatives(spec, rng):
            seen.add(neg.kind)
            assert neg.caption != spec.caption
            assert S.parse_prompt(neg.caption) == neg.spec
            assert not any((o.color, o.shape) in S.HELDOUT_PAIRS for o in neg.spec.objects) or any(
                (o.color, o.shape) in S.HELDOUT_PAIRS for o in spec.objects
            )
            a, b = spec.objects, neg.spec.objects
            if neg.kind == "count":
                assert abs(len(a) - len(b)) == 1
                continue
            assert len(a) == len(b)
            changed = {
                key
                for x, y in zip(a, b)
                for key in ("shape", "color", "size", "motion")
                if getattr(x, key) != getattr(y, key)
            }
            expected = {"color": {"color"}, "shape": {"shape"}, "size": {"size"}, "direction": {"motion"},
                        "relation": set(), "binding": {"color"}}[neg.kind]
            assert changed == expected, (neg.kind, spec.caption, neg.caption)
            if neg.kind == "relation":
                assert spec.relations != neg.spec.relations
            if neg.kind == "binding":
                assert sorted(o.color for o in a) == sorted(o.color for o in b)
    assert seen == set(S.NEGATIVE_KINDS)


def test_hard_negatives_input_errors():
    spec = S.parse_prompt("a red circle moving left")
    assert {n.kind for n in S.hard_negatives(spec, 0)} == {"color", "shape", "direction", "count"}
    with pytest.raises(ValueError, match="kinds"):
        S.hard_negatives(spec, 0, kinds=["texture"])
    with pytest.raises(TypeError, match="spec"):
        S.hard_negatives("a red circle", 0)
