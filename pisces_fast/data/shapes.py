"""The shapes world: procedural video-text clips with exact ground truth.

Every clip shows 1-3 flat objects (a shape, a color from a well-separated palette, a size) that move in a
straight line (left/right/up/down) or stay still, on a plain or a static textured background. Its caption
comes from a small grammar, and the structured :class:`SceneSpec` that the caption expresses is kept beside
it, so a rule-based analyzer (``pisces_fast.eval.analyzer``) can score any generated clip against its prompt.

Three layers, each derived from the one before:

* :class:`SceneSpec` -- what a caption says (objects, their attributes, relations). ``caption_of`` and
  ``parse_prompt`` convert between specs and captions exactly (``parse_prompt(caption_of(s)) == s``).
* :class:`SceneLayout` -- one realisation of a spec: pixel positions, velocities, sizes the caption left
  open, exact RGB, the background image. Sampled from a seeded RNG.
* the clip -- ``render_layouts`` rasterises layouts into ``(N, T, 3, H, W)`` floats in ``[0, 1]`` with
  one-pixel anti-aliasing from signed distance functions, batched in torch.

Train and held-out prompts are disjoint by construction: every caption that uses one of the
:data:`HELDOUT_PAIRS` (color, shape) combinations is held out (compositional generalisation), and of the
rest a fixed 10% by caption hash is held out too (unseen prompts made of seen parts).

Determinism: clip ``i`` of split ``s`` under seed ``k`` depends only on ``(k, s, i)``, never on batch size
or on what was generated before, so datasets are reproducible and can be sharded freely.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "SHAPES",
    "COLORS",
    "PALETTE",
    "SIZES",
    "MOTIONS",
    "RELATIONS",
    "CONVERSE_RELATION",
    "SPLITS",
    "HELDOUT_PAIRS",
    "NEGATIVE_KINDS",
    "VOCAB",
    "MAX_CAPTION_WORDS",
    "WorldConfig",
    "ObjectSpec",
    "RelationSpec",
    "SceneSpec",
    "ObjectLayout",
    "SceneLayout",
    "ClipBatch",
    "HardNegative",
    "ShapesDataset",
    "caption_of",
    "parse_prompt",
    "tokenize_caption",
    "split_of",
    "sample_spec",
    "sample_specs",
    "sample_layout",
    "render_layouts",
    "make_clips",
    "make_clip",
    "hard_negatives",
    "unit_shape_sdf",
]

# ----------------------------------------------------------------------------------------------------------
# The world's attributes and vocabulary
# ----------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

# Pairwise RGB distance >= 0.6 (blue-cyan is the closest pair), and >= 0.6 from every background the
# world draws (dark, low-saturation greys below 0.4), so nearest-palette segmentation is unambiguous.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.88, 0.10),
    "magenta": (0.90, 0.12, 0.90),
    "cyan": (0.10, 0.88, 0.90),
    "white": (0.95, 0.95, 0.95),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout")

# (color, shape) pairs that never appear in a training caption or clip. One per color, and every shape but
# one appears at least once, so a held-out prompt tests binding of seen words into an unseen combination.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "circle"),
        ("blue", "diamond"),
        ("yellow", "square"),
        ("magenta", "cross"),
        ("cyan", "triangle"),
        ("white", "square"),
    }
)
# Share of the prompts without a held-out pair that are held out anyway (by a fixed hash of the caption).
HELDOUT_HASH_FRACTION = 0.10

_RELATION_PHRASES = {
    "left of": ("to", "the", "left", "of"),
    "right of": ("to", "the", "right", "of"),
    "above": ("above",),
    "below": ("below",),
}
# "A left of B" is "B right of A": the relation seen from the other object (and the swap a relation negative makes).
CONVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_OPPOSITE_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "left"}
_DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}

_FUNCTION_WORDS = ("a", "moving", "staying", "still", "to", "the", "of", "above", "below", "both", "and", ",")
VOCAB: tuple[str, ...] = tuple(
    sorted(set(SHAPES) | set(COLORS) | set(SIZES) | set(MOTIONS) | set(_FUNCTION_WORDS) | {"left", "right", "up", "down"})
)
_VOCAB_SET = frozenset(VOCAB)

# Longest caption the sampler writes: three objects without sizes, each with a motion
# ("a red circle moving left , a green square moving up and a blue triangle staying still").
MAX_CAPTION_WORDS = 17

NEGATIVE_KINDS: tuple[str, ...] = ("color", "shape", "size", "direction", "relation", "binding", "count")

_TEMPLATES = ("single", "relation", "pair", "triple")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Geometry and sampling knobs of the world. Defaults give 8 frames of 32x32.

    Sizes and travel are fractions of the frame so the same world renders at other resolutions; the
    validation below refuses configurations in which the largest objects cannot move without leaving the
    frame or colliding (every prompt the sampler writes must have a layout).
    """

    num_frames: int = 8
    height: int = 32
    width: int = 32
    small_size: float = 0.22  # bounding-box side of a "small" object, fraction of min(height, width)
    large_size: float = 0.34  # ... of a "large" object
    size_jitter: float = 0.04  # relative jitter of the side, uniform in [-j, j]
    travel: float = 0.1875  # total displacement of a moving object over the clip, fraction of the frame side
    edge_margin: float = 0.5  # pixels kept between an object's box and the frame edge
    gap: float = 1.5  # pixels kept between two objects' boxes in every frame
    color_jitter: float = 0.04  # uniform per-channel jitter of an object's RGB
    textured_prob: float = 0.5  # probability of a textured (vs plain) background
    template_probs: tuple[float, float, float, float] = (0.35, 0.30, 0.20, 0.15)  # single, relation, pair, triple
    triple_small_prob: float = 0.75  # in 3-object scenes sizes are unstated; most are small so they fit

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"WorldConfig.{name} must be an int, got {type(value).__name__}")
        if self.num_frames < 2:
            raise ValueError(f"WorldConfig.num_frames must be >= 2 (motion needs two frames), got {self.num_frames}")
        if min(self.height, self.width) < 16:
            raise ValueError(
                f"WorldConfig.height/width must be >= 16 so small shapes stay recognisable, got {self.height}x{self.width}"
            )
        for name in ("small_size", "large_size", "travel"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"WorldConfig.{name} must be a fraction in (0, 1), got {value!r}")
        if not self.small_size < self.large_size:
            raise ValueError(
                f"WorldConfig.small_size ({self.small_size}) must be below large_size ({self.large_size})"
            )
        for name in ("size_jitter", "color_jitter"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.2:
                raise ValueError(f"WorldConfig.{name} must be in [0, 0.2), got {value!r}")
        if self.edge_margin < 0 or self.gap < 0:
            raise ValueError(f"WorldConfig.edge_margin and gap must be >= 0, got {self.edge_margin}, {self.gap}")
        if not 0.0 <= self.textured_prob <= 1.0 or not 0.0 <= self.triple_small_prob <= 1.0:
            raise ValueError("WorldConfig.textured_prob and triple_small_prob must be probabilities in [0, 1]")
        probs = tuple(float(p) for p in self.template_probs)
        if len(probs) != 4 or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"WorldConfig.template_probs must be 4 non-negative probabilities (single, relation, pair, triple) "
                f"summing to 1, got {self.template_probs!r}"
            )
        # Worst case the sampler can write: two large objects side by side, related horizontally and both
        # moving horizontally (box, gap, box, travel and the two edge margins must fit across the frame).
        large = self.large_size * (1 + self.size_jitter) * min(self.height, self.width)
        for extent, side in ((self.width, "width"), (self.height, "height")):
            needed = 2 * large + self.gap + self.travel * extent + 2 * self.edge_margin
            if needed > extent:
                raise ValueError(
                    f"WorldConfig: two large objects moving side by side need {needed:.1f}px of {side}, the frame "
                    f"has {extent}px; lower large_size/travel/gap or raise the resolution"
                )

    @property
    def side(self) -> int:
        return min(self.height, self.width)

    def half_size(self, size: str) -> float:
        """Nominal half side in pixels of a ``size`` object."""
        fraction = self.small_size if size == "small" else self.large_size
        return 0.5 * fraction * self.side

    def travel_pixels(self) -> tuple[float, float]:
        """Total (x, y) displacement of a moving object over the clip, in pixels."""
        return self.travel * self.width, self.travel * self.height


# ----------------------------------------------------------------------------------------------------------
# Specs (what a caption says)
# ----------------------------------------------------------------------------------------------------------


def _check_choice(owner: str, name: str, value, choices: Sequence[str], optional: bool):
    if value is None and optional:
        return
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(choices) + (" or None" if optional else "")
        raise ValueError(f"{owner}.{name} must be one of {allowed}; got {value!r}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption states it; ``None`` means the caption leaves the attribute open."""

    shape: str
    color: str | None = None
    size: str | None = None
    motion: str | None = None

    def __post_init__(self):
        _check_choice("ObjectSpec", "shape", self.shape, SHAPES, optional=False)
        _check_choice("ObjectSpec", "color", self.color, COLORS, optional=True)
        _check_choice("ObjectSpec", "size", self.size, SIZES, optional=True)
        _check_choice("ObjectSpec", "motion", self.motion, MOTIONS, optional=True)


@dataclass(frozen=True)
class RelationSpec:
    """``objects[subject]`` is ``relation`` ``objects[reference]`` (e.g. 0 "left of" 1), in every frame."""

    subject: int
    relation: str
    reference: int

    def __post_init__(self):
        _check_choice("RelationSpec", "relation", self.relation, RELATIONS, optional=False)
        for name in ("subject", "reference"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"RelationSpec.{name} must be a non-negative int index, got {value!r}")
        if self.subject == self.reference:
            raise ValueError(f"RelationSpec relates object {self.subject} to itself")


@dataclass(frozen=True)
class SceneSpec:
    """The structured content of a caption: objects in caption order and the relations between them."""

    objects: tuple[ObjectSpec, ...]
    relations: tuple[RelationSpec, ...] = ()

    def __post_init__(self):
        objects = tuple(self.objects) if isinstance(self.objects, (list, tuple)) else self.objects
        relations = tuple(self.relations) if isinstance(self.relations, (list, tuple)) else self.relations
        if not isinstance(objects, tuple) or not all(isinstance(o, ObjectSpec) for o in objects):
            raise TypeError("SceneSpec.objects must be a sequence of ObjectSpec")
        if not isinstance(relations, tuple) or not all(isinstance(r, RelationSpec) for r in relations):
            raise TypeError("SceneSpec.relations must be a sequence of RelationSpec")
        if not objects:
            raise ValueError("SceneSpec.objects must not be empty")
        for rel in relations:
            if max(rel.subject, rel.reference) >= len(objects):
                raise ValueError(
                    f"SceneSpec.relations refers to object {max(rel.subject, rel.reference)} but the scene has "
                    f"{len(objects)} objects"
                )
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "relations", relations)

    @property
    def caption(self) -> str:
        return caption_of(self)

    def to_dict(self) -> dict:
        """Plain JSON-able form (for reports and manifests)."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "motion": o.motion} for o in self.objects
            ],
            "relations": [[r.subject, r.relation, r.reference] for r in self.relations],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SceneSpec":
        if not isinstance(data, dict) or "objects" not in data:
            raise ValueError("SceneSpec.from_dict: data must be a dict with an 'objects' list")
        objects = tuple(ObjectSpec(**o) for o in data["objects"])
        relations = tuple(RelationSpec(int(s), str(r), int(t)) for s, r, t in data.get("relations", ()))
        return cls(objects, relations)


# ----------------------------------------------------------------------------------------------------------
# Captions: writing and parsing
# ----------------------------------------------------------------------------------------------------------


def _object_words(obj: ObjectSpec) -> list[str]:
    words = ["a"]
    if obj.size is not None:
        words.append(obj.size)
    if obj.color is not None:
        words.append(obj.color)
    words.append(obj.shape)
    return words


def _motion_words(motion: str | None) -> list[str]:
    if motion is None:
        return []
    return ["staying", "still"] if motion == "still" else ["moving", motion]


def _join_words(words: list[str]) -> str:
    return " ".join(words).replace(" ,", ",")


def caption_of(spec: SceneSpec) -> str:
    """The canonical caption of ``spec``; ``parse_prompt`` inverts it exactly.

    Relations must link consecutive objects (``i`` and ``i + 1``), one relation per object at most, because
    the grammar writes a relation as a clause "A <relation> B". Two objects in one relation that share a
    motion are written "A <relation> B, both moving <direction>".
    """
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"caption_of: spec must be a SceneSpec, got {type(spec).__name__}")
    relation_at: dict[int, str] = {}
    for rel in spec.relations:
        if rel.reference != rel.subject + 1:
            raise ValueError(
                f"caption_of: the grammar writes relations between consecutive objects (i, i+1); got "
                f"({rel.subject}, {rel.relation!r}, {rel.reference})"
            )
        if rel.subject in relation_at or (rel.subject - 1) in relation_at or (rel.subject + 1) in relation_at:
            raise ValueError("caption_of: an object can take part in at most one relation clause")
        relation_at[rel.subject] = rel.relation
    objects = spec.objects
    if len(objects) == 2 and 0 in relation_at and objects[0].motion is not None and objects[0].motion == objects[1].motion:
        words = _object_words(objects[0]) + list(_RELATION_PHRASES[relation_at[0]]) + _object_words(objects[1])
        return _join_words(words + [",", "both"] + _motion_words(objects[0].motion))
    items: list[list[str]] = []
    i = 0
    while i < len(objects):
        words = _object_words(objects[i]) + _motion_words(objects[i].motion)
        if i in relation_at:
            words += list(_RELATION_PHRASES[relation_at[i]]) + _object_words(objects[i + 1])
            words += _motion_words(objects[i + 1].motion)
            i += 2
        else:
            i += 1
        items.append(words)
    out: list[str] = items[0]
    for k, item in enumerate(items[1:], start=1):
        out = out + ([","] if k < len(items) - 1 else ["and"]) + item
    return _join_words(out)


def tokenize_caption(caption: str) -> list[str]:
    """Split a caption into vocabulary words (a comma is a word); unknown words raise ``ValueError``."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    words = text.replace(",", " , ").split()
    if not words:
        raise ValueError("caption is empty")
    unknown = [w for w in words if w not in _VOCAB_SET]
    if unknown:
        raise ValueError(
            f"caption {caption!r} has words outside the shapes world's vocabulary: {sorted(set(unknown))}; "
            f"known words: {' '.join(VOCAB)}"
        )
    return words


class _Parser:
    """Recursive descent over the caption grammar::

        caption  := item ("," item)* ["and" item] ["," "both" motion]
        item     := object [motion] [relation object [motion]]
        object   := "a" [size] [color] shape
        motion   := "moving" (left|right|up|down) | "staying" "still"
        relation := "to the left of" | "to the right of" | "above" | "below"
    """

    def __init__(self, caption: str):
        self.caption = caption
        self.words = tokenize_caption(caption)
        self.pos = 0

    def error(self, expected: str):
        got = self.words[self.pos] if self.pos < len(self.words) else "the end of the caption"
        raise ValueError(
            f"caption {self.caption!r}: expected {expected} at word {self.pos + 1}, got {got!r}"
        )

    def peek(self, offset: int = 0) -> str | None:
        k = self.pos + offset
        return self.words[k] if k < len(self.words) else None

    def take(self, allowed, expected: str) -> str:
        word = self.peek()
        if word is None or word not in allowed:
            self.error(expected)
        self.pos += 1
        return word

    def object(self) -> dict:
        self.take(("a",), "'a'")
        size = self.take(SIZES, "a size") if self.peek() in SIZES else None
        color = self.take(COLORS, "a color") if self.peek() in COLORS else None
        shape = self.take(SHAPES, f"a shape ({'/'.join(SHAPES)})")
        return {"shape": shape, "color": color, "size": size, "motion": None}

    def motion(self) -> str | None:
        if self.peek() == "moving":
            self.pos += 1
            return self.take(("left", "right", "up", "down"), "a direction (left/right/up/down)")
        if self.peek() == "staying":
            self.pos += 1
            self.take(("still",), "'still'")
            return "still"
        return None

    def relation(self) -> str | None:
        if self.peek() in ("above", "below"):
            return self.take(("above", "below"), "a relation")
        if self.peek() == "to":
            self.pos += 1
            self.take(("the",), "'the'")
            side = self.take(("left", "right"), "'left' or 'right'")
            self.take(("of",), "'of'")
            return f"{side} of"
        return None

    def parse(self) -> SceneSpec:
        objects: list[dict] = []
        relations: list[RelationSpec] = []
        both_motion = None
        while True:
            first = self.object()
            first["motion"] = self.motion()
            objects.append(first)
            rel = self.relation()
            if rel is not None:
                second = self.object()
                second["motion"] = self.motion()
                relations.append(RelationSpec(len(objects) - 1, rel, len(objects)))
                objects.append(second)
            word = self.peek()
            if word is None:
                break
            if word == "," and self.peek(1) == "both":
                self.pos += 2
                both_motion = self.motion()
                if both_motion is None:
                    self.error("a motion after 'both'")
                if self.peek() is not None:
                    self.error("the end of the caption after the 'both' clause")
                break
            if word == "and":
                self.pos += 1
                last = self.object()
                last["motion"] = self.motion()
                objects.append(last)
                rel = self.relation()
                if rel is not None:
                    second = self.object()
                    second["motion"] = self.motion()
                    relations.append(RelationSpec(len(objects) - 1, rel, len(objects)))
                    objects.append(second)
                if self.peek() is not None:
                    self.error("the end of the caption after the 'and' item")
                break
            self.take((",",), "',', 'and' or the end of the caption")
        if both_motion is not None:
            if len(objects) != 2:
                raise ValueError(f"caption {self.caption!r}: 'both' needs exactly two objects, found {len(objects)}")
            if any(o["motion"] is not None for o in objects):
                raise ValueError(f"caption {self.caption!r}: 'both' repeats a motion already given to an object")
            for o in objects:
                o["motion"] = both_motion
        return SceneSpec(tuple(ObjectSpec(**o) for o in objects), tuple(relations))


def parse_prompt(caption: str) -> SceneSpec:
    """Parse a caption of the shapes world back into its :class:`SceneSpec`.

    Attributes a caption leaves out (size, color, motion) are ``None`` in the spec and are not scored by the
    analyzer. Raises ``ValueError`` naming the caption and the offending word for unknown words and
    ungrammatical captions.
    """
    return _Parser(caption).parse()


def split_of(spec: SceneSpec) -> str:
    """``"heldout"`` if the spec uses a held-out (color, shape) pair or its caption hashes into the held-out
    share, else ``"train"``. A pure function of the caption, so the two prompt sets are disjoint."""
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in spec.objects):
        return "heldout"
    digest = hashlib.blake2b(caption_of(spec).encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 1000
    return "heldout" if bucket < int(HELDOUT_HASH_FRACTION * 1000) else "train"


# ----------------------------------------------------------------------------------------------------------
# Sampling specs
# ----------------------------------------------------------------------------------------------------------

_SPLIT_CODES = {"train": 0, "heldout": 1}


def _check_split(split: str):
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _pick(rng: np.random.Generator, choices: Sequence):
    return choices[int(rng.integers(len(choices)))]


def _sample_candidate(rng: np.random.Generator, config: WorldConfig) -> SceneSpec:
    cumulative = np.cumsum(config.template_probs)
    template = _TEMPLATES[min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), 3)]
    n = {"single": 1, "relation": 2, "pair": 2, "triple": 3}[template]
    colors = [COLORS[k] for k in rng.permutation(len(COLORS))[:n]]  # distinct colors within a scene
    shapes = [_pick(rng, SHAPES) for _ in range(n)]
    with_size = template != "triple"
    sizes = [_pick(rng, SIZES) if with_size else None for _ in range(n)]
    if template == "relation":
        shared = _pick(rng, MOTIONS)
        motions = [shared, shared]
        relations = (RelationSpec(0, _pick(rng, RELATIONS), 1),)
    else:
        motions = [_pick(rng, MOTIONS) for _ in range(n)]
        relations = ()
    objects = tuple(ObjectSpec(s, c, z, m) for s, c, z, m in zip(shapes, colors, sizes, motions))
    return SceneSpec(objects, relations)


def sample_spec(rng: np.random.Generator, split: str = "train", config: WorldConfig | None = None) -> SceneSpec:
    """Draw one spec of ``split`` from the world's caption distribution (rejection on :func:`split_of`)."""
    _check_split(split)
    config = config or WorldConfig()
    for _ in range(1000):
        spec = _sample_candidate(rng, config)
        if split_of(spec) == split:
            return spec
    raise RuntimeError(f"sample_spec: no {split!r} spec in 1000 draws; check WorldConfig.template_probs")


def _clip_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index), stream])


def sample_specs(
    n: int, split: str = "train", seed: int = 0, unique: bool = False, config: WorldConfig | None = None
) -> list[SceneSpec]:
    """``n`` specs of ``split``; with ``unique=True`` no caption repeats (a fixed evaluation prompt set)."""
    _check_split(split)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    config = config or WorldConfig()
    specs: list[SceneSpec] = []
    seen: set[str] = set()
    index = 0
    while len(specs) < n:
        if index > 50 * n + 1000:
            raise RuntimeError(f"sample_specs: could not find {n} unique {split!r} prompts")
        spec = sample_spec(_clip_rng(seed, split, index, 0), split, config)
        index += 1
        if unique:
            caption = caption_of(spec)
            if caption in seen:
                continue
            seen.add(caption)
        specs.append(spec)
    return specs


# ----------------------------------------------------------------------------------------------------------
# Layouts (one realisation of a spec)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectLayout:
    """Pixel-level truth of one object; centers use pixel units with pixel ``(i, j)`` centred at ``(j+.5, i+.5)``."""

    shape: str
    color: str
    rgb: tuple[float, float, float]
    size: str
    half_size: float
    motion: str
    start: tuple[float, float]  # box center (x, y) in frame 0
    velocity: tuple[float, float]  # pixels per frame

    def centers(self, num_frames: int) -> np.ndarray:
        t = np.arange(num_frames, dtype=np.float64)[:, None]
        return np.asarray(self.start)[None, :] + t * np.asarray(self.velocity)[None, :]


@dataclass(frozen=True, eq=False)
class SceneLayout:
    """Everything needed to render one clip: the objects and the (static) background image ``(3, H, W)``."""

    objects: tuple[ObjectLayout, ...]
    background: str  # "plain" or "textured"
    background_image: np.ndarray
    num_frames: int
    height: int
    width: int

    def without_object(self, index: int) -> "SceneLayout":
        """The same scene with object ``index`` removed (a "missing object" corruption)."""
        if not 0 <= index < len(self.objects):
            raise ValueError(f"index {index} out of range for a layout of {len(self.objects)} objects")
        return replace(self, objects=self.objects[:index] + self.objects[index + 1 :])

    def with_object(self, index: int, **changes) -> "SceneLayout":
        """The same scene with fields of object ``index`` replaced (e.g. ``rgb=...``, ``velocity=...``)."""
        if not 0 <= index < len(self.objects):
            raise ValueError(f"index {index} out of range for a layout of {len(self.objects)} objects")
        objects = list(self.objects)
        objects[index] = replace(objects[index], **changes)
        return replace(self, objects=tuple(objects))


_INTERPOLATION: dict[int, np.ndarray] = {}


def _interpolation_matrix(size: int, knots: int = 5) -> np.ndarray:
    """``(size, knots)`` linear-interpolation weights from ``knots`` evenly spread values to ``size`` pixels."""
    if size not in _INTERPOLATION:
        eye = np.eye(knots)
        pos = np.linspace(0, knots - 1, size)
        _INTERPOLATION[size] = np.stack([np.interp(pos, np.arange(knots), eye[k]) for k in range(knots)], axis=1)
    return _INTERPOLATION[size]


def _sample_background(rng: np.random.Generator, config: WorldConfig) -> tuple[str, np.ndarray]:
    h, w = config.height, config.width
    base = rng.uniform(0.03, 0.22)
    tint = rng.uniform(-0.025, 0.025, size=3)
    image = np.empty((3, h, w), dtype=np.float32)
    image[:] = (base + tint)[:, None, None]
    textured = bool(rng.random() < config.textured_prob)
    if textured:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
        amplitude = rng.uniform(0.04, 0.10)
        kind = int(rng.integers(3))
        scale = config.side / 32.0
        if kind == 0:  # checkerboard
            period = int(rng.integers(3, 7)) * scale
            px, py = rng.uniform(0, 2 * period, size=2)
            pattern = ((np.floor((xx + px) / period) + np.floor((yy + py) / period)) % 2) * 2 - 1
        elif kind == 1:  # smooth stripes at one of four orientations
            angle = math.pi / 4 * int(rng.integers(4))
            period = rng.uniform(4.0, 9.0) * scale
            phase = rng.uniform(0, 2 * math.pi)
            pattern = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
        else:  # smooth value noise: a 5x5 random grid, bilinearly upsampled
            grid = rng.uniform(-1, 1, size=(5, 5))
            pattern = _interpolation_matrix(h) @ grid @ _interpolation_matrix(w).T
            pattern = pattern / max(np.abs(pattern).max(), 1e-6)
        channel_gain = 1.0 + rng.uniform(-0.2, 0.2, size=3)
        image += (amplitude * channel_gain)[:, None, None] * pattern[None].astype(np.float32)
    np.clip(image, 0.0, 0.4, out=image)
    return ("textured" if textured else "plain"), image


_PLACEMENT_CANDIDATES = 128
_PLACEMENT_ROUNDS = 12


def _place(rng, half, velocity, relations, config) -> np.ndarray | None:
    """Start centers ``(n, 2)`` meeting every constraint in every frame, or ``None``. Vectorised rejection."""
    n = len(half)
    t = np.arange(config.num_frames, dtype=np.float64)
    total = velocity * (config.num_frames - 1)  # (n, 2)
    margin = config.edge_margin
    extent = np.array([config.width, config.height], dtype=np.float64)
    lo = half[:, None] + margin - np.minimum(total, 0.0)
    hi = extent[None, :] - half[:, None] - margin - np.maximum(total, 0.0)
    if np.any(lo > hi):
        return None
    for _ in range(_PLACEMENT_ROUNDS):
        start = lo[None] + rng.random((_PLACEMENT_CANDIDATES, n, 2)) * (hi - lo)[None]
        path = start[:, :, None, :] + velocity[None, :, None, :] * t[None, None, :, None]  # (K, n, T, 2)
        ok = np.ones(_PLACEMENT_CANDIDATES, dtype=bool)
        for i in range(n):
            for j in range(i + 1, n):
                need = half[i] + half[j] + config.gap
                d = np.abs(path[:, i] - path[:, j])  # (K, T, 2)
                ok &= np.all((d[..., 0] >= need) | (d[..., 1] >= need), axis=1)
        for rel in relations:
            a, b = rel.subject, rel.reference
            need = half[a] + half[b] + config.gap
            dx = path[:, b, :, 0] - path[:, a, :, 0]  # > 0: subject is left of the reference
            dy = path[:, b, :, 1] - path[:, a, :, 1]  # > 0: subject is above the reference
            if rel.relation == "left of":
                ok &= np.all((dx >= need) & (np.abs(dy) <= 0.5 * dx), axis=1)
            elif rel.relation == "right of":
                ok &= np.all((-dx >= need) & (np.abs(dy) <= -0.5 * dx), axis=1)
            elif rel.relation == "above":
                ok &= np.all((dy >= need) & (np.abs(dx) <= 0.5 * dy), axis=1)
            else:
                ok &= np.all((-dy >= need) & (np.abs(dx) <= -0.5 * dy), axis=1)
        hits = np.flatnonzero(ok)
        if hits.size:
            return start[hits[0]]
    return None


def sample_layout(spec: SceneSpec, rng: np.random.Generator, config: WorldConfig | None = None) -> SceneLayout:
    """Realise ``spec``: fill open attributes, place objects so they stay inside the frame, never touch, and
    keep every stated relation with a clear margin (dominant axis at least twice the other) in every frame."""
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"spec must be a SceneSpec, got {type(spec).__name__}")
    config = config or WorldConfig()
    n = len(spec.objects)
    open_size_small_prob = config.triple_small_prob if n >= 3 else 0.5
    sizes = [o.size or ("small" if rng.random() < open_size_small_prob else "large") for o in spec.objects]
    motions = [o.motion or _pick(rng, MOTIONS) for o in spec.objects]
    colors = [o.color or _pick(rng, COLORS) for o in spec.objects]
    jitter = rng.uniform(-config.size_jitter, config.size_jitter, size=n)
    rgb = np.clip(
        np.array([PALETTE[c] for c in colors]) + rng.uniform(-config.color_jitter, config.color_jitter, size=(n, 3)),
        0.0,
        1.0,
    )
    travel_x, travel_y = config.travel_pixels()
    steps = config.num_frames - 1
    velocity = np.array(
        [[_DIRECTION_VECTORS[m][0] * travel_x / steps, _DIRECTION_VECTORS[m][1] * travel_y / steps] for m in motions]
    )
    start = None
    for attempt in range(3):
        half = np.array([config.half_size(s) for s in sizes]) * (1.0 + jitter)
        start = _place(rng, half, velocity, spec.relations, config)
        if start is not None:
            break
        # Only sizes the caption left open may shrink; a stated size is never changed to make room.
        sizes = [o.size or "small" for o in spec.objects]
    if start is None:
        raise ValueError(
            f"sample_layout: no layout of {caption_of(spec)!r} fits a {config.height}x{config.width} frame "
            f"of {config.num_frames} frames; use fewer or smaller objects"
        )
    background, image = _sample_background(rng, config)
    objects = tuple(
        ObjectLayout(
            shape=o.shape,
            color=colors[i],
            rgb=tuple(float(v) for v in rgb[i]),
            size=sizes[i],
            half_size=float(half[i]),
            motion=motions[i],
            start=(float(start[i, 0]), float(start[i, 1])),
            velocity=(float(velocity[i, 0]), float(velocity[i, 1])),
        )
        for i, o in enumerate(spec.objects)
    )
    return SceneLayout(objects, background, image, config.num_frames, config.height, config.width)


# ----------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------

_CROSS_ARM = 0.4  # half thickness of a cross arm, in units of the half side


def _box_sdf(u: torch.Tensor, v: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    qx = u.abs() - bx
    qy = v.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def unit_shape_sdf(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) to ``shape`` filling the box ``[-1, 1]^2``; ``v`` points down.

    Exact for circle/square/cross and inside every shape; near the outside corners of the triangle and the
    diamond it is a lower bound within a pixel, which is all one-pixel anti-aliasing needs.
    """
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return _box_sdf(u, v, 1.0, 1.0)
    if shape == "diamond":
        return (u.abs() + v.abs() - 1.0) * (1.0 / math.sqrt(2.0))
    if shape == "triangle":  # apex up at (0, -1), base corners (+-1, 1)
        s5 = 1.0 / math.sqrt(5.0)
        return torch.maximum(v - 1.0, (2.0 * u.abs() - v - 1.0) * s5)
    if shape == "cross":
        return torch.minimum(_box_sdf(u, v, 1.0, _CROSS_ARM), _box_sdf(u, v, _CROSS_ARM, 1.0))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _box_coverage(u: torch.Tensor, v: torch.Tensor, bx: float, by: float, half: torch.Tensor) -> torch.Tensor:
    """Exact area of a pixel inside an axis-aligned box: the product of the two 1-D overlaps."""
    return (half * (bx - u.abs()) + 0.5).clamp(0.0, 1.0) * (half * (by - v.abs()) + 0.5).clamp(0.0, 1.0)


def _coverage(shape: str, u: torch.Tensor, v: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Fraction of each pixel covered by ``shape`` (``u, v`` in half-side units, ``half`` in pixels).

    Boxes (square, cross) get their exact pixel coverage; curved and slanted shapes the usual one-pixel
    ramp ``clamp(0.5 - sdf, 0, 1)`` of their signed distance in pixels.
    """
    if shape == "square":
        return _box_coverage(u, v, 1.0, 1.0, half)
    if shape == "cross":
        arm = _CROSS_ARM
        return (
            _box_coverage(u, v, 1.0, arm, half) + _box_coverage(u, v, arm, 1.0, half) - _box_coverage(u, v, arm, arm, half)
        )
    return (0.5 - unit_shape_sdf(shape, u, v) * half).clamp_(0.0, 1.0)


_RENDER_CHUNK = 256  # clips per rasterisation pass: keeps the working set small and cache-friendly


def render_layouts(layouts: Sequence[SceneLayout], device: torch.device | str | None = None) -> torch.Tensor:
    """Rasterise layouts into clips ``(N, T, 3, H, W)`` float32 in ``[0, 1]``.

    Each pixel takes the fraction of it an object covers (exact for boxes, a one-pixel ramp of the signed
    distance for curved and slanted edges), so edges are anti-aliased and move smoothly at sub-pixel speeds.
    """
    if not layouts:
        raise ValueError("layouts must not be empty")
    first = layouts[0]
    T, H, W = first.num_frames, first.height, first.width
    for k, lay in enumerate(layouts):
        if not isinstance(lay, SceneLayout):
            raise TypeError(f"layouts[{k}] must be a SceneLayout, got {type(lay).__name__}")
        if (lay.num_frames, lay.height, lay.width) != (T, H, W):
            raise ValueError(
                f"layouts[{k}] is {lay.num_frames}x{lay.height}x{lay.width}, layouts[0] is {T}x{H}x{W}; "
                f"render clips of one geometry per call"
            )
    if len(layouts) > _RENDER_CHUNK:
        parts = [render_layouts(layouts[s : s + _RENDER_CHUNK], device) for s in range(0, len(layouts), _RENDER_CHUNK)]
        return torch.cat(parts)
    N = len(layouts)
    background = torch.from_numpy(np.stack([lay.background_image for lay in layouts])).to(device)  # (N, 3, H, W)
    dev = background.device
    t = torch.arange(T, dtype=torch.float32, device=dev)
    # Objects never overlap (layouts keep a gap wider than the one-pixel edge ramp), so the composite is
    # background * (1 - sum of coverages) + sum of coverage * color. Each object is rasterised only in a
    # small window that follows it frame by frame (~5x fewer pixels than the full frame at 32x32), and the
    # windows are scattered into the frame with index_add_, which stays correct when one clip holds several
    # objects of the same shape.
    alpha = torch.zeros(N * T * H * W, device=dev)
    paint = torch.zeros(3, N * T * H * W, device=dev)
    entries = [(n, obj) for n, lay in enumerate(layouts) for obj in lay.objects]
    for shape in SHAPES:
        group = [(n, obj) for n, obj in entries if obj.shape == shape]
        if not group:
            continue
        clip = torch.tensor([n for n, _ in group], device=dev)
        params = torch.tensor(
            [[*obj.start, *obj.velocity, obj.half_size, *obj.rgb] for _, obj in group], dtype=torch.float32, device=dev
        )
        window = min(int(math.ceil(2.0 * float(params[:, 4].max()))) + 3, H, W)
        cx = params[:, 0:1] + params[:, 2:3] * t  # (K, T)
        cy = params[:, 1:2] + params[:, 3:4] * t
        half = params[:, 4, None, None, None]
        ox = torch.floor(cx - params[:, 4:5] - 1.0).clamp(0, W - window)  # window origin, inside the frame
        oy = torch.floor(cy - params[:, 4:5] - 1.0).clamp(0, H - window)
        offs = torch.arange(window, dtype=torch.float32, device=dev)
        px = ox[:, :, None, None] + offs[None, None, None, :]  # (K, T, 1, S) pixel column indices
        py = oy[:, :, None, None] + offs[None, None, :, None]  # (K, T, S, 1)
        u = (px + 0.5 - cx[:, :, None, None]) / half
        v = (py + 0.5 - cy[:, :, None, None]) / half
        coverage = _coverage(shape, u, v, half)  # (K, T, S, S)
        frame = clip[:, None] * T + torch.arange(T, device=dev)[None, :]  # (K, T)
        flat = (frame[:, :, None, None] * (H * W) + py.long() * W + px.long()).reshape(-1)
        coverage = coverage.reshape(-1)
        alpha.index_add_(0, flat, coverage)
        for c in range(3):
            paint[c].index_add_(0, flat, coverage * params[:, 5 + c].repeat_interleave(T * window * window))
    alpha = alpha.view(N, T, 1, H, W)
    paint = paint.view(3, N, T, H, W).permute(1, 2, 0, 3, 4)
    video = background[:, None] * (1.0 - alpha) + paint
    return video.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Clips and datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClipBatch:
    """Clips with their captions, specs and layouts; ``videos`` is ``(N, T, 3, H, W)`` in ``[0, 1]``."""

    videos: torch.Tensor
    captions: list[str]
    specs: list[SceneSpec]
    layouts: list[SceneLayout]
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def make_clip(
    spec: SceneSpec | str, seed: int = 0, config: WorldConfig | None = None
) -> tuple[torch.Tensor, SceneLayout]:
    """Render one clip ``(T, 3, H, W)`` of a given spec or caption (e.g. an evaluation prompt) under ``seed``."""
    config = config or WorldConfig()
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"spec must be a SceneSpec or a caption str, got {type(spec).__name__}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    layout = sample_layout(spec, np.random.default_rng([int(seed), 7, 1]), config)
    return render_layouts([layout])[0], layout


def make_clips(
    n: int | None = None,
    split: str = "train",
    seed: int = 0,
    start: int = 0,
    indices: Iterable[int] | None = None,
    specs: Sequence[SceneSpec | str] | None = None,
    config: WorldConfig | None = None,
    device: torch.device | str | None = None,
) -> ClipBatch:
    """Make a batch of clips deterministically.

    Either sample ``n`` clips of ``split`` (clip ``i`` is a function of ``(seed, split, start + i)`` only, or of
    the given ``indices``), or render the given ``specs`` (specs or captions; layout ``i`` seeded by
    ``(seed, split, start + i)``). Layout sampling is numpy per clip; rasterisation is one batched torch pass.
    """
    _check_split(split)
    config = config or WorldConfig()
    if not isinstance(config, WorldConfig):
        raise TypeError(f"config must be a WorldConfig, got {type(config).__name__}")
    if specs is not None:
        if n is not None and n != len(specs):
            raise ValueError(f"n ({n}) disagrees with len(specs) ({len(specs)})")
        specs = [parse_prompt(s) if isinstance(s, str) else s for s in specs]
        for k, s in enumerate(specs):
            if not isinstance(s, SceneSpec):
                raise TypeError(f"specs[{k}] must be a SceneSpec or a caption str, got {type(s).__name__}")
        idx = list(range(start, start + len(specs))) if indices is None else [int(i) for i in indices]
        if len(idx) != len(specs):
            raise ValueError(f"indices has {len(idx)} entries for {len(specs)} specs")
    else:
        if indices is not None:
            idx = [int(i) for i in indices]
        else:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"n must be a positive int, got {n!r}")
            idx = list(range(start, start + n))
    if not idx:
        raise ValueError("make_clips: nothing to make (n, indices or specs is empty)")
    out_specs: list[SceneSpec] = []
    layouts: list[SceneLayout] = []
    for k, i in enumerate(idx):
        spec = specs[k] if specs is not None else sample_spec(_clip_rng(seed, split, i, 0), split, config)
        layouts.append(sample_layout(spec, _clip_rng(seed, split, i, 1), config))
        out_specs.append(spec)
    videos = render_layouts(layouts, device=device)
    return ClipBatch(videos, [caption_of(s) for s in out_specs], out_specs, layouts, idx)


class ShapesDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``length`` clips of one split, rendered on demand (nothing is stored).

    ``dataset[i]`` is ``{"video": (T, 3, H, W), "caption": str, "index": i}``; a DataLoader fetches a batch
    through ``__getitems__`` in one batched render. ``dataset.spec(i)`` gives the clip's :class:`SceneSpec`.
    """

    def __init__(self, length: int, split: str = "train", seed: int = 0, config: WorldConfig | None = None):
        _check_split(split)
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.length, self.split, self.seed = length, split, seed
        self.config = config or WorldConfig()

    def __len__(self) -> int:
        return self.length

    def _check_index(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or not -self.length <= i < self.length:
            raise IndexError(f"index {i!r} out of range for a ShapesDataset of length {self.length}")
        return int(i) % self.length

    def spec(self, i: int) -> SceneSpec:
        return sample_spec(_clip_rng(self.seed, self.split, self._check_index(i), 0), self.split, self.config)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        idx = [self._check_index(i) for i in indices]
        batch = make_clips(indices=idx, split=self.split, seed=self.seed, config=self.config)
        return [{"video": batch.videos[k], "caption": batch.captions[k], "index": i} for k, i in enumerate(idx)]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


# ----------------------------------------------------------------------------------------------------------
# Hard negatives
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardNegative:
    """A caption that differs from the positive in exactly one kind of attribute."""

    kind: str
    spec: SceneSpec
    caption: str


def _replace_object(spec: SceneSpec, index: int, **changes) -> SceneSpec:
    objects = list(spec.objects)
    objects[index] = replace(objects[index], **changes)
    return SceneSpec(tuple(objects), spec.relations)


def _negative(kind: str, spec: SceneSpec, rng: np.random.Generator, forbidden) -> SceneSpec | None:
    n = len(spec.objects)
    objects = spec.objects

    def allowed(candidate: SceneSpec) -> bool:
        return not any((o.color, o.shape) in forbidden for o in candidate.objects)

    if kind == "color":
        used = {o.color for o in objects}
        i = int(rng.integers(n))
        options = [c for c in COLORS if c not in used and (c, objects[i].shape) not in forbidden]
        return _replace_object(spec, i, color=_pick(rng, options)) if options and objects[i].color else None
    if kind == "shape":
        i = int(rng.integers(n))
        options = [s for s in SHAPES if s != objects[i].shape and (objects[i].color, s) not in forbidden]
        return _replace_object(spec, i, shape=_pick(rng, options)) if options else None
    if kind == "size":
        sized = [i for i, o in enumerate(objects) if o.size is not None]
        if not sized:
            return None
        i = _pick(rng, sized)
        return _replace_object(spec, i, size="large" if objects[i].size == "small" else "small")
    if kind == "direction":
        moving = [i for i, o in enumerate(objects) if o.motion is not None]
        if not moving:
            return None
        i = _pick(rng, moving)
        new_motion = _OPPOSITE_MOTION[objects[i].motion] if rng.random() < 0.5 else _pick(
            rng, [m for m in MOTIONS if m != objects[i].motion]
        )
        # A shared motion ("both moving up") changes for both objects so the caption keeps its form.
        partners = sorted({k for r in spec.relations if i in (r.subject, r.reference) for k in (r.subject, r.reference)})
        same = len(partners) == 2 and objects[partners[0]].motion == objects[partners[1]].motion
        targets = partners if same else [i]
        out = spec
        for j in targets:
            out = _replace_object(out, j, motion=new_motion)
        return out
    if kind == "relation":
        if not spec.relations:
            return None
        k = int(rng.integers(len(spec.relations)))
        rels = list(spec.relations)
        rels[k] = replace(rels[k], relation=CONVERSE_RELATION[rels[k].relation])
        return SceneSpec(objects, tuple(rels))
    if kind == "binding":  # swap the colors of two objects: same words, different binding
        colored = [i for i, o in enumerate(objects) if o.color is not None]
        if len(colored) < 2:
            return None
        i, j = rng.choice(colored, size=2, replace=False)
        if objects[i].color == objects[j].color:
            return None
        out = _replace_object(spec, int(i), color=objects[j].color)
        out = _replace_object(out, int(j), color=objects[i].color)
        return out if allowed(out) else None
    if kind == "count":  # drop one object, or add one to a single-object scene
        if n >= 2:
            i = int(rng.integers(n))
            keep = [k for k in range(n) if k != i]
            rels = tuple(
                RelationSpec(keep.index(r.subject), r.relation, keep.index(r.reference))
                for r in spec.relations
                if r.subject != i and r.reference != i
            )
            new_objects = tuple(objects[k] for k in keep)
            # "both" captions carry motions on each object after a drop, which the grammar already allows.
            return SceneSpec(new_objects, rels)
        used = {o.color for o in objects}
        for _ in range(20):
            extra = ObjectSpec(
                _pick(rng, SHAPES), _pick(rng, [c for c in COLORS if c not in used]), _pick(rng, SIZES), _pick(rng, MOTIONS)
            )
            if (extra.color, extra.shape) not in forbidden:
                return SceneSpec(objects + (extra,), ())
        return None
    raise ValueError(f"kind must be one of {NEGATIVE_KINDS}, got {kind!r}")


def hard_negatives(
    spec: SceneSpec,
    rng: np.random.Generator | int,
    kinds: Sequence[str] | None = None,
    forbidden_pairs: Iterable[tuple[str, str]] | None = HELDOUT_PAIRS,
) -> list[HardNegative]:
    """One attribute-swapped negative caption per applicable kind (color, shape, size, direction, relation,
    binding, count) for contrastive and matching training. Kinds that do not apply to ``spec`` are skipped.

    By default no negative uses a held-out (color, shape) pair, so training never sees those words bound
    together even as text; pass ``forbidden_pairs=()`` to allow it.
    """
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"spec must be a SceneSpec, got {type(spec).__name__}")
    if not isinstance(rng, np.random.Generator):
        if not isinstance(rng, (int, np.integer)) or rng < 0:
            raise ValueError(f"rng must be a numpy Generator or a non-negative int seed, got {rng!r}")
        rng = np.random.default_rng(int(rng))
    kinds = NEGATIVE_KINDS if kinds is None else tuple(kinds)
    for kind in kinds:
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"kinds: {kind!r} is not one of {NEGATIVE_KINDS}")
    forbidden = frozenset(forbidden_pairs or ())
    positive = caption_of(spec)
    out: list[HardNegative] = []
    for kind in kinds:
        negative = _negative(kind, spec, rng, forbidden)
        if negative is None:
            continue
        caption = caption_of(negative)
        if caption != positive:
            out.append(HardNegative(kind, negative, caption))
    return out
