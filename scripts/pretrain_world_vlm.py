"""Pretrain the shapes world's video-text model (the reward backbone the embedded world ships).

A small InternVideo2-stage-2-style model (``pisces_fast.rewards.backbones.InternVideo2``: a video ViT over
spatio-temporal patches of 8x32x32 clips -- tubelets of 4 frames (2x4x4 tokens, the default) or 2 (4x4x4, the
shipped model) of 8x8 pixels -- plus [CLS], a BERT whose last 2 (shipped: 4) layers cross-attend to the video
tokens, a VTM head, projections into a 64-d joint space) is trained on the train split of ``pisces_fast.data.shapes``
with InternVideo2's two stage-2 losses:

* video-text contrastive (VTC), both directions; the video->text side also contrasts every clip against
  an attribute-swapped caption of each clip in the batch (``shapes.hard_negatives``: color, shape, size,
  direction, relation, binding, count; the hard kinds drawn more often), so the joint space must encode
  *which* attribute is where;
* video-text matching (VTM) on the [CLS] of the fusion layers: the positive pair, an in-batch negative video
  (sampled by contrastive similarity, InternVideo2's ``vtm_hard_neg``) and a negative caption -- the
  attribute-swapped one for half of the clips, else an in-batch caption sampled by similarity -- class-balanced.

Augmentations that keep a clip inside the world: horizontal flip (left <-> right in motions and relations)
and time reversal (every motion reversed); an augmented clip is used only if its caption stays in the train
split. Held-out prompts (unseen color-shape pairs and a hashed 10% of the rest) are never trained on, not even
as negative captions.

At the end it measures on held-out clips: text->video and video->text R@1 among batches of 64, the VTM
probability of matched vs attribute-swapped captions (ranking and 0.5-threshold accuracy, per kind), the
same ranking with the contrastive cosine, and the PISCES rewards (plain cosine "quality" and VTM "semantic",
vanilla and partial-OT attention) of the right clip vs a wrong clip (a clip of the swapped caption).

    python scripts/pretrain_world_vlm.py --out pisces_fast/assets/world/vlm

The shipped model is made in four runs (~7 + 13 + 13 + 15 min on 2 cores). The first is the command above with
``--out STAGE0``: tubelet 4, whose text tower the shipped generator conditions on. The next two keep that text tower
fixed, halve the tubelet (four temporal positions) and add the caption-facts objective (``CaptionFactHeads``: from the
video tokens, predict each named object's motion, shape and size and each stated relation -- the caption parsed,
nothing beyond the text) and counterfactual clips as VTM video negatives (the same scene with its direction or relation
swapped, ``counterfactual_spec``). The second starts the video encoder afresh (the tubelet-4 one, fine-tuned, learnt
no motion in 600 steps even with the facts loss; a fresh one reads motion from step ~500), the third continues it at
half the learning rate. The fourth frees the text tower (the reward's text encoder is not the generator's, as in the
paper), adds two fusion layers on top of the saved two (``init_from_saved``) and reads the caption's facts from the
matching head itself (``--matching_fact_weight``): without it the head stayed blind to spatial relation (held-out
0.49-0.60 in four runs, whatever the negatives), with it relation counterfactuals are rejected from step ~450:

    python scripts/pretrain_world_vlm.py --init_from STAGE0 --reinit_vision --freeze_text_tower --tubelet_size 2 \
        --counterfactual_prob 0.5 --fact_weight 1 --out STAGE1
    python scripts/pretrain_world_vlm.py --init_from STAGE1 --freeze_text_tower --tubelet_size 2 \
        --counterfactual_prob 0.5 --fact_weight 1 --lr 5e-4 --warmup 30 --out STAGE2
    python scripts/pretrain_world_vlm.py --init_from STAGE2 --tubelet_size 2 --text_depth 6 --fusion_layers 4 \
        --counterfactual_prob 0.5 --counterfactual_kinds relation --negative_weight relation=10 --fact_weight 1 \
        --matching_fact_weight 1 --lr 5e-4 --warmup 30 --out pisces_fast/assets/world/vlm

writes ``config.json`` + ``model.safetensors`` + tokenizer files (``InternVideo2Backbone.from_pretrained``
reads them) and ``training_summary.json`` into ``--out``, and curves/metrics into ``--report_dir``.
Training is resumable: ``--resume`` continues from ``<report_dir>/checkpoint`` (written atomically every
``--save_every`` steps). Every random choice is a function of ``(--seed, step)``, so a resumed run matches an
uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pisces_fast.data import shapes as S
from pisces_fast.rewards.backbones.internvideo2 import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    InternVideo2,
    InternVideo2Backbone,
    InternVideo2Config,
    interpolate_pos_embed,
)
from pisces_fast.rewards.backbones.preprocess import prepare_video
from pisces_fast.rewards.tokenizer import build_word_tokenizer

# Longest caption: 17 words (commas included) + [CLS] + [SEP] = 19 tokens.
MAX_TEXT_LEN = 24
NEGATIVE_KINDS = S.NEGATIVE_KINDS
# How often each kind of attribute swap is drawn as a clip's negative caption: the kinds that need the whole
# clip (motion direction, spatial relation) or binding are drawn more, the ones one patch shows (color,
# size, count) less -- without this weighting a short run learns the easy kinds only.
NEGATIVE_WEIGHTS = {"color": 1.0, "shape": 2.0, "size": 1.0, "direction": 3.0, "relation": 3.0, "binding": 2.0, "count": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pisces_fast/assets/world/vlm", help="where the model is saved (package assets)")
    p.add_argument("--report_dir", default="outputs/world_vlm", help="curves, metrics and the resumable checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--pool_size", type=int, default=6144, help="train clips rendered once (x4 with the augmentations)")
    p.add_argument("--eval_clips", type=int, default=512, help="held-out clips for the final metrics")
    p.add_argument("--reward_pairs", type=int, default=96, help="(right, wrong) clip pairs scored with PiscesRewards")
    p.add_argument("--width", type=int, default=128, help="vision and text width")
    p.add_argument("--vision_depth", type=int, default=4)
    p.add_argument("--text_depth", type=int, default=4, help="text layers, the last --fusion_layers cross-attend")
    p.add_argument("--fusion_layers", type=int, default=2)
    p.add_argument("--embed_dim", type=int, default=64)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--tubelet_size", type=int, default=4,
                   help="frames per token (4, stage 0 of the shipped model: 2x4x4 tokens + [CLS] = 33; 2, the shipped "
                        "model: 4x4x4 + [CLS] = 65, four temporal positions instead of two)")
    p.add_argument("--counterfactual_prob", type=float, default=0.0,
                   help="share of VTM video negatives that are the clip's counterfactual (its direction or relation "
                        "swapped, rendered with the same layout seed) instead of an in-batch clip; 0 renders no "
                        "counterfactuals (stage 0 of the shipped model; its later stages use 0.5)")
    p.add_argument("--counterfactual_kinds", nargs="+", default=["direction", "relation"], choices=["direction", "relation"],
                   help="what a counterfactual clip swaps (drawn among these for each clip)")
    p.add_argument("--negative_weight", action="append", default=[], metavar="KIND=W",
                   help="how often an attribute swap of KIND is drawn as a clip's negative caption, relative to the "
                        f"others (repeatable; defaults {NEGATIVE_WEIGHTS})")
    p.add_argument("--quality_negative_prob", type=float, default=0.0,
                   help="share of clips that also enter the text->video contrast as a degraded copy (blur, pixel noise, "
                        "brightness flicker, frame shuffle, at random strengths; ``degrade``) that no caption matches, so "
                        "the joint-space cosine -- the quality reward -- ranks a clean clip above its degraded copy; 0: none")
    p.add_argument("--init_from", default=None,
                   help="start from a saved world VLM (e.g. one with tubelet 4): same widths/depths; a longer tubelet's "
                        "patch kernel is folded onto the shorter one and the position embedding resampled in time")
    p.add_argument("--reinit_vision", action="store_true",
                   help="with --init_from: take only the text tower (and fusion layers) from the saved model and start "
                        "the video encoder and its projection afresh (a saved encoder's features can be slow to unlearn)")
    p.add_argument("--freeze_text_tower", action="store_true",
                   help="with --init_from: keep the text-only layers (embeddings + the layers before fusion) fixed, so "
                        "the shipped generator, which conditions on a copy of them, still matches the VLM exactly")
    p.add_argument("--vtc_weight", type=float, default=1.0,
                   help="weight of the contrastive loss against the matching loss (1: the shipped model; 0 trains the "
                        "matching head alone, e.g. on counterfactuals)")
    p.add_argument("--matching_fact_weight", type=float, default=0.0,
                   help="weight of the caption-facts read-outs from the matching head (``matching_fact_targets``), over "
                        "every (clip, caption) pair the matching loss sees, mismatched ones included: half-way through "
                        "the fusion layers each caption word naming a colour predicts that object's motion, shape and "
                        "size *in the clip*, and the subject's and reference's words together their relation in the "
                        "clip; one layer before the end the subject's word predicts whether that relation is the "
                        "stated one. Why: with the matching loss alone the fusion cross-attention stays diffuse (a bag "
                        "of tokens: colour, count, size, motion, but not which object is where), and 'stated relation "
                        "== shown relation' is an XOR of a word and the geometry, whose first-order gradients vanish, "
                        "so the head stays blind to binding and relation. 0: off (the first three runs of the shipped "
                        "model)")
    p.add_argument("--fact_weight", type=float, default=0.0,
                   help="weight of the caption-facts loss: from the video tokens, predict what the clip's own caption "
                        "states about each object (named by its colour, unique in a scene): its motion, shape and size, "
                        "and the relation between each related pair (``CaptionFactHeads``); 0: off (stage 0 of the "
                        "shipped model; its later stages use 1). The targets are the "
                        "caption parsed, no information beyond the text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from <report_dir>/checkpoint")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------
# data: a rendered pool of train clips, augmented inside the world
# ------------------------------------------------------------------------------------------------------
_FLIP_H = {"left": "right", "right": "left"}
_REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_FLIP_RELATION = {"left of": "right of", "right of": "left of"}


def flip_spec(spec: S.SceneSpec) -> S.SceneSpec:
    """The spec of the horizontally mirrored clip (all five shapes are mirror-symmetric)."""
    objects = tuple(replace(o, motion=_FLIP_H.get(o.motion, o.motion)) for o in spec.objects)
    relations = tuple(replace(r, relation=_FLIP_RELATION.get(r.relation, r.relation)) for r in spec.relations)
    return S.SceneSpec(objects, relations)


def reverse_spec(spec: S.SceneSpec) -> S.SceneSpec:
    """The spec of the time-reversed clip (constant velocities, so every motion reverses)."""
    return S.SceneSpec(tuple(replace(o, motion=_REVERSE.get(o.motion, o.motion)) for o in spec.objects), spec.relations)


def augment(video: torch.Tensor, spec: S.SceneSpec, flip: bool, reverse: bool, cf_video=None, cf_spec=None):
    """Apply the chosen augmentations to one clip ``(T, 3, H, W)`` and, alike, to its counterfactual; skip any
    that would leave the train split for either. Returns ``(video, spec, cf_video, cf_spec)``."""
    for chosen, spec_fn, dim in ((flip, flip_spec, -1), (reverse, reverse_spec, 0)):
        if not chosen:
            continue
        new = spec_fn(spec)
        new_cf = spec_fn(cf_spec) if cf_spec is not None else None
        if S.split_of(new) == "train" and (new_cf is None or S.split_of(new_cf) == "train"):
            video, spec = video.flip(dim), new
            if new_cf is not None:
                cf_video, cf_spec = cf_video.flip(dim), new_cf
    return video, spec, cf_video, cf_spec


def counterfactual_spec(spec: S.SceneSpec, rng: np.random.Generator,
                        kinds=("direction", "relation")) -> S.SceneSpec | None:
    """The clip's spec with its motion direction or its spatial relation swapped (train split only), or None.

    Rendered with the clip's own layout seed, the counterfactual shares its background, colours and sizes: the
    pair differs in *where things go or sit*, the two kinds a per-patch feature cannot tell apart."""
    options = [n for n in S.hard_negatives(spec, rng, kinds=tuple(kinds)) if S.split_of(n.spec) == "train"]
    if not options:
        return None
    return options[int(rng.integers(len(options)))].spec


QUALITY_DEGRADATIONS = ("blur", "noise", "flicker", "shuffle")


def degrade(video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One clip ``(T, 3, H, W)`` degraded along one quality axis at a random strength (``pisces_fast.training.
    distortions``): blur sigma U(0.4, 2), pixel noise std U(0.02, 0.15), brightness flicker U(0.05, 0.3), or a
    frame shuffle (a block of frames or all of them). The strengths are drawn from ranges, so the cosine learns a
    graded signal rather than one operator's fingerprint."""
    from pisces_fast.training import distortions as D

    kind = QUALITY_DEGRADATIONS[int(rng.integers(len(QUALITY_DEGRADATIONS)))]
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    if kind == "blur":
        return D.gaussian_blur(video, float(rng.uniform(0.4, 2.0)))
    if kind == "noise":
        return D.add_noise(video, float(rng.uniform(0.02, 0.15)), generator=gen)
    if kind == "flicker":
        return D.brightness_flicker(video, float(rng.uniform(0.05, 0.3)), generator=gen)
    if rng.random() < 0.5:
        return D.shuffle_blocks(video[None], 1.0, gen)[0]
    return D.shuffle_frames(video, generator=gen)


def render_pool(n: int, split: str, seed: int, chunk: int = 256, progress: bool = True, counterfactuals: bool = True,
                counterfactual_kinds=("direction", "relation")):
    """``n`` clips of ``split`` as uint8 ``(n, T, 3, H, W)`` (4x less memory than float) with their specs, and
    for each its counterfactual clip (``counterfactual_spec``; a zero clip and ``None`` where there is none)."""
    videos, specs, cf_videos, cf_specs = [], [], [], []
    for start in tqdm(range(0, n, chunk), desc=f"render {split} clips", disable=not progress):
        batch = S.make_clips(min(chunk, n - start), split=split, seed=seed, start=start)
        videos.append((batch.videos * 255).round().to(torch.uint8))
        specs.extend(batch.specs)
        rng = np.random.default_rng([seed, 404, start])
        cf = [counterfactual_spec(spec, rng, counterfactual_kinds) if counterfactuals else None for spec in batch.specs]
        cf_video = torch.zeros_like(videos[-1])
        have = [k for k, c in enumerate(cf) if c is not None]
        if have:
            rendered = S.make_clips(specs=[cf[k] for k in have], split=split, seed=seed,
                                    indices=[batch.indices[k] for k in have]).videos
            cf_video[torch.tensor(have)] = (rendered * 255).round().to(torch.uint8)
        cf_videos.append(cf_video)
        cf_specs.extend(cf)
    return torch.cat(videos), specs, torch.cat(cf_videos), cf_specs


def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, 101, step])


def make_batch(pool, batch_size: int, rng: np.random.Generator, quality_negative_prob: float = 0.0,
               negative_weights: dict | None = None):
    """A batch of (clip, caption, attribute-swapped caption, counterfactual clip or None, degraded clip or None), all
    drawn from ``rng``."""
    pool_videos, pool_specs, cf_videos, cf_specs = pool
    idx = rng.choice(len(pool_specs), size=batch_size, replace=False)
    videos, captions, negatives, counterfactuals, cf_captions, degraded = [], [], [], [], [], []
    for i in idx:
        cf = cf_videos[i].float() / 255.0 if cf_specs[i] is not None else None
        video, spec, cf, cf_spec = augment(pool_videos[i].float() / 255.0, pool_specs[i], rng.random() < 0.5,
                                           rng.random() < 0.5, cf, cf_specs[i])
        options = S.hard_negatives(spec, rng)  # default forbids held-out color-shape pairs even in negatives
        weights = np.array([(negative_weights or NEGATIVE_WEIGHTS)[o.kind] for o in options], dtype=np.float64)
        videos.append(video)
        captions.append(S.caption_of(spec))
        negatives.append(options[int(rng.choice(len(options), p=weights / weights.sum()))].caption)
        counterfactuals.append(cf)
        cf_captions.append(S.caption_of(cf_spec) if cf_spec is not None else None)
        degraded.append(degrade(video, rng) if quality_negative_prob > 0 and rng.random() < quality_negative_prob else None)
    return torch.stack(videos), captions, negatives, counterfactuals, cf_captions, degraded


# ------------------------------------------------------------------------------------------------------
# model and losses
# ------------------------------------------------------------------------------------------------------
def build_model(args, vocab_size: int) -> InternVideo2:
    cfg = InternVideo2Config(
        image_size=32, patch_size=args.patch_size, num_frames=8, tubelet_size=args.tubelet_size,
        vision_width=args.width, vision_depth=args.vision_depth, vision_heads=4, vision_mlp_ratio=2.0,
        layerscale_init=0.1, pool_dim=args.width, pool_heads=4,
        vocab_size=vocab_size, text_width=args.width, text_depth=args.text_depth, text_heads=4,
        text_intermediate=2 * args.width, max_position_embeddings=32, fusion_layers=args.fusion_layers,
        max_text_len=MAX_TEXT_LEN, embed_dim=args.embed_dim, temp_init=0.07,
    )
    return InternVideo2(cfg)


def init_from_saved(model: InternVideo2, directory: str) -> None:
    """Load a saved world VLM into ``model`` whose tubelet may be shorter and whose matching head may be deeper.

    The patch kernel ``W`` over ``t_old`` frames becomes ``W'_j = sum_{k = j mod t_new} W_k`` over ``t_new``
    frames, so on a static clip every new token equals the old token (the old model's features are kept while
    time gets finer); the temporal position embedding is resampled linearly (``interpolate_pos_embed``).

    With more ``--fusion_layers`` (and ``--text_depth`` grown by as many, so the text-only layers are the same),
    the saved fusion layers keep their place and the new ones go on top, their three output projections
    zero-initialised: each new sub-layer then adds nothing to its residual stream at the start, so the loaded
    model's matching head is where training starts from (up to the new layers' LayerNorms).
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as fh:
        old_cfg = InternVideo2Config.from_dict({k: v for k, v in json.load(fh).items() if k != "kind"})
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    t_old, t_new = old_cfg.tubelet_size, model.config.tubelet_size
    if t_old % t_new:
        raise ValueError(f"--init_from {directory}: tubelet {t_old} cannot be folded onto tubelet {t_new}")
    key = "vision_encoder.patch_embed.proj.weight"
    if key not in state:
        raise ValueError(f"--init_from {directory}: no {key} in the checkpoint")
    w = state[key]
    state[key] = torch.stack([w[:, :, j::t_new].sum(2) for j in range(t_new)], dim=2)
    pos = "vision_encoder.pos_embed"
    state[pos] = interpolate_pos_embed(state[pos], old_cfg.grid, model.config.grid)
    own = model.state_dict()
    if model.config.fusion_layers < old_cfg.fusion_layers or model.config.fusion_start != old_cfg.fusion_start:
        raise ValueError(
            f"--init_from {directory}: the saved model has {old_cfg.text_depth} text layers, the last "
            f"{old_cfg.fusion_layers} fusion; a model made from it keeps its {old_cfg.fusion_start} text-only layers and "
            f"may add fusion layers on top (--text_depth {old_cfg.text_depth} + N --fusion_layers "
            f"{old_cfg.fusion_layers} + N), got --text_depth {model.config.text_depth} "
            f"--fusion_layers {model.config.fusion_layers}")
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"--init_from {directory}: incompatible tensors {bad[:5]} (widths/depths must match)")
    new_layers = tuple(f"text_encoder.encoder.layer.{i}." for i in range(old_cfg.text_depth, model.config.text_depth))
    missing = [k for k in own if k not in state and not k.startswith(new_layers)]
    if missing:
        raise ValueError(f"--init_from {directory}: the checkpoint lacks {missing[:5]}")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i in range(old_cfg.text_depth, model.config.text_depth):
            layer = model.text_encoder.encoder.layer[i]
            for out in (layer.attention.output, layer.crossattention.output, layer.output):
                out.dense.weight.zero_()
                out.dense.bias.zero_()


_COLOR_INDEX = {c: k for k, c in enumerate(S.COLORS)}
_FACT_GROUPS = (  # (name, slots, classes): per colour, or per ordered pair of colours for relations
    ("motion", len(S.COLORS), len(S.MOTIONS)),
    ("shape", len(S.COLORS), len(S.SHAPES)),
    ("size", len(S.COLORS), len(S.SIZES)),
    ("relation", len(S.COLORS) ** 2, len(S.RELATIONS)),
)


def caption_fact_targets(captions: list) -> dict:
    """What each caption states, as class targets per colour slot (-100 where it states nothing).

    Colours are distinct within a scene (``shapes.sample_spec``), so an object is named by its colour:
    ``motion[i, c]`` / ``shape[i, c]`` / ``size[i, c]`` of the ``c``-coloured object of caption ``i``, and
    ``relation[i, a * C + b]`` the relation of colour ``a`` to colour ``b`` (stated both ways: "A left of B"
    is also "B right of A")."""
    out = {name: torch.full((len(captions), slots), -100, dtype=torch.long) for name, slots, _ in _FACT_GROUPS}
    for i, caption in enumerate(captions):
        spec = S.parse_prompt(caption)
        for obj in spec.objects:
            if obj.color is None:
                continue
            c = _COLOR_INDEX[obj.color]
            out["shape"][i, c] = S.SHAPES.index(obj.shape)
            if obj.motion is not None:
                out["motion"][i, c] = S.MOTIONS.index(obj.motion)
            if obj.size is not None:
                out["size"][i, c] = S.SIZES.index(obj.size)
        for rel in spec.relations:
            a, b = spec.objects[rel.subject].color, spec.objects[rel.reference].color
            if a is None or b is None:
                continue
            a, b = _COLOR_INDEX[a], _COLOR_INDEX[b]
            out["relation"][i, a * len(S.COLORS) + b] = S.RELATIONS.index(rel.relation)
            out["relation"][i, b * len(S.COLORS) + a] = S.RELATIONS.index(S.CONVERSE_RELATION[rel.relation])
    return out


def _stated_relation(caption: str):
    """(subject colour, reference colour, relation) indices of the caption's first relation, or None where it
    states none between coloured objects."""
    spec = S.parse_prompt(caption)
    if not spec.relations:
        return None
    rel = spec.relations[0]
    a, b = spec.objects[rel.subject].color, spec.objects[rel.reference].color
    if a is None or b is None:
        return None
    return _COLOR_INDEX[a], _COLOR_INDEX[b], S.RELATIONS.index(rel.relation)


def matching_fact_targets(video_captions: list, texts: list, text_ids: torch.Tensor, color_ids: torch.Tensor) -> dict:
    """What each (clip, caption) pair's clip shows about the objects the caption names -- the clip described by
    ``video_captions[i]``, the caption ``texts[i]`` with token ids ``text_ids[i]`` (``color_ids[c]``: the token id of
    colour ``c``).

    Returns ``motion`` / ``shape`` / ``size`` ``(P, N)``: at each token naming a colour, that object's attribute in
    the clip (-100 elsewhere, or where the clip's caption does not state it); ``relation`` ``(P,)``: the clip's
    relation of the caption's subject (by colour) to its reference (-100 where the caption states no relation
    between coloured objects or the clip does not relate those two colours), with ``subject_pos`` /
    ``reference_pos`` ``(P,)`` the positions of their colour words (0 where none); and ``agreement`` ``(P,)``: 1
    where that relation is the one the caption states, 0 where not, -100 where none. Each distinct caption is
    parsed once (a batch pairs each with several clips)."""
    clip_rows = {c: k for k, c in enumerate(dict.fromkeys(video_captions))}
    shown = caption_fact_targets(list(clip_rows))
    clip_of_pair = torch.tensor([clip_rows[c] for c in video_captions], dtype=torch.long)
    lut = torch.full((int(max(int(text_ids.max()), int(color_ids.max()))) + 1,), -1, dtype=torch.long)
    lut[color_ids] = torch.arange(len(color_ids))
    color_of_token = lut[text_ids]  # (P, N): the colour a token names, -1 if none
    named = color_of_token >= 0
    out = {}
    for name, _, _ in _FACT_GROUPS:
        if name != "relation":
            out[name] = torch.where(named, shown[name][clip_of_pair].gather(1, color_of_token.clamp(min=0)), -100)
    n = len(texts)
    out["relation"] = torch.full((n,), -100, dtype=torch.long)
    out["agreement"] = torch.full((n,), -100, dtype=torch.long)
    out["subject_pos"] = torch.zeros(n, dtype=torch.long)
    out["reference_pos"] = torch.zeros(n, dtype=torch.long)
    stated_of = {t: _stated_relation(t) for t in dict.fromkeys(texts)}
    for i, text in enumerate(texts):
        stated = stated_of[text]
        if stated is None:
            continue
        a, b, relation = stated
        truth = int(shown["relation"][clip_of_pair[i], a * len(S.COLORS) + b])
        where = [(color_of_token[i] == c).nonzero() for c in (a, b)]
        if truth < 0 or any(len(w) == 0 for w in where):  # unrelated in the clip, or a colour word truncated away
            continue
        out["relation"][i], out["agreement"][i] = truth, int(truth == relation)
        out["subject_pos"][i], out["reference_pos"][i] = int(where[0][0]), int(where[1][0])
    return out


def matching_readout_layers(fusion_layers: int) -> tuple:
    """After how many fusion layers the matching read-outs look: the objects' facts half-way, the relation's
    agreement one layer before the end (so the [CLS] has a layer to gather it); both after the first."""
    return max(1, fusion_layers // 2), max(1, fusion_layers - 1)


class CaptionFactHeads(torch.nn.Module):
    """Object-centric read-outs of the caption's facts from the video tokens: a learned query per colour attends
    over the tokens (the [CLS] included) and one shared linear layer maps what it gathers to the object's motion,
    shape and size; a pair's two gathered features, concatenated, map to their relation.

    Why: the contrastive and matching losses alone leave motion direction and spatial relation out of the pooled
    features (``benchmarks/world_vlm_probe.py``). The read-outs are shared over colours so every clip pushes the
    tokens towards one motion / relation code (a separate linear read-out per colour slot, measured, learns
    motion no faster than chance in 400 steps: each slot sees a seventh of the clips). ``matching_object_out`` and
    ``matching_relation_out`` read the same facts from the matching head's colour-word states instead
    (``matching_facts``, ``--matching_fact_weight``). Training only: not part of the saved model."""

    def __init__(self, width: int, heads: int = 4, text_width: int | None = None):
        super().__init__()
        text_width = text_width or width
        n_object_classes = sum(classes for name, _, classes in _FACT_GROUPS if name != "relation")
        self.matching_object_out = torch.nn.Linear(text_width, n_object_classes)
        self.matching_relation_out = torch.nn.Linear(2 * text_width, len(S.RELATIONS))
        self.matching_agreement_out = torch.nn.Linear(text_width, 2)
        n_colors = len(S.COLORS)
        self.queries = torch.nn.Parameter(torch.randn(n_colors, width) * 0.02)
        self.norm = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.object_out = torch.nn.Linear(width, n_object_classes)
        self.relation_out = torch.nn.Linear(2 * width, len(S.RELATIONS))

    def forward(self, tokens: torch.Tensor, targets: dict) -> dict:
        """Cross-entropy per fact group over the slots a caption states, summed over groups; accuracies."""
        b, n_colors = tokens.shape[0], len(S.COLORS)
        kv = self.norm(tokens)
        objects, _ = self.attn(self.queries[None].expand(b, -1, -1), kv, kv, need_weights=False)  # (B, C, width)
        logits, start = {}, 0
        per_object = self.object_out(objects)
        for name, _, classes in _FACT_GROUPS:
            if name != "relation":
                logits[name] = per_object[..., start:start + classes].reshape(-1, classes)
                start += classes
        pairs = torch.cat([objects[:, :, None].expand(-1, -1, n_colors, -1),
                           objects[:, None].expand(-1, n_colors, -1, -1)], dim=-1)  # (B, a, b, 2 width)
        logits["relation"] = self.relation_out(pairs).reshape(-1, len(S.RELATIONS))
        out = {"loss": tokens.new_zeros(())}
        for name, _, _ in _FACT_GROUPS:
            target = targets[name].reshape(-1)
            valid = target >= 0
            if not bool(valid.any()):
                continue
            out["loss"] = out["loss"] + F.cross_entropy(logits[name][valid], target[valid])
            out[f"fact_acc_{name}"] = (logits[name][valid].argmax(-1) == target[valid]).float().mean().detach()
        return out


def matching_facts(heads: CaptionFactHeads, states: torch.Tensor, late_states: torch.Tensor, targets: dict) -> dict:
    """Cross-entropy of the facts read from the matching head's text states ``(P, N, width)`` against
    ``matching_fact_targets``, summed over groups, plus the agreement read from the subject's colour word in
    ``late_states`` (``matching_readout_layers``); accuracies (``matching_acc_<group>``)."""
    out = {"loss": states.new_zeros(())}
    per_token = heads.matching_object_out(states)
    logits, start = {}, 0
    for name, _, classes in _FACT_GROUPS:
        if name != "relation":
            logits[name] = per_token[..., start:start + classes].reshape(-1, classes)
            start += classes
    rows = torch.arange(len(states))
    pairs = torch.cat([states[rows, targets["subject_pos"]], states[rows, targets["reference_pos"]]], dim=-1)
    logits["relation"] = heads.matching_relation_out(pairs)
    for name, _, _ in _FACT_GROUPS:
        target = targets[name].reshape(-1)
        valid = target >= 0
        if not bool(valid.any()):
            continue
        out["loss"] = out["loss"] + F.cross_entropy(logits[name][valid].float(), target[valid])
        out[f"matching_acc_{name}"] = (logits[name][valid].argmax(-1) == target[valid]).float().mean().detach()
    valid = targets["agreement"] >= 0
    if bool(valid.any()):
        agree = heads.matching_agreement_out(late_states[rows, targets["subject_pos"]][valid])
        out["loss"] = out["loss"] + F.cross_entropy(agree.float(), targets["agreement"][valid])
        out["matching_acc_agreement"] = (agree.argmax(-1) == targets["agreement"][valid]).float().mean().detach()
    return out


def pixels_of(model: InternVideo2, videos: torch.Tensor) -> torch.Tensor:
    """The reward path's preprocessing (``InternVideo2Backbone.encode_video``), so training sees what rewards see."""
    cfg = model.config
    pixels, _ = prepare_video(videos, num_frames=cfg.num_frames, size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std)
    return pixels


def losses(model: InternVideo2, tokenizer, videos, captions, negatives, rng: np.random.Generator,
           counterfactuals=None, cf_captions=None, counterfactual_prob: float = 0.5, degraded=None,
           vtc_weight: float = 1.0, fact_heads: "CaptionFactHeads | None" = None, fact_weight: float = 0.0,
           matching_fact_weight: float = 0.0):
    """VTC (with swapped captions, counterfactual clips and degraded clips as extra negatives) + class-balanced VTM;
    see the module docstring. ``counterfactuals[i]`` is clip ``i`` with its direction or relation swapped (or None);
    ``degraded[i]`` is clip ``i`` degraded (``degrade``, or None): a text->video negative only, matched by no caption
    and kept out of VTM, so quality enters the cosine (the quality reward) and not the matching head (the semantic one)."""
    b = len(captions)
    counterfactuals = counterfactuals or [None] * b
    cf_captions = cf_captions or [None] * b
    cf_of = [i for i in range(b) if counterfactuals[i] is not None]  # clips that have a counterfactual
    video_caps = captions + [cf_captions[i] for i in cf_of]
    texts = captions + negatives + [cf_captions[i] for i in cf_of]
    deg_of = [i for i, d in enumerate(degraded or []) if d is not None]  # clips that have a degraded copy
    degraded = [degraded[i] for i in deg_of]
    all_videos = torch.cat([videos] + ([torch.stack([counterfactuals[i] for i in cf_of])] if cf_of else [])
                           + ([torch.stack(degraded)] if degraded else []))
    n_captioned = len(video_caps)  # the degraded clips come last and have no caption
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
    with torch.no_grad():
        model.temp.clamp_(0.01, 0.5)
    hidden, mask = model.encode_text(enc["input_ids"], enc["attention_mask"])
    tokens, pooled, _, grid = model.encode_vision(pixels_of(model, all_videos))
    tokens = tokens[:n_captioned]  # VTM never sees the degraded clips
    frame_idx, coords = model.video_positions(grid, tokens.device)
    v = F.normalize(model.vision_proj(pooled), dim=-1)
    t = F.normalize(model.text_proj(hidden[:, 0]), dim=-1)
    sim = v @ t.T / model.temp  # (videos, texts)
    # Several clips of a batch can share a caption, and a swapped caption can be another clip's caption.
    same = torch.tensor([[tj == vc for tj in texts] for vc in video_caps + [None] * len(degraded)])
    targets = same[:n_captioned].float() / same[:n_captioned].float().sum(1, keepdim=True)
    loss_v2t = -(F.log_softmax(sim[:n_captioned], dim=1) * targets).sum(1).mean()
    # The clips' own captions (and their counterfactuals' captions) are contrasted over every clip.
    has_video = torch.ones(len(texts), dtype=torch.bool)
    has_video[b:2 * b] = False
    same_t2v = same[:, has_video].T
    targets_t2v = same_t2v.float() / same_t2v.float().sum(1, keepdim=True)
    loss_t2v = -(F.log_softmax(sim[:, has_video].T, dim=1) * targets_t2v).sum(1).mean()
    loss_vtc = 0.5 * (loss_v2t + loss_t2v)

    with torch.no_grad():  # in-batch hard negatives, sampled by similarity (numpy RNG: resumable)
        not_pos = ~same[:b, :b]
        w_t2v = (F.softmax(sim[:b, :b].T.float(), dim=1) * not_pos.T + not_pos.T * 1e-8).numpy().astype(np.float64)
        w_v2t = (F.softmax(sim[:b, :b].float(), dim=1) * not_pos + not_pos * 1e-8).numpy().astype(np.float64)
        video_neg = [int(rng.choice(b, p=w / w.sum())) for w in w_t2v]
        text_neg = [int(rng.choice(b, p=w / w.sum())) for w in w_v2t]
        # Each clip's negative caption is its attribute-swapped caption (the binding signal) or, for the
        # other half of the clips, an in-batch caption (the coarse signal); its negative clip is its
        # counterfactual (same scene, direction or relation swapped) or an in-batch clip sampled by similarity.
        use_swap = torch.from_numpy(rng.random(b) < 0.5)
        use_cf = rng.random(b) < counterfactual_prob if counterfactual_prob > 0 else np.zeros(b, bool)
    cf_row = {i: b + k for k, i in enumerate(cf_of)}  # row of clip i's counterfactual in all_videos / texts
    video_neg = [cf_row[i] if (i in cf_row and use_cf[i]) else video_neg[i] for i in range(b)]
    used_cf = [i for i in range(b) if i in cf_row and use_cf[i]]
    ar = torch.arange(b)
    text_neg_idx = torch.where(use_swap, ar + b, torch.tensor(text_neg))
    # The counterfactuals used as negatives are also shown with their own captions (positives), so "swapped
    # scene" is never a shortcut for "mismatch".
    cf_pos = torch.tensor([b + cf_row[i] for i in used_cf], dtype=torch.long)  # text index == b + video row
    cf_vid = torch.tensor([cf_row[i] for i in used_cf], dtype=torch.long)
    text_idx = torch.cat([ar, cf_pos, ar, text_neg_idx])
    video_idx = torch.cat([ar, cf_vid, torch.tensor(video_neg), ar])
    fused, states = model.fuse(hidden[text_idx], mask[text_idx], tokens[video_idx], None, frame_idx, coords,
                               output_hidden_states=True)
    logits = model.itm_head(fused[:, 0])  # = model.vtm_logits, keeping inner states for the matching read-outs
    n_pos = b + len(used_cf)
    labels = torch.zeros(len(text_idx), dtype=torch.long)
    labels[:n_pos] = 1
    n_neg = len(text_idx) - n_pos
    weight = torch.tensor([len(text_idx) / (2 * n_neg), len(text_idx) / (2 * n_pos)])  # class-balanced
    loss_vtm = F.cross_entropy(logits.float(), labels, weight=weight)
    acc = (logits.argmax(-1) == labels).float()
    swap_acc = acc[n_pos + b:][use_swap]
    cf_acc = acc[n_pos:n_pos + b][torch.from_numpy(np.isin(np.arange(b), used_cf))]
    nan = torch.tensor(float("nan"))
    facts = {}
    if fact_heads is not None and fact_weight > 0:
        facts = fact_heads(tokens, caption_fact_targets(video_caps))
    matching = {}
    if fact_heads is not None and matching_fact_weight > 0:
        color_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(S.COLORS)))
        targets = matching_fact_targets([video_caps[int(v)] for v in video_idx], [texts[int(t)] for t in text_idx],
                                        enc["input_ids"][text_idx], color_ids)
        mid, late = (states[k - 1] for k in matching_readout_layers(model.config.fusion_layers))
        matching = matching_facts(fact_heads, mid, late, targets)
    return {
        "loss": (vtc_weight * loss_vtc + loss_vtm + (fact_weight * facts["loss"] if facts else 0.0)
                 + (matching_fact_weight * matching["loss"] if matching else 0.0)),
        **{f"matching_acc_{name}": matching.get(f"matching_acc_{name}", nan)
           for name in [g for g, _, _ in _FACT_GROUPS] + ["agreement"]},
        "loss_facts": facts["loss"].detach() if facts else nan,
        **{f"fact_acc_{name}": facts.get(f"fact_acc_{name}", nan) for name, _, _ in _FACT_GROUPS},
        "loss_vtc": loss_vtc.detach(),
        "loss_vtm": loss_vtm.detach(),
        "vtm_acc_pos": acc[:b].mean().detach(),
        "vtm_acc_swap": swap_acc.mean().detach() if len(swap_acc) else nan,
        "vtm_acc_counterfactual": cf_acc.mean().detach() if len(cf_acc) else nan,
        # how often a caption's cosine ranks its clean clip above the clip's degraded copy (the quality signal)
        "cos_clean_gt_degraded": ((sim[deg_of, deg_of] > sim[n_captioned + torch.arange(len(deg_of)), deg_of])
                                  .float().mean().detach() if deg_of else nan),
        "temp": model.temp.detach().clone(),
    }


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def retrieval_r1(backbone: InternVideo2Backbone, videos: torch.Tensor, captions: list, chunk: int = 64) -> dict:
    """Text->video and video->text R@1 among chunks of ``chunk`` clips (a hit: the retrieved item's caption is right)."""
    chunk = min(chunk, len(captions))
    t2v, v2t, n = 0, 0, 0
    for s in range(0, len(captions) - chunk + 1, chunk):
        caps = captions[s:s + chunk]
        t = backbone.encode_text(caps).embed
        v = backbone.encode_video(videos[s:s + chunk]).embed
        sim = t @ v.T
        t2v += sum(caps[int(j)] == caps[i] for i, j in enumerate(sim.argmax(1)))
        v2t += sum(caps[int(j)] == caps[i] for i, j in enumerate(sim.argmax(0)))
        n += len(caps)
    return {"t2v_r1": t2v / n, "v2t_r1": v2t / n, "chunk": chunk, "num_clips": n}


@torch.no_grad()
def pair_scores(backbone: InternVideo2Backbone, videos: torch.Tensor, captions: list, chunk: int = 128):
    """VTM match probability and joint-space cosine of (video[i], captions[i])."""
    probs, cos = [], []
    for s in range(0, len(captions), chunk):
        text = backbone.encode_text(captions[s:s + chunk])
        video = backbone.encode_video(videos[s:s + chunk])
        probs.append(backbone.match_probability(text, video))
        cos.append((text.embed * video.embed).sum(-1))
    return torch.cat(probs), torch.cat(cos)


@torch.no_grad()
def swap_metrics(backbone: InternVideo2Backbone, videos: torch.Tensor, specs: list, seed: int) -> dict:
    """Matched vs attribute-swapped captions of the same clips, overall and per kind of swap.

    ``rank_acc``: P(match | right caption) > P(match | swapped caption); ``threshold_acc``: the balanced
    accuracy of P > 0.5 over the matched and the swapped pairs; ``cos_rank_acc``: the same ranking by the
    contrastive cosine (what the quality reward uses).
    """
    rng = np.random.default_rng([seed, 202])
    vid_idx, pos_caps, neg_caps, kinds = [], [], [], []
    for i, spec in enumerate(specs):
        for neg in S.hard_negatives(spec, rng, forbidden_pairs=()):
            vid_idx.append(i)
            pos_caps.append(S.caption_of(spec))
            neg_caps.append(neg.caption)
            kinds.append(neg.kind)
    clips = videos[torch.tensor(vid_idx)]
    p_pos, c_pos = pair_scores(backbone, clips, pos_caps)
    p_neg, c_neg = pair_scores(backbone, clips, neg_caps)
    kinds = np.array(kinds)

    def summary(sel) -> dict:
        sel = torch.from_numpy(sel)
        pp, pn = p_pos[sel], p_neg[sel]
        return {
            "pairs": int(sel.sum()),
            "rank_acc": float((pp > pn).float().mean()),
            "threshold_acc": float(0.5 * ((pp > 0.5).float().mean() + (pn < 0.5).float().mean())),
            "cos_rank_acc": float((c_pos[sel] > c_neg[sel]).float().mean()),
            "mean_p_match": float(pp.mean()),
            "mean_p_swapped": float(pn.mean()),
        }

    out = {"all": summary(np.ones(len(kinds), bool))}
    for kind in NEGATIVE_KINDS:
        if (kinds == kind).any():
            out[kind] = summary(kinds == kind)
    return out


@torch.no_grad()
def reward_metrics(backbone: InternVideo2Backbone, specs: list, n: int, seed: int) -> dict:
    """PISCES rewards of the right clip vs a wrong clip (rendered from a swapped caption) for the same prompt."""
    from pisces_fast.rewards import POTConfig, PiscesRewards

    rng = np.random.default_rng([seed, 303])
    prompts, wrong_specs, kinds = [], [], []
    for spec in specs:
        options = [neg for neg in S.hard_negatives(spec, rng, forbidden_pairs=()) if neg.kind != "count"]
        if not options:
            continue
        neg = options[int(rng.integers(len(options)))]
        prompts.append(S.caption_of(spec))
        wrong_specs.append(neg.spec)
        kinds.append(neg.kind)
        if len(prompts) == n:
            break
    right = S.make_clips(specs=[S.parse_prompt(p) for p in prompts], split="heldout", seed=seed + 1).videos
    wrong = S.make_clips(specs=wrong_specs, split="heldout", seed=seed + 1).videos
    out = {"pairs": len(prompts)}
    for name, pot in (("vanilla", POTConfig(enabled=False)), ("pot", POTConfig())):
        rewards = PiscesRewards(backbone, use_ot_map=False, use_pot=True, pot=pot, freeze=False)
        r_right = rewards(right, prompts)
        r_wrong = rewards(wrong, prompts)
        for key in ("quality", "semantic"):
            if name == "pot" and key == "quality":
                continue  # the quality reward does not use the fusion layers
            label = key if key == "quality" else f"semantic_{name}"
            out[label] = {
                "right_gt_wrong": float((r_right[key] > r_wrong[key]).float().mean()),
                "mean_right": float(r_right[key].mean()),
                "mean_wrong": float(r_wrong[key].mean()),
            }
    return out


@torch.no_grad()
def quality_metrics(backbone: InternVideo2Backbone, videos: torch.Tensor, captions: list, seed: int) -> dict:
    """How often the caption's cosine (the plain quality reward) ranks the clean clip above a degraded copy, per
    degradation at the reward-validity benchmark's fixed strengths (blur 1, noise 0.05, flicker 0.15, shuffle)."""
    from pisces_fast.training import distortions as D

    degraded = {"blur": D.gaussian_blur(videos, 1.0), "noise": D.add_noise(videos, 0.05, seed=seed),
                "flicker": D.brightness_flicker(videos, 0.15, seed=seed), "shuffle": D.shuffle_frames(videos, seed=seed)}
    _, clean = pair_scores(backbone, videos, captions)
    return {k: float((clean > pair_scores(backbone, v, captions)[1]).float().mean()) for k, v in degraded.items()}


def evaluate(backbone: InternVideo2Backbone, args, progress: bool) -> dict:
    backbone.eval()
    metrics = {}
    for split, n in (("heldout", args.eval_clips), ("train", args.eval_clips // 2)):
        batch = S.make_clips(n, split=split, seed=args.seed + 1000)  # fresh clips (train: a seed the pool never used)
        metrics[split] = {"retrieval": retrieval_r1(backbone, batch.videos, batch.captions)}
        metrics[split]["swap"] = swap_metrics(backbone, batch.videos, batch.specs, args.seed)
        metrics[split]["cos_clean_gt_degraded"] = quality_metrics(backbone, batch.videos, batch.captions, args.seed)
        if split == "heldout" and args.reward_pairs > 0:
            metrics[split]["rewards"] = reward_metrics(backbone, batch.specs, args.reward_pairs, args.seed)
    return metrics


# ------------------------------------------------------------------------------------------------------
# checkpointing (atomic: write a temporary directory, then rename)
# ------------------------------------------------------------------------------------------------------
def save_state(path: str, model, optimizer, step: int, history: list, elapsed: float, fact_heads=None):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    if fact_heads is not None:
        save_file({k: v.detach().contiguous() for k, v in fact_heads.state_dict().items()},
                  os.path.join(tmp, "fact_heads.safetensors"))
    opt = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                meta["state"][str(pid)][k] = v
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as fh:
        json.dump({"step": step, "history": history, "elapsed": elapsed, "optimizer": meta}, fh)
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_state(path: str, model, optimizer, fact_heads=None):
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    heads_file = os.path.join(path, "fact_heads.safetensors")
    if (fact_heads is not None) != os.path.isfile(heads_file):
        raise ValueError(f"--resume: the checkpoint at {path} was written with a different --fact_weight / "
                         f"--matching_fact_weight (both 0 vs either > 0)")
    if fact_heads is not None:
        fact_heads.load_state_dict(load_file(heads_file))
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    meta = state["optimizer"]
    opt_state = {"param_groups": meta["param_groups"], "state": {}}
    for pid, st in meta["state"].items():
        entry = dict(st)
        for key, value in tensors.items():
            p, _, k = key.partition(".")
            if p == pid:
                entry[k] = value
        opt_state["state"][int(pid)] = entry
    optimizer.load_state_dict(opt_state)
    return state["step"], state["history"], state["elapsed"]


def plot_history(history: list, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for key in ("loss_vtc", "loss_vtm"):
        axes[0].plot(steps, [h[key] for h in history], label=key)
    axes[0].set_title("losses")
    axes[0].legend()
    for key in ("vtm_acc_pos", "vtm_acc_swap", "vtm_acc_counterfactual", "cos_clean_gt_degraded"):
        axes[1].plot(steps, [h.get(key, float("nan")) for h in history], label=key)
    axes[1].set_title("train VTM accuracy (running)")
    axes[1].legend()
    axes[2].plot(steps, [h["temp"] for h in history])
    axes[2].set_title("temperature")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.reinit_vision and not args.init_from:
        raise ValueError("--reinit_vision needs --init_from (without it every tower starts afresh anyway)")
    for flag in ("fact_weight", "matching_fact_weight"):
        if not (getattr(args, flag) >= 0 and math.isfinite(getattr(args, flag))):
            raise ValueError(f"--{flag} must be a finite number >= 0, got {getattr(args, flag)}")
    negative_weights = dict(NEGATIVE_WEIGHTS)
    for item in args.negative_weight:
        kind, _, value = item.partition("=")
        if kind not in negative_weights:
            raise ValueError(f"--negative_weight {item!r}: KIND must be one of {sorted(negative_weights)}")
        try:
            negative_weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"--negative_weight {item!r}: W must be a number") from None
        if not (negative_weights[kind] >= 0 and math.isfinite(negative_weights[kind])):
            raise ValueError(f"--negative_weight {item!r}: W must be a finite number >= 0")
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    os.makedirs(args.report_dir, exist_ok=True)
    ckpt_dir = os.path.join(args.report_dir, "checkpoint")
    torch.manual_seed(args.seed)
    tokenizer = build_word_tokenizer(S.VOCAB, max_length=MAX_TEXT_LEN)
    model = build_model(args, len(tokenizer))
    if args.init_from:
        fresh = ({k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision_encoder.", "vision_proj."))}
                 if args.reinit_vision else None)
        init_from_saved(model, args.init_from)
        if fresh is not None:
            model.load_state_dict(fresh, strict=False)
        print(f"initialised from {args.init_from}" + (" (text tower only)" if args.reinit_vision else ""), flush=True)
    if args.freeze_text_tower:
        if not args.init_from:
            raise ValueError("--freeze_text_tower needs --init_from (a random text tower would stay random)")
        n_text = model.config.fusion_start
        for name, param in model.text_encoder.named_parameters():
            if name.startswith("embeddings.") or (name.startswith("encoder.layer.") and int(name.split(".")[2]) < n_text):
                param.requires_grad_(False)
    fact_heads = (CaptionFactHeads(model.config.vision_width, text_width=model.config.text_width)
                  if args.fact_weight > 0 or args.matching_fact_weight > 0 else None)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if fact_heads is not None:
        trainable += [(f"fact_heads.{n}", p) for n, p in fact_heads.named_parameters()]
    decay = [p for n, p in trainable if p.dim() >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vision tokens {1 + math.prod(model.config.grid)}", flush=True)
    step, history, elapsed = 0, [], 0.0
    if args.resume:
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_dir}")
        step, history, elapsed = load_state(ckpt_dir, model, optimizer, fact_heads)
        print(f"resumed at step {step}", flush=True)

    t0 = time.time()
    pool = render_pool(args.pool_size, "train", args.seed, progress=progress, counterfactual_kinds=args.counterfactual_kinds,
                       counterfactuals=args.counterfactual_prob > 0)
    render_time = time.time() - t0
    model.train()
    running: dict = {}
    bar = tqdm(total=args.steps, initial=step, desc="pretrain VLM", disable=not progress)
    t_start = time.time() - elapsed
    while step < args.steps:
        rng = step_rng(args.seed, step)
        videos, captions, negatives, counterfactuals, cf_captions, degraded = make_batch(
            pool, args.batch_size, rng, args.quality_negative_prob, negative_weights)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        out = losses(model, tokenizer, videos, captions, negatives, rng, counterfactuals, cf_captions,
                     args.counterfactual_prob, degraded, args.vtc_weight, fact_heads, args.fact_weight,
                     args.matching_fact_weight)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        step += 1
        for k in ("loss_vtc", "loss_vtm", "vtm_acc_pos", "vtm_acc_swap", "vtm_acc_counterfactual", "cos_clean_gt_degraded",
                  "temp", "loss_facts", "fact_acc_motion", "fact_acc_relation",
                  "matching_acc_motion", "matching_acc_relation", "matching_acc_agreement"):
            if not math.isnan(float(out[k])):
                running[k] = 0.9 * running.get(k, float(out[k])) + 0.1 * float(out[k])
        if step % 10 == 0 or step == args.steps:
            history.append({"step": step, **{k: round(v, 5) for k, v in running.items()}})
            bar.set_postfix(vtc=f"{running['loss_vtc']:.3f}", vtm=f"{running['loss_vtm']:.3f}",
                            swap_acc=f"{running['vtm_acc_swap']:.2f}",
                            cf_acc=f"{running.get('vtm_acc_counterfactual', float('nan')):.2f}",
                            q_acc=f"{running.get('cos_clean_gt_degraded', float('nan')):.2f}")
        bar.update(1)
        if step % args.save_every == 0 and step < args.steps:
            save_state(ckpt_dir, model, optimizer, step, history, time.time() - t_start, fact_heads)
    bar.close()
    train_time = time.time() - t_start
    print(f"trained {args.steps} steps in {train_time:.0f}s (+{render_time:.0f}s rendering the pool)", flush=True)

    backbone = InternVideo2Backbone(model, tokenizer).eval()
    shutil.rmtree(args.out, ignore_errors=True)
    backbone.save_pretrained(args.out)
    t1 = time.time()
    metrics = evaluate(backbone, args, progress)
    eval_time = time.time() - t1
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    summary = {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if argv is None else argv,
        "args": vars(args),
        "parameters": n_params,
        "train_seconds": round(train_time, 1),
        "render_seconds": round(render_time, 1),
        "eval_seconds": round(eval_time, 1),
        "final_running": history[-1] if history else None,
        "metrics": metrics,
    }
    with open(os.path.join(args.out, "training_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(args.report_dir, "metrics.json"), "w") as fh:
        json.dump(summary | {"history": history}, fh, indent=1)
    plot_history(history, os.path.join(args.report_dir, "curves.png"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    h = metrics["heldout"]
    print(json.dumps(metrics, indent=1))
    print(
        f"held-out: t2v R@1 {h['retrieval']['t2v_r1']:.3f}, v2t R@1 {h['retrieval']['v2t_r1']:.3f} (batches of 64); "
        f"VTM matched>swapped {h['swap']['all']['rank_acc']:.3f}, threshold acc {h['swap']['all']['threshold_acc']:.3f}; "
        f"saved {args.out} ({size / 1e6:.2f} MB)",
        flush=True,
    )


if __name__ == "__main__":
    main()
