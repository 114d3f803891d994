"""Fusing several rewards into one scalar per sample.

`fuse_rewards(rewards, weights, mode, group_size)`:
- "equal": sum_k w_k r_k (the paper's Eq. 5 uses w = 1 for the quality and the semantic reward);
- "group": each reward is first standardised within its prompt group, (r_k - mean_group) / (std_group + eps),
  then weighted and summed, so rewards on different scales contribute comparably (group-relative fusion, as
  GRPO's advantages). Samples are laid out group-major: group g holds rows [g*G, (g+1)*G).
If `pisces_fast.rewards` later ships its own fusion, this function is the training side's reference for it.
"""
from __future__ import annotations

from typing import Optional

import torch


def fuse_rewards(rewards: dict, weights: dict, mode: str = "equal", group_size: Optional[int] = None,
                 eps: float = 1e-6) -> torch.Tensor:
    if not rewards:
        raise ValueError("rewards: expected a non-empty dict of (B,) tensors")
    if mode not in ("equal", "group"):
        raise ValueError(f"mode: expected 'equal' or 'group', got {mode!r}")
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(f"weights: reward(s) {missing} not produced by the reward model (it gave {sorted(rewards)})")
    total = None
    for name, w in weights.items():
        r = rewards[name]
        if not isinstance(r, torch.Tensor) or r.dim() != 1:
            raise ValueError(f"rewards[{name!r}]: expected a (B,) tensor, got {getattr(r, 'shape', type(r))}")
        if mode == "group":
            if group_size is None or group_size < 2 or r.numel() % group_size:
                raise ValueError(f"group_size: expected an integer >= 2 dividing the batch ({r.numel()}), got {group_size}")
            g = r.float().view(-1, group_size)
            r = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + eps)).reshape(-1)
        term = float(w) * r.float()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weights: expected at least one reward weight")
    return total
