"""Build the reward callable named in the config: none | toy | pisces | python:module:factory.

`pisces_fast.rewards` is imported lazily (only for kind "pisces") so training works without it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional


def build_reward(cfg, device) -> Optional[Callable]:
    kind = cfg.kind
    if kind == "none":
        return None
    if kind == "toy":
        from .toy_rewards import ToyColorReward

        reward = ToyColorReward(**cfg.kwargs)
    elif kind == "pisces":
        try:
            from pisces_fast.rewards import PiscesRewards
        except ImportError as exc:
            raise ImportError("reward.kind 'pisces' needs pisces_fast.rewards.PiscesRewards, which failed to import: "
                              f"{exc}") from exc
        if cfg.path is not None and hasattr(PiscesRewards, "from_pretrained"):
            reward = PiscesRewards.from_pretrained(cfg.path, **cfg.kwargs)
        else:
            reward = PiscesRewards(**cfg.kwargs)
    elif kind.startswith("python:"):
        target = kind[len("python:"):]
        module_name, _, attr = target.partition(":")
        if not attr:
            raise ValueError(f"reward.kind: expected 'python:package.module:factory', got {kind!r}")
        factory = getattr(importlib.import_module(module_name), attr)
        reward = factory(**cfg.kwargs)
    else:
        raise ValueError(f"reward.kind: expected 'none', 'toy', 'pisces' or 'python:module:factory', got {kind!r}")
    if hasattr(reward, "to"):
        reward = reward.to(device)
    if hasattr(reward, "requires_grad_"):
        reward.requires_grad_(False)  # gradients flow to the video, never into the reward model
        reward.eval()
    return reward
