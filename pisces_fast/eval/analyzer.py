"""A small VBench of our own: rule-based scores of generated clips of the shapes world against their prompts.

Scores any clip ``(T, 3, H, W)`` in ``[0, 1]`` against its :class:`~pisces_fast.data.shapes.SceneSpec` (or a
caption, parsed with ``parse_prompt``) with rules that need no model: palette segmentation, connected
components, template shape fits and centroid tracks (``pisces_fast.eval.segmentation``).

Dimensions (each in ``[0, 1]``, higher is better)
-------------------------------------------------
Quality -- prompt-agnostic appearance and temporal coherence of what is on screen:

* ``subject_consistency``   each object's centroid-aligned appearance vs its first and previous frame
                            (VBench: DINO features vs first/previous frame); frames where a tracked object
                            vanishes count as 0.
* ``background_consistency`` each frame's background vs the per-pixel temporal median background.
* ``temporal_flickering``   mean absolute change of static background pixels between consecutive frames.
* ``motion_smoothness``     second differences of the object tracks (constant velocity is perfectly smooth).
* ``imaging_quality``       edge sharpness (steepest step / local contrast at object edges) times interior
                            cleanliness (objects are flat-colored, so texture inside one is noise).

Diagnostics (not scored; ``analyze(...)["diagnostics"]``, raw means over the clips with a tracked object):
``subject_presence``, the fraction of frames after an object's first appearance in which it is found (each
missing frame is a 0 in ``subject_consistency``), and ``subject_similarity``, the similarity over the frames in
which it is found -- so a low ``subject_consistency`` says whether objects vanish or change appearance.

Semantic -- agreement with the prompt (VBench computes each only on prompts that state it; so do we):

* ``object_class``          stated shapes found among the frame's objects (multiset match), per frame.
* ``object_count``          frames showing exactly as many objects as stated.
* ``color``                 the object matched to each stated object has the stated color (bound to it).
* ``size``                  ... has the stated size (longer box side below/above the world's midpoint).
* ``motion_direction``      least-squares displacement of each stated object's track over the clip points the
                            stated way (or stays within a threshold for "still").
* ``spatial_relationship``  stated relations hold between matched objects, per frame.

Objects are matched to a frame's components with a min-cost assignment (shape, then color, then size
disagreement, plus distance to the object's position in the previous frame) so a wrong color is scored as a
wrong color, not as a missing object.

Combination (VBench, ``scripts/cal_final_score.py`` and ``scripts/constant.py`` of Vchitect/VBench): the
dataset mean of each raw dimension is min-max normalised with fixed constants, ``(x - min) / (max - min)``,
weighted, and averaged into Quality (over quality dimensions) and Semantic (over semantic dimensions);
``Total = (4 * Quality + 1 * Semantic) / 5``. Our normalisation constants (:data:`NORMALIZATION`) were
calibrated on the world's own clips (``max``: what real clips score; ``min``: what a clip destroyed on that
axis scores) and are clamped to ``[0, 1]``; VBench's were calibrated on its reference models in the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..data.shapes import COLORS, SHAPES, SceneSpec, WorldConfig, caption_of, parse_prompt
from .segmentation import ComponentTable, find_components, window_max, window_min

__all__ = [
    "QUALITY_DIMENSIONS",
    "SEMANTIC_DIMENSIONS",
    "DIMENSIONS",
    "DIMENSION_WEIGHTS",
    "NORMALIZATION",
    "QUALITY_WEIGHT",
    "SEMANTIC_WEIGHT",
    "AnalyzerConfig",
    "ShapesAnalyzer",
    "Detections",
    "analyze",
    "combine_scores",
    "parse_prompt",
]

QUALITY_DIMENSIONS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "imaging_quality",
)
SEMANTIC_DIMENSIONS: tuple[str, ...] = (
    "object_class",
    "object_count",
    "color",
    "size",
    "motion_direction",
    "spatial_relationship",
)
DIMENSIONS: tuple[str, ...] = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
# Not scored: subject_consistency's two factors (module docstring), reported under "diagnostics".
DIAGNOSTICS: tuple[str, ...] = ("subject_presence", "subject_similarity")
# VBench weighs every dimension 1 except dynamic degree (0.5), which has no counterpart here.
DIMENSION_WEIGHTS: dict[str, float] = {d: 1.0 for d in DIMENSIONS}
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0

# (min, max) of each raw dimension. Semantic dimensions are already rates in [0, 1]. Quality maxima are the
# values clean clips of the world reach; minima are the values of clips destroyed on that axis (see the
# module docstring and tests/test_analyzer.py for the measurements).
NORMALIZATION: dict[str, tuple[float, float]] = {
    # clean clips ~0.993; i.i.d. noise (std 0.05) ~0.96; an object that changes color mid-clip ~0.8
    "subject_consistency": (0.80, 0.99),
    # clean 1.0; noise (std 0.05) ~0.966; +-10% brightness flicker ~0.994
    "background_consistency": (0.90, 1.00),
    # clean 1.0; noise (std 0.05) ~0.947; +-10% brightness flicker ~0.990
    "temporal_flickering": (0.92, 1.00),
    # clean ~0.986; blur (sigma 1) ~0.92; shuffled frames ~0.24
    "motion_smoothness": (0.00, 0.98),
    # already scaled by AnalyzerConfig.sharp_ratio / interior_noise_scale: clean 1.0; blur (sigma 1) ~0.26
    "imaging_quality": (0.00, 1.00),
    "object_class": (0.0, 1.0),
    "object_count": (0.0, 1.0),
    "color": (0.0, 1.0),
    "size": (0.0, 1.0),
    "motion_direction": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
}

# Assignment costs: shape identity is the anchor (as VBench's color dimension asks "what color is the
# <object>"), then color, then size; position continuity only breaks ties between look-alikes.
_COST_SHAPE, _COST_COLOR, _COST_SIZE, _COST_MOVE = 2.0, 1.5, 0.5, 1.0


@dataclass(frozen=True)
class AnalyzerConfig:
    """Thresholds of the rules. Defaults follow the world's geometry (``world``) at any resolution."""

    world: WorldConfig = field(default_factory=WorldConfig)
    color_distance: float = 0.3  # max RGB distance of a pixel to its palette color (palette gaps are >= 0.6)
    min_area: float = 0.006  # smallest component, fraction of the frame area (a small triangle is ~0.025)
    size_threshold: float | None = None  # longer box side / frame side separating small from large
    motion_threshold: float | None = None  # displacement / frame side that counts as moving
    edge_contrast: float = 0.3  # local (5x5) contrast that makes a neighbourhood an edge for sharpness
    sharp_ratio: tuple[float, float] = (0.35, 0.72)  # steepest-step/contrast: 5th pct of clean clips 0.73, blur(1) 0.42
    interior_noise_scale: float = 0.1  # mean absolute deviation inside objects that counts as fully noisy
    smoothness_scale: float = 0.05  # mean |second difference| of a track (frame-side units) that scores 1/e
    chunk_size: int = 64  # clips per batched pass

    def __post_init__(self):
        if not isinstance(self.world, WorldConfig):
            raise TypeError(f"AnalyzerConfig.world must be a WorldConfig, got {type(self.world).__name__}")
        if not 0.0 < self.color_distance < 0.6:
            raise ValueError(f"AnalyzerConfig.color_distance must be in (0, 0.6), got {self.color_distance}")
        if not 0.0 < self.min_area < 0.5:
            raise ValueError(f"AnalyzerConfig.min_area must be a fraction in (0, 0.5), got {self.min_area}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"AnalyzerConfig.chunk_size must be a positive int, got {self.chunk_size!r}")
        lo, hi = self.sharp_ratio
        if not 0.0 <= lo < hi:
            raise ValueError(f"AnalyzerConfig.sharp_ratio must be (low, high) with 0 <= low < high, got {self.sharp_ratio}")

    @property
    def size_cut(self) -> float:
        w = self.world
        return self.size_threshold if self.size_threshold is not None else 0.5 * (w.small_size + w.large_size)

    @property
    def motion_cut(self) -> float:
        return self.motion_threshold if self.motion_threshold is not None else 0.4 * self.world.travel


def _normalize(name: str, raw: float) -> float:
    lo, hi = NORMALIZATION[name]
    return float(min(1.0, max(0.0, (raw - lo) / (hi - lo))))


def combine_scores(scores: dict[str, float | None]) -> dict[str, float]:
    """VBench's combination of *normalised* dimension scores into quality, semantic and total.

    Quality and Semantic are weighted means over the dimensions present (``None`` or missing dimensions --
    e.g. no prompt states a relation -- are left out and the weights renormalised, as VBench does when a
    dimension is not evaluated); Total = (4 Quality + 1 Semantic) / 5. A group with no dimension is NaN.
    """

    def group(names):
        pairs = [(DIMENSION_WEIGHTS[d], scores[d]) for d in names if scores.get(d) is not None]
        if not pairs:
            return float("nan")
        return sum(w * v for w, v in pairs) / sum(w for w, _ in pairs)

    quality = group(QUALITY_DIMENSIONS)
    semantic = group(SEMANTIC_DIMENSIONS)
    total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"quality": quality, "semantic": semantic, "total": total}


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _check_videos(videos) -> torch.Tensor:
    if isinstance(videos, np.ndarray):
        videos = torch.from_numpy(videos)
    elif isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("videos must not be empty")
        for k, v in enumerate(videos):
            if not isinstance(v, torch.Tensor) or v.dim() != 4:
                raise ValueError(f"videos[{k}] must be a (T, 3, H, W) tensor, got {getattr(v, 'shape', type(v))}")
            if v.shape != videos[0].shape:
                raise ValueError(f"videos[{k}] has shape {tuple(v.shape)}, videos[0] has {tuple(videos[0].shape)}")
        videos = torch.stack(list(videos))
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"videos must be a torch.Tensor (N, T, 3, H, W), got {type(videos).__name__}")
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must have shape (N, T, 3, H, W) with RGB channels, got {tuple(videos.shape)}")
    N, T, _, H, W = videos.shape
    if N == 0:
        raise ValueError("videos is empty (N == 0)")
    if T < 2:
        raise ValueError(f"videos must have at least 2 frames to score motion, got T={T}")
    if min(H, W) < 16:
        raise ValueError(f"videos must be at least 16x16 pixels for shapes to be recognisable, got {H}x{W}")
    if not videos.is_floating_point():
        raise TypeError(f"videos must be floating point in [0, 1], got {videos.dtype} (divide uint8 by 255)")
    videos = videos.detach().float()
    if not torch.isfinite(videos).all():
        raise ValueError("videos contains NaN or Inf values")
    lo, hi = videos.min().item(), videos.max().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(
            f"videos must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (map [-1, 1] outputs with (x + 1) / 2)"
        )
    return videos.clamp(0.0, 1.0)


def _check_specs(specs, n: int) -> list[SceneSpec]:
    if isinstance(specs, (str, SceneSpec)):
        specs = [specs]
    if not isinstance(specs, (list, tuple)):
        raise TypeError(f"specs must be a list of SceneSpec or caption strings, got {type(specs).__name__}")
    if len(specs) != n:
        raise ValueError(f"specs has {len(specs)} entries but videos has {n} clips")
    out = []
    for k, s in enumerate(specs):
        if isinstance(s, str):
            try:
                s = parse_prompt(s)
            except ValueError as exc:
                raise ValueError(f"specs[{k}]: {exc}") from None
        if not isinstance(s, SceneSpec):
            raise TypeError(f"specs[{k}] must be a SceneSpec or a caption str, got {type(s).__name__}")
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------------------
# Frame-level quality measurements (batched)
# ----------------------------------------------------------------------------------------------------------


def _uniform_labels(labels: torch.Tensor) -> torch.Tensor:
    """Pixels whose whole 3x3 neighbourhood has one palette label (background included): away from edges."""
    return window_max(labels, 1) == window_min(labels, 1)


def _background_scores(video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flicker MAE, background-vs-median MAE) per clip; ``video (n, T, 3, H, W)``, ``labels (n, T, H, W)``.

    Flicker is measured on every pixel that keeps its palette label between two frames and lies away from
    label edges -- static background and the flat inside of objects alike, so a brightness flicker of the
    objects counts, while an object moving across the pixel does not.
    """
    n, T, _, H, W = video.shape
    uniform = _uniform_labels(labels.flatten(0, 1)).view(n, T, H, W)
    static = uniform[:, 1:] & uniform[:, :-1] & (labels[:, 1:] == labels[:, :-1])
    diff = (video[:, 1:] - video[:, :-1]).abs().mean(dim=2)  # (n, T-1, H, W)
    flicker = (diff * static).sum(dim=(1, 2, 3)) / static.sum(dim=(1, 2, 3)).clamp(min=1)
    background = uniform & (labels < 0)
    masked = torch.where(background[:, :, None], video, torch.full_like(video, float("nan")))
    median = masked.nanmedian(dim=1).values  # (n, 3, H, W), NaN where a pixel is never background
    valid = background & torch.isfinite(median[:, None, 0])
    dev = (video - median[:, None]).abs().mean(dim=2).nan_to_num(0.0)
    consistency = (dev * valid).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp(min=1)
    return flicker, consistency


def _imaging_scores(video: torch.Tensor, ids: torch.Tensor, cfg: AnalyzerConfig) -> torch.Tensor:
    """Sharpness (steepest step / local contrast at edges, normalised) x interior cleanliness per clip."""
    n, T, C, H, W = video.shape
    frames = video.flatten(0, 1)  # (B, 3, H, W)
    dx = F.pad((frames[..., :, 1:] - frames[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((frames[..., 1:, :] - frames[..., :-1, :]).abs(), (0, 0, 0, 1))
    step = torch.maximum(dx, dy).amax(dim=1)  # (B, H, W)
    contrast = (window_max(frames, 2) - window_min(frames, 2)).amax(dim=1)  # (B, H, W)
    steepest = window_max(step, 2)
    edges = (contrast >= cfg.edge_contrast).view(n, -1)
    ratio = (steepest / contrast.clamp(min=1e-6)).view(n, -1)
    mean_ratio = (ratio * edges).sum(dim=1) / edges.sum(dim=1).clamp(min=1)
    lo, hi = cfg.sharp_ratio
    sharpness = ((mean_ratio - lo) / (hi - lo)).clamp(0.0, 1.0) * (edges.sum(dim=1) > 0)
    # Interior pixels: the whole 3x3 neighbourhood belongs to the same component.
    interior = (window_max(ids, 1) == ids) & (window_min(ids, 1) == ids) & (ids > 0)  # (B, H, W)
    count = int(ids.max().item()) + 1
    sel = ids[interior]
    pix = frames.permute(0, 2, 3, 1)[interior]  # (P, 3)
    sums = torch.zeros(count, 3, device=video.device).index_add_(0, sel, pix)
    counts = torch.bincount(sel, minlength=count).clamp(min=1).float()[:, None]
    deviation = (pix - (sums / counts)[sel]).abs().mean(dim=1)  # (P,)
    clip_of = torch.arange(n, device=video.device).repeat_interleave(T * H * W).view(n * T, H, W)[interior]
    dev_sum = torch.zeros(n, device=video.device).index_add_(0, clip_of, deviation)
    dev_cnt = torch.bincount(clip_of, minlength=n).float()
    noise = dev_sum / dev_cnt.clamp(min=1)
    cleanliness = (1.0 - noise / cfg.interior_noise_scale).clamp(0.0, 1.0)
    return sharpness * cleanliness


# ----------------------------------------------------------------------------------------------------------
# Object tracks and semantic scores (per clip)
# ----------------------------------------------------------------------------------------------------------


def _assign(spec: SceneSpec, table: ComponentTable, starts: np.ndarray, base: int, T: int, side: float, cfg):
    """Per expected object, the component row matched in each frame (-1 if none): ``(n_objects, T)``."""
    objects = spec.objects
    n = len(objects)
    want_shape = np.array([SHAPES.index(o.shape) for o in objects])
    want_color = np.array([COLORS.index(o.color) if o.color else -1 for o in objects])
    want_large = np.array([-1 if o.size is None else int(o.size == "large") for o in objects])
    rows = np.full((n, T), -1, dtype=np.int64)
    last = np.full((n, 2), np.nan)
    for t in range(T):
        lo, hi = starts[base + t], starts[base + t + 1]
        if hi == lo:
            continue
        r = np.arange(lo, hi)
        large = (table.extent[r] / side >= cfg.size_cut).astype(int)
        cost = _COST_SHAPE * (want_shape[:, None] != table.shape[r][None, :])
        cost = cost + _COST_COLOR * ((want_color[:, None] >= 0) & (want_color[:, None] != table.color[r][None, :]))
        cost = cost + _COST_SIZE * ((want_large[:, None] >= 0) & (want_large[:, None] != large[None, :]))
        dist = np.hypot(table.cx[r][None, :] - last[:, 0:1], table.cy[r][None, :] - last[:, 1:2]) / side
        cost = cost + _COST_MOVE * np.nan_to_num(np.minimum(dist, 1.0), nan=0.0)
        oi, ci = linear_sum_assignment(cost)
        rows[oi, t] = r[ci]
        last[oi, 0] = table.cx[r[ci]]
        last[oi, 1] = table.cy[r[ci]]
    return rows


def _direction_ok(motion: str, disp: np.ndarray, cut: float) -> bool:
    dx, dy = disp
    if motion == "still":
        return math.hypot(dx, dy) < cut
    along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[motion]
    return along >= cut and abs(across) <= 0.5 * along


def _relation_ok(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    dx, dy = b[0] - a[0], b[1] - a[1]  # reference minus subject; y grows downwards
    if relation == "left of":
        return dx > 0 and abs(dy) < dx
    if relation == "right of":
        return dx < 0 and abs(dy) < -dx
    if relation == "above":
        return dy > 0 and abs(dx) < dy
    return dy < 0 and abs(dx) < -dy


def _semantic_scores(spec: SceneSpec, rows: np.ndarray, table: ComponentTable, starts, base, T, side, cfg) -> dict:
    objects = spec.objects
    n = len(objects)
    present = rows >= 0
    out: dict[str, float | None] = {}
    counts = np.array([starts[base + t + 1] - starts[base + t] for t in range(T)])
    out["object_count"] = float(np.mean(counts == n))
    want = np.bincount([SHAPES.index(o.shape) for o in objects], minlength=len(SHAPES))
    found = []
    for t in range(T):
        got = np.bincount(table.shape[starts[base + t] : starts[base + t + 1]], minlength=len(SHAPES))
        found.append(np.minimum(want, got).sum() / n)
    out["object_class"] = float(np.mean(found))
    colored = [i for i, o in enumerate(objects) if o.color is not None]
    if colored:
        hits = [
            present[i, t] and COLORS[table.color[rows[i, t]]] == objects[i].color for i in colored for t in range(T)
        ]
        out["color"] = float(np.mean(hits))
    else:
        out["color"] = None
    sized = [i for i, o in enumerate(objects) if o.size is not None]
    if sized:
        hits = [
            present[i, t] and (table.extent[rows[i, t]] / side >= cfg.size_cut) == (objects[i].size == "large")
            for i in sized
            for t in range(T)
        ]
        out["size"] = float(np.mean(hits))
    else:
        out["size"] = None
    moving = [i for i, o in enumerate(objects) if o.motion is not None]
    if moving:
        hits = []
        for i in moving:
            ts = np.flatnonzero(present[i])
            if len(ts) < 2:
                hits.append(False)
                continue
            r = rows[i, ts]
            slope_x = np.polyfit(ts, table.cx[r], 1)[0]
            slope_y = np.polyfit(ts, table.cy[r], 1)[0]
            disp = np.array([slope_x, slope_y]) * (T - 1) / side
            hits.append(_direction_ok(objects[i].motion, disp, cfg.motion_cut))
        out["motion_direction"] = float(np.mean(hits))
    else:
        out["motion_direction"] = None
    if spec.relations:
        hits = []
        for rel in spec.relations:
            for t in range(T):
                a, b = rows[rel.subject, t], rows[rel.reference, t]
                hits.append(
                    a >= 0 and b >= 0 and _relation_ok(rel.relation, (table.cx[a], table.cy[a]), (table.cx[b], table.cy[b]))
                )
        out["spatial_relationship"] = float(np.mean(hits))
    else:
        out["spatial_relationship"] = None
    return out


def _smoothness(rows: np.ndarray, table: ComponentTable, side: float, cfg) -> float | None:
    """exp(-mean |second difference| / scale) over all fully observed frame triples of all tracks; 0 if there
    is no such triple (nothing on screen to be smooth); ``None`` for clips under 3 frames (not measurable)."""
    if rows.shape[1] < 3:
        return None
    acc = []
    for track in rows:
        for t in range(1, len(track) - 1):
            a, b, c = track[t - 1], track[t], track[t + 1]
            if a >= 0 and b >= 0 and c >= 0:
                ax = table.cx[c] - 2 * table.cx[b] + table.cx[a]
                ay = table.cy[c] - 2 * table.cy[b] + table.cy[a]
                acc.append(math.hypot(ax, ay) / side)
    if not acc:
        return 0.0
    return float(math.exp(-float(np.mean(acc)) / cfg.smoothness_scale))


def _subject_consistency(
    video: torch.Tensor, ids: torch.Tensor, all_rows: list[np.ndarray], table: ComponentTable, T: int, side: int
) -> tuple[list[float], list[float | None], list[float | None]]:
    """Per clip: mean over tracked objects and frames after their first appearance of the similarity of the
    centroid-aligned object crop to the first and the previous appearance (0 where the object is missing).

    Also its two factors, per clip (None where no object is tracked past its first frame): the fraction of those
    frames in which the object is found (``subject_presence``) and the mean similarity over them
    (``subject_similarity``)."""
    n, _, C, H, W = video.shape
    S = int(math.ceil(0.5 * side)) | 1
    entries = [
        (k, i, t, r)
        for k, rows in enumerate(all_rows)
        for i in range(rows.shape[0])
        for t, r in enumerate(rows[i])
        if r >= 0
    ]
    scores = [0.0] * n
    presence: list[float | None] = [None] * n
    similarity_found: list[float | None] = [None] * n
    if not entries:
        return scores, presence, similarity_found
    index = {(k, i, t): m for m, (k, i, t, _) in enumerate(entries)}
    r = np.array([e[3] for e in entries])
    frame = torch.from_numpy(table.frame[r]).to(video.device)
    comp = torch.from_numpy(table.comp_id[r]).to(video.device)
    cx = torch.from_numpy(table.cx[r]).float().to(video.device)
    cy = torch.from_numpy(table.cy[r]).float().to(video.device)
    offs = torch.arange(S, dtype=torch.float32, device=video.device) - (S - 1) / 2.0
    gx = (2.0 * (cx[:, None] + offs[None, :]) / W - 1.0)[:, None, :].expand(-1, S, S)
    gy = (2.0 * (cy[:, None] + offs[None, :]) / H - 1.0)[:, :, None].expand(-1, S, S)
    grid = torch.stack([gx, gy], dim=-1)  # (M, S, S, 2)
    frames = video.flatten(0, 1)[frame]  # (M, 3, H, W)
    masks = (ids[frame] == comp[:, None, None]).float()[:, None]
    crops = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crop_masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def similarity(a: list[int], b: list[int]) -> np.ndarray:
        ia, ib = torch.tensor(a, device=video.device), torch.tensor(b, device=video.device)
        weight = torch.maximum(crop_masks[ia], crop_masks[ib])[:, 0]
        diff = (crops[ia] - crops[ib]).abs().mean(dim=1)
        return (1.0 - (diff * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp(min=1e-6)).cpu().numpy()

    pairs_first, pairs_prev, owners = [], [], []
    for k, rows in enumerate(all_rows):
        for i in range(rows.shape[0]):
            ts = np.flatnonzero(rows[i] >= 0)
            if len(ts) == 0:
                continue
            first, prev = ts[0], ts[0]
            for t in range(first + 1, T):
                if rows[i, t] >= 0:
                    pairs_first.append((index[(k, i, t)], index[(k, i, first)]))
                    pairs_prev.append((index[(k, i, t)], index[(k, i, prev)]))
                    owners.append((k, i, t, True))
                    prev = t
                else:
                    owners.append((k, i, t, False))
    sim = np.zeros(len(owners))
    if pairs_first:
        s_first = similarity([a for a, _ in pairs_first], [b for _, b in pairs_first])
        s_prev = similarity([a for a, _ in pairs_prev], [b for _, b in pairs_prev])
        seen = np.array([o[3] for o in owners])
        sim[seen] = 0.5 * (s_first + s_prev)
    per_clip: dict[int, list[tuple[float, bool]]] = {}
    for (k, _, _, found), value in zip(owners, sim):
        per_clip.setdefault(k, []).append((float(value), found))
    for k, values in per_clip.items():
        scores[k] = float(np.mean([v for v, _ in values]))
        presence[k] = float(np.mean([found for _, found in values]))
        seen_values = [v for v, found in values if found]
        similarity_found[k] = float(np.mean(seen_values)) if seen_values else None
    return scores, presence, similarity_found


# ----------------------------------------------------------------------------------------------------------
# The analyzer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    videos: torch.Tensor  # (n, T, 3, H, W)
    table: ComponentTable
    ids: torch.Tensor  # (n*T, H, W) component ids
    starts: np.ndarray  # frame -> first table row
    flicker: torch.Tensor  # (n,) raw MAE
    background: torch.Tensor  # (n,) raw MAE
    imaging: torch.Tensor  # (n,) imaging quality


@dataclass
class Detections:
    """The prompt-independent part of an analysis (objects found per frame and frame-level quality), so one
    batch of clips can be scored against several prompts -- e.g. positives and hard negatives -- cheaply."""

    chunks: list[_Chunk]
    shape: tuple[int, int, int, int, int]  # (N, T, 3, H, W)

    def __len__(self) -> int:
        return self.shape[0]


class ShapesAnalyzer:
    """Scores batches of clips against specs; see the module docstring for the dimensions."""

    def __init__(self, config: AnalyzerConfig | None = None):
        if config is not None and not isinstance(config, AnalyzerConfig):
            raise TypeError(f"config must be an AnalyzerConfig, got {type(config).__name__}")
        self.config = config or AnalyzerConfig()

    def detect(self, videos) -> Detections:
        """Segment, label and measure clips ``(N, T, 3, H, W)`` in ``[0, 1]`` (no prompt needed)."""
        videos = _check_videos(videos)
        cfg = self.config
        N, T, _, H, W = videos.shape
        min_area = max(1, int(round(cfg.min_area * H * W)))
        chunks = []
        for s in range(0, N, cfg.chunk_size):
            chunk = videos[s : s + cfg.chunk_size]
            n = chunk.shape[0]
            table, ids, labels = find_components(chunk.flatten(0, 1), cfg.color_distance, min_area)
            flicker, background = _background_scores(chunk, labels.view(n, T, H, W))
            imaging = _imaging_scores(chunk, ids, cfg)
            chunks.append(_Chunk(chunk, table, ids, table.frame_slices(n * T), flicker, background, imaging))
        return Detections(chunks, tuple(videos.shape))

    def raw_scores(self, videos, specs) -> list[dict[str, float | None]]:
        """Raw (unnormalised) dimension values per clip, plus the :data:`DIAGNOSTICS`; ``None`` where a prompt does
        not state a dimension (a diagnostic: where no object is tracked past its first frame).
        ``videos`` may be clips or the :class:`Detections` of clips."""
        detections = videos if isinstance(videos, Detections) else self.detect(videos)
        N, T, _, H, W = detections.shape
        specs = _check_specs(specs, N)
        cfg = self.config
        side = float(min(H, W))
        results: list[dict[str, float | None]] = []
        offset = 0
        for chunk in detections.chunks:
            n = chunk.videos.shape[0]
            chunk_specs = specs[offset : offset + n]
            offset += n
            table, starts = chunk.table, chunk.starts
            all_rows = [_assign(spec, table, starts, k * T, T, side, cfg) for k, spec in enumerate(chunk_specs)]
            subject, presence, similarity = _subject_consistency(chunk.videos, chunk.ids, all_rows, table, T, int(side))
            for k, spec in enumerate(chunk_specs):
                scores = {
                    "subject_consistency": subject[k],
                    "subject_presence": presence[k],
                    "subject_similarity": similarity[k],
                    "background_consistency": 1.0 - float(chunk.background[k]),
                    "temporal_flickering": 1.0 - float(chunk.flicker[k]),
                    "motion_smoothness": _smoothness(all_rows[k], table, side, cfg),
                    "imaging_quality": float(chunk.imaging[k]),
                }
                scores.update(_semantic_scores(spec, all_rows[k], table, starts, k * T, T, side, cfg))
                results.append(scores)
        return results

    def analyze(self, videos, specs) -> dict:
        """Score clips ``(N, T, 3, H, W)`` in ``[0, 1]`` (or their :class:`Detections`) against specs or captions.

        Returns ``{"quality", "semantic", "total", <dimension>: normalised score, "raw": {<dimension>: raw
        mean}, "diagnostics": {<diagnostic>: raw mean}, "num_clips": N, "per_clip": [...]}``. Each dimension is
        the VBench-normalised mean over the clips whose prompt states it (``None`` if none does); ``per_clip``
        holds, per clip, the caption, its normalised dimensions and its own quality/semantic/total.
        """
        if not isinstance(videos, Detections):
            videos = _check_videos(videos)
            specs = _check_specs(specs, videos.shape[0])  # refuse bad prompts before the expensive part
        detections = videos if isinstance(videos, Detections) else self.detect(videos)
        specs = _check_specs(specs, len(detections))
        raw = self.raw_scores(detections, specs)
        summary: dict = {}
        raw_means: dict[str, float | None] = {}
        for d in DIMENSIONS:
            values = [r[d] for r in raw if r[d] is not None]
            raw_means[d] = float(np.mean(values)) if values else None
            summary[d] = _normalize(d, raw_means[d]) if values else None
        result = combine_scores(summary)
        result.update(summary)
        result["raw"] = raw_means
        result["diagnostics"] = {}
        for d in DIAGNOSTICS:
            values = [r[d] for r in raw if r[d] is not None]
            result["diagnostics"][d] = float(np.mean(values)) if values else None
        result["num_clips"] = len(raw)
        per_clip = []
        for spec, r in zip(specs, raw):
            dims = {d: (_normalize(d, r[d]) if r[d] is not None else None) for d in DIMENSIONS}
            try:
                caption = caption_of(spec)
            except ValueError:  # a hand-built spec the grammar cannot write (e.g. a relation between 0 and 2)
                caption = None
            entry = {"caption": caption}
            entry.update(combine_scores(dims))
            entry.update(dims)
            per_clip.append(entry)
        result["per_clip"] = per_clip
        return result


def analyze(videos, specs, config: AnalyzerConfig | None = None) -> dict:
    """Module-level shortcut for ``ShapesAnalyzer(config).analyze(videos, specs)``."""
    return ShapesAnalyzer(config).analyze(videos, specs)
