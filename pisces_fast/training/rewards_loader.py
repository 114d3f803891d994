"""Build the reward callable named in the config: none | toy | pisces | python:module:factory.

Kind "pisces" is built by `pisces_fast.rewards.build` from the `reward:` section (schema: RewardConfig).
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
        from pisces_fast.rewards.build import build_pisces_rewards, pisces_reward_spec_from_dict

        # Paths were resolved (relative to the YAML) by TrainConfig.validate().
        reward = build_pisces_rewards(pisces_reward_spec_from_dict(cfg.pisces_section()), device)
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
