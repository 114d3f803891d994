"""Reward fusion, the one implementation every training mode uses (PISCES Eq. 5, Eq. 6, Table 4).

``fuse_rewards(rewards, weights, mode, group_ids)`` turns ``{name: (B,)}`` into one ``(B,)`` objective:

* ``mode="equal"``: ``Σ_k w_k r_k`` (the paper's default direct-backprop objective, w_k = 1).
* ``mode="group"``: each reward is normalised within its prompt group g,
  ``(r_i − mean_g) / (std_g + eps)``, then weighted and summed: GRPO's group-relative reward applied
  to every mode ("adaptive weighting", Table 4). Groups are prompts: ``group_ids`` gives equal ids to
  the generations of the same prompt (:func:`group_ids_from_prompts`).

Why the group statistics are detached: the normalised rewards of a group always sum to zero, so with
differentiable statistics ``Σ_i (r_i − mean)/std`` has zero gradient and direct backprop on it learns
nothing. Detached, the gradient is ``∇r_i / std_g``: each reward is re-weighted per prompt by the
inverse of its spread, which is the adaptive weighting the paper describes.

``std`` is the population standard deviation over the group (as GRPO implementations compute it). A
group of one generation has nothing to be compared with: its normalised reward is 0 with zero gradient
(never the ``1/eps`` gradient the formula would give).

GRPO (:func:`grpo_advantages`) fuses once and normalises once: with ``mode="group"`` the fused
reward already is the advantage; with ``mode="equal"`` the fused reward is normalised per group.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

FUSION_MODES = ("equal", "group")


def group_ids_from_prompts(prompts: Sequence[str], device=None) -> torch.Tensor:
    """``(B,)`` long ids, equal for equal prompts (in order of first appearance)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of strings")
    ids: Dict[str, int] = {}
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        out.append(ids.setdefault(p, len(ids)))
    return torch.tensor(out, dtype=torch.long, device=device)


def _check_reward(name: str, r) -> torch.Tensor:
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"reward {name!r} must be a torch.Tensor of shape (B,), got {type(r).__name__}")
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"reward {name!r} must have shape (B,) with B >= 1, got {tuple(r.shape)}")
    if not r.is_floating_point():
        raise TypeError(f"reward {name!r} must be floating point, got {r.dtype}")
    # NaN/Inf are not checked here: that would sync the device every step, and raising on one rank would
    # hang the others. A non-finite reward makes a non-finite loss, which the trainer stops on (all ranks).
    return r


def _check_group_ids(group_ids, batch: int) -> torch.Tensor:
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.is_complex() \
            or tuple(group_ids.shape) != (batch,):
        raise ValueError(f"group_ids must be an integer tensor of shape ({batch},) (one prompt id per sample), "
                         f"got {getattr(group_ids, 'shape', type(group_ids).__name__)}")
    return group_ids


def group_normalize(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6, detach_stats: bool = True
) -> torch.Tensor:
    """``(r_i − mean_g) / (std_g + eps)`` within each group g of ``group_ids`` (see module docstring).

    Computed in float64 (rewards are (B,) vectors: free) so a group's normalised rewards sum to zero
    to rounding of the result even when its spread is tiny; returned in ``rewards``' dtype.
    """
    rewards = _check_reward("rewards", rewards)
    group_ids = _check_group_ids(group_ids, rewards.shape[0]).to(rewards.device)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    work_dtype = torch.float64
    value = rewards.to(work_dtype)
    stats = value.detach() if detach_stats else value
    zeros = torch.zeros(n_groups, device=rewards.device, dtype=work_dtype)
    count = zeros.index_add(0, inverse, torch.ones_like(stats))
    mean = zeros.index_add(0, inverse, stats) / count
    centred = stats - mean[inverse]
    var = zeros.index_add(0, inverse, centred * centred) / count
    # Lone samples and constant groups: keep sqrt away from 0 so differentiable statistics never give NaN.
    std = torch.where(count > 1, var, torch.ones_like(var)).clamp_min(1e-30).sqrt()
    out = (value - mean[inverse]) / (std[inverse] + eps)
    out = torch.where(count[inverse] > 1, out, torch.zeros_like(out))  # a lone generation: 0, no gradient
    return out.to(rewards.dtype)


def fuse_rewards(
    rewards: Mapping[str, torch.Tensor],
    weights: Optional[Mapping[str, float]] = None,
    mode: str = "equal",
    group_ids: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    detach_stats: bool = True,
) -> torch.Tensor:
    """Combine per-sample rewards ``{name: (B,)}`` into one ``(B,)`` objective to maximise.

    Args:
        rewards: e.g. the output of :class:`~pisces_fast.rewards.PiscesRewards`.
        weights: ``{name: w}``: exactly the rewards that are fused (a reward not named is ignored,
            weight 0 skips it). None: every reward with weight 1.
        mode: ``"equal"`` or ``"group"`` (see module docstring).
        group_ids: ``(B,)`` integer prompt ids, required by ``"group"``
            (:func:`group_ids_from_prompts`).
        eps, detach_stats: see :func:`group_normalize`.

    Returns:
        ``(B,)`` float32 (float64 if the rewards are float64).
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    if not isinstance(rewards, Mapping) or not rewards:
        raise TypeError("rewards must be a non-empty mapping {name: (B,) tensor}")
    weights = {name: 1.0 for name in rewards} if weights is None else dict(weights)
    if not weights:
        raise ValueError("weights must name at least one reward")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w:
            raise ValueError(f"weights[{name!r}] must be a number, got {w!r}")
    missing = sorted(name for name, w in weights.items() if name not in rewards and w != 0)
    if missing:
        raise ValueError(f"weights name rewards the reward model did not return: {missing} (it returned {sorted(rewards)})")
    weights = {name: w for name, w in weights.items() if name in rewards}
    if not weights:
        raise ValueError(f"weights name none of the rewards the reward model returned ({sorted(rewards)})")
    checked = {name: _check_reward(name, rewards[name]) for name in weights}
    shapes = {tuple(r.shape) for r in checked.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rewards must have the same shape (B,), got { {k: tuple(v.shape) for k, v in checked.items()} }")
    batch = next(iter(shapes))[0]
    if mode == "group":
        if group_ids is None:
            raise ValueError("fusion mode 'group' needs group_ids: one prompt id per sample (group_ids_from_prompts)")
        group_ids = _check_group_ids(group_ids, batch)
    work_dtype = torch.float64 if any(r.dtype == torch.float64 for r in checked.values()) else torch.float32
    total = None
    for name, r in checked.items():
        w = float(weights[name])
        if w == 0:
            continue
        term = r.to(work_dtype)
        if mode == "group":
            term = group_normalize(term, group_ids, eps=eps, detach_stats=detach_stats)
        total = w * term if total is None else total + w * term
    if total is None:  # every weight is 0
        total = next(iter(checked.values())).to(work_dtype) * 0.0
    return total


def grpo_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Optional[Mapping[str, float]],
    mode: str,
    group_ids: torch.Tensor,
    *,
    clip: Optional[float] = None,
    eps: float = 1e-6,
) -> tuple:
    """GRPO's advantages ``A_i`` (Eq. 6) from the rewards of G generations per prompt, normalised once.

    ``mode="group"``: :func:`fuse_rewards` normalises each reward within its prompt group and sums
    them: that is the advantage. ``mode="equal"``: the weighted sum is normalised within its prompt
    group (the paper's ``(r_i − mean)/std`` of the fused reward). ``clip`` bounds ``|A_i|``.

    Returns ``(advantages (B,), fused (B,))``, both detached.
    """
    with torch.no_grad():
        fused = fuse_rewards(rewards, weights, mode, group_ids, eps=eps)
        adv = fused if mode == "group" else group_normalize(fused, group_ids, eps=eps)
        if clip is not None:
            if not clip > 0:
                raise ValueError(f"clip must be > 0, got {clip}")
            adv = adv.clamp(-clip, clip)
    return adv, fused
