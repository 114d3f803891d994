"""Reward fusion: equal weighting and group-relative (adaptive) weighting (PISCES Table 4).

* ``mode="equal"``: ``Σ_k w_k r_k`` (the paper's default direct-backprop objective, w_k = 1).
* ``mode="group_relative"``: each reward is normalised within its prompt group,
  ``(r_i − mean_g) / (std_g + eps)``, then summed with the weights — GRPO's advantage, applied to
  direct backpropagation as in Table 4.

Why the group statistics are detached by default: the normalised rewards of a group always sum
to zero, so with differentiable statistics ``Σ_i (r_i − mean)/std`` has zero gradient and direct
backprop on it learns nothing. Detached, the gradient is ``∇r_i / std_g``: each reward is
re-weighted per prompt by the inverse of its spread, which is the "adaptive weighting" the
paper describes. (For GRPO, where rewards are not differentiated, the choice does not matter.)

``std`` is the population standard deviation over the group (as GRPO implementations compute it
with numpy); a group of one sample gets advantage 0.

This module is the canonical fusion; :mod:`pisces_fast.training` imports it from here.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

FUSION_MODES = ("equal", "group_relative")


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
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"reward {name!r} contains NaN or Inf values")
    return r


def group_normalize(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6, detach_stats: bool = True
) -> torch.Tensor:
    """``(r_i − mean_g) / (std_g + eps)`` within each group g of ``group_ids`` (see module docstring)."""
    rewards = _check_reward("rewards", rewards)
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != rewards.shape or group_ids.is_floating_point():
        raise ValueError(f"group_ids must be an integer tensor of shape {tuple(rewards.shape)}, got {getattr(group_ids, 'shape', group_ids)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    group_ids = group_ids.to(rewards.device)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    stats_src = rewards.detach() if detach_stats else rewards
    work = stats_src.float()
    count = torch.zeros(n_groups, device=rewards.device).index_add_(0, inverse, torch.ones_like(work))
    mean = torch.zeros(n_groups, device=rewards.device).index_add(0, inverse, work) / count
    centred = work - mean[inverse]
    var = torch.zeros(n_groups, device=rewards.device).index_add(0, inverse, centred * centred) / count
    std = var.sqrt()
    out = (rewards.float() - mean[inverse]) / (std[inverse] + eps)
    return out.to(rewards.dtype)


def fuse_rewards(
    rewards: Mapping[str, torch.Tensor],
    *,
    mode: str = "equal",
    weights: Optional[Mapping[str, float]] = None,
    group_ids: Optional[torch.Tensor] = None,
    prompts: Optional[Sequence[str]] = None,
    eps: float = 1e-6,
    detach_stats: bool = True,
) -> torch.Tensor:
    """Combine per-sample rewards ``{name: (B,)}`` into one ``(B,)`` objective to maximise.

    Args:
        rewards: e.g. the output of :class:`~pisces_fast.rewards.PiscesRewards`.
        mode: ``"equal"`` or ``"group_relative"`` (see module docstring).
        weights: per-reward weights (default 1 each); names must be keys of ``rewards``.
        group_ids / prompts: the prompt groups for ``"group_relative"`` (one of them).
        eps, detach_stats: see :func:`group_normalize`.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    if not isinstance(rewards, Mapping) or not rewards:
        raise TypeError("rewards must be a non-empty mapping {name: (B,) tensor}")
    checked = {name: _check_reward(name, r) for name, r in rewards.items()}
    shapes = {tuple(r.shape) for r in checked.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rewards must have the same shape (B,), got { {k: tuple(v.shape) for k, v in checked.items()} }")
    weights = dict(weights) if weights is not None else {}
    unknown = sorted(set(weights) - set(checked))
    if unknown:
        raise ValueError(f"weights name rewards that are not given: {unknown} (rewards: {sorted(checked)})")
    if mode == "group_relative":
        if (group_ids is None) == (prompts is None):
            raise ValueError("group_relative fusion needs exactly one of group_ids or prompts")
        if group_ids is None:
            group_ids = group_ids_from_prompts(prompts)
        if group_ids.numel() != next(iter(shapes))[0]:
            raise ValueError(f"group_ids/prompts give {group_ids.numel()} samples for rewards of shape {next(iter(shapes))}")
    total = None
    for name, r in checked.items():
        w = float(weights.get(name, 1.0))
        term = group_normalize(r, group_ids, eps=eps, detach_stats=detach_stats) if mode == "group_relative" else r
        total = w * term if total is None else total + w * term
    return total
