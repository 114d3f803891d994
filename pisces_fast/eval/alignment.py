"""Text-video alignment metrics and the baseline embedding maps of PISCES Table 5 / Table 8.

Metrics:

* :func:`mutual_knn` — Huh et al. (2024): for paired embeddings ``a[i] ↔ b[i]``, the mean over i
  of ``|kNN_a(i) ∩ kNN_b(i)| / k`` with cosine neighbours, self excluded. Higher = the two spaces
  agree on who is close to whom.
* :func:`spearman_structure` — Spearman rank correlation between the pairwise distances of a set
  before and after a map: 1 = the map kept the set's internal structure (up to monotone change).
* :func:`vtm_accuracy` — accuracy of a video-text matching head on matched vs mismatched pairs.

Baseline maps (Table 5's alternatives to the OT map), all paired ``text[i] → video[i]`` and all
the same 3-layer residual MLP as the OT map (LayerNorm + ReLU), trained with:

* ``"l2"``: ``‖M(y_i) − x_i‖²`` (regression onto the paired video embedding);
* ``"kl"``: ``KL(softmax(x_i/τ) ‖ softmax(M(y_i)/τ))`` over embedding coordinates (the map matches
  each video embedding's coordinate distribution — Hinton-style distillation; the paper does not
  define its KL mapping further, this is our choice);
* ``"contrastive"``: symmetric InfoNCE on cosine similarities ``cos(M(y_i), x_j)/τ``.

This module is a leaf: it imports nothing else from pisces_fast (the OT map row of the tables is
added by ``benchmarks/alignment_table.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MAPPING_METHODS = ("contrastive", "l2", "kl")


def _check_set(name: str, x, min_rows: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least {min_rows} rows and 1 column, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def knn_indices(x: torch.Tensor, k: int, *, chunk: int = 2048) -> torch.Tensor:
    """``(n, k)`` indices of each row's k nearest rows by cosine similarity, self excluded.

    Ties are broken towards the lower index (a stable order), so results are deterministic.
    """
    x = F.normalize(x.double(), dim=-1)
    n = x.shape[0]
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk):
        sim = x[start : start + chunk] @ x.T
        rows = torch.arange(start, min(start + chunk, n), device=x.device)
        sim[rows - start, rows] = -math.inf
        # Sort by (-similarity, index): a stable descending sort keeps equal similarities in index order.
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        out[start : start + chunk] = order[:, :k]
    return out


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment of paired sets ``a (n, d_a)`` and ``b (n, d_b)``.

    ``mean_i |kNN_a(i) ∩ kNN_b(i)| / k`` with cosine neighbours, self excluded (Huh et al., 2024).
    1 = identical neighbourhoods; ≈ k/(n−1) for unrelated sets.
    """
    a = _check_set("a", a)
    b = _check_set("b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must be paired (same number of rows), got {a.shape[0]} and {b.shape[0]}")
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= a.shape[0] - 1):
        raise ValueError(f"k must be an int in [1, n-1] = [1, {a.shape[0] - 1}], got {k!r}")
    ia, ib = knn_indices(a, k), knn_indices(b.to(a.device), k)
    overlap = (ia[:, :, None] == ib[:, None, :]).any(-1).sum(-1).double()
    return float(overlap.mean() / k)


def _pairwise(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "euclidean":
        return (x[i] - x[j]).norm(dim=-1)
    xn = F.normalize(x, dim=-1)
    return 1.0 - (xn[i] * xn[j]).sum(-1)


def spearman_structure(
    before: torch.Tensor,
    after: torch.Tensor,
    *,
    metric: str = "euclidean",
    max_pairs: int = 2_000_000,
    seed: int = 0,
) -> float:
    """Spearman correlation between the pairwise distances of ``before`` and ``after`` (same rows).

    Args:
        before, after: ``(n, d)`` and ``(n, d')``: a set and its image under a map.
        metric: ``"euclidean"`` or ``"cosine"`` (1 − cos) distances.
        max_pairs: above ``n(n−1)/2`` this many pairs, a uniform random subset of pairs is used
            (seeded), which keeps 10k-point sets cheap with negligible error.
    """
    from scipy.stats import spearmanr

    before = _check_set("before", before, min_rows=3)
    after = _check_set("after", after, min_rows=3)
    if before.shape[0] != after.shape[0]:
        raise ValueError(f"before and after must have the same rows, got {before.shape[0]} and {after.shape[0]}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    n = before.shape[0]
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (max_pairs,), generator=g)
        j = torch.randint(0, n - 1, (max_pairs,), generator=g)
        j = j + (j >= i).long()  # uniform over j != i
    before, after = before.double().cpu(), after.double().cpu()
    d0, d1 = _pairwise(before, i, j, metric), _pairwise(after, i, j, metric)
    if float(d0.std()) == 0.0 or float(d1.std()) == 0.0:
        raise ValueError("all pairwise distances are equal in one of the sets; Spearman correlation is undefined")
    return float(spearmanr(d0.numpy(), d1.numpy()).statistic)


def vtm_accuracy(matched: torch.Tensor, mismatched: torch.Tensor, *, threshold: float = 0.5) -> float:
    """Accuracy of match probabilities: matched pairs should score > threshold, mismatched ≤ it.

    Args:
        matched: ``(n,)`` P(match) of true (video, caption) pairs; mismatched: ``(m,)`` of wrong pairs.
        threshold: decision threshold (0.5 = the argmax of the two VTM logits).
    """
    for name, p in (("matched", matched), ("mismatched", mismatched)):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (n,) tensor of probabilities")
        if not bool(torch.isfinite(p).all()) or float(p.min()) < 0 or float(p.max()) > 1:
            raise ValueError(f"{name} must hold probabilities in [0, 1] (apply softmax to the VTM logits)")
    correct = (matched > threshold).sum() + (mismatched <= threshold).sum()
    return float(correct) / (matched.numel() + mismatched.numel())


# ----------------------------------------------------------------------------------------------
# Baseline maps (Table 5)
# ----------------------------------------------------------------------------------------------
class MLPMap(nn.Module):
    """``mean_x + s·(z + MLP(z))``, ``z = (y − mean_y)/s``: the OT map's architecture, for fair comparison."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("source_mean", torch.zeros(dim))
        self.register_buffer("target_mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = (y - self.source_mean) / self.scale
        return self.target_mean + self.scale * (z + self.net(z))


def _mapping_loss(method: str, mapped: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    if method == "l2":
        return ((mapped - target) ** 2).sum(-1).mean()
    if method == "kl":
        log_q = F.log_softmax(mapped / temperature, dim=-1)
        log_p = F.log_softmax(target / temperature, dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    logits = F.normalize(mapped, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def fit_alignment_map(
    source: torch.Tensor,
    target: torch.Tensor,
    method: str,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    hidden: int = 512,
    temperature: Optional[float] = None,
    seed: int = 0,
    progress: bool = False,
) -> MLPMap:
    """Train a paired map ``source[i] → target[i]`` with one of :data:`MAPPING_METHODS`.

    ``temperature`` defaults to 0.07 for ``"contrastive"`` and 0.1 for ``"kl"`` (unused by ``"l2"``).
    Returns the map in eval mode without gradients.
    """
    from tqdm.auto import tqdm

    source = _check_set("source", source)
    target = _check_set("target", target)
    if method not in MAPPING_METHODS:
        raise ValueError(f"method must be one of {MAPPING_METHODS}, got {method!r}")
    if source.shape != target.shape:
        raise ValueError(f"paired maps need source and target of the same shape, got {tuple(source.shape)} and {tuple(target.shape)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if method == "contrastive" and min(batch_size, source.shape[0]) < 2:
        raise ValueError("contrastive mapping needs batches of at least 2 pairs")
    temperature = temperature if temperature is not None else (0.07 if method == "contrastive" else 0.1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    g = torch.Generator().manual_seed(seed)
    y, x = source.detach().float(), target.detach().float()
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG stream untouched
        torch.manual_seed(seed)
        model = MLPMap(y.shape[1], hidden)
    model = model.to(y.device)
    with torch.no_grad():
        model.source_mean.copy_(y.mean(0))
        model.target_mean.copy_(x.mean(0))
        var = 0.5 * (y.var(0, unbiased=False).sum() + x.var(0, unbiased=False).sum())
        model.scale.copy_(var.clamp_min(1e-12).sqrt() / math.sqrt(y.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = y.shape[0]
    bs = min(batch_size, n)
    for _ in tqdm(range(steps), desc=f"fit {method} map", disable=not progress):
        # Without replacement within a batch: duplicated pairs would be false negatives for InfoNCE.
        idx = torch.randperm(n, generator=g)[:bs].to(y.device)
        loss = _mapping_loss(method, model(y[idx]), x[idx], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Table 5
# ----------------------------------------------------------------------------------------------
@dataclass
class AlignmentRow:
    method: str
    mutual_knn: float
    spearman: float


def alignment_rows(
    text: torch.Tensor,
    video: torch.Tensor,
    maps: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    *,
    k: int = 10,
    metric: str = "euclidean",
) -> List[AlignmentRow]:
    """Table-5 rows: for each named map, mutual kNN(map(text), video) and Spearman(text, map(text)).

    Evaluate on held-out pairs (not the ones the maps were fit on).
    """
    text = _check_set("text", text)
    video = _check_set("video", video)
    rows = []
    for name, fn in maps.items():
        with torch.no_grad():
            mapped = fn(text)
        _check_set(f"map {name!r} output", mapped)
        rows.append(AlignmentRow(name, mutual_knn(mapped, video, k), spearman_structure(text, mapped, metric=metric)))
    return rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: Optional[str] = None) -> str:
    """A plain-text table (numbers with 4 decimals)."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [] if title is None else [title]
    out += ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), line]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def synthetic_paired_embeddings(
    n: int = 2000, dim: int = 64, *, latent_dim: int = 16, noise: float = 0.3, gap: float = 1.0, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paired unit-norm "text" and "video" embeddings with a modality gap (for the tables' demo).

    A shared latent ``z ~ N(0, I)`` is embedded by two different random linear maps plus
    per-modality noise and a per-modality offset of norm ``gap`` (the "cone" offset observed in
    contrastive VLMs), then L2-normalised. Pairs share semantics but the two distributions differ
    in location, orientation and spread.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=g)
    a = torch.randn(latent_dim, dim, generator=g) / math.sqrt(latent_dim)
    b = torch.randn(latent_dim, dim, generator=g) / math.sqrt(latent_dim)
    b = 0.6 * a + 0.8 * b  # correlated but not identical embeddings of the latent
    off_t = F.normalize(torch.randn(dim, generator=g), dim=0) * gap
    off_v = F.normalize(torch.randn(dim, generator=g), dim=0) * gap
    text = z @ a + noise * torch.randn(n, dim, generator=g) + off_t
    video = (z @ b) * torch.linspace(0.5, 1.5, dim) + noise * torch.randn(n, dim, generator=g) + off_v
    return F.normalize(text, dim=-1), F.normalize(video, dim=-1)
