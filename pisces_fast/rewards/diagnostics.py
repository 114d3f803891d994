"""Reward-gradient diagnostics (PISCES Figure 8): do the two rewards pull the video the same way?

The paper logs the cosine similarity between ∇_video R_quality and ∇_video R_semantic during
training (it stays near 0: the objectives are complementary). Two entry points:

* :func:`gradient_cosine` reuses an existing graph (e.g. the training step's reward forward):
  two ``autograd.grad`` calls with ``retain_graph=True``, nothing recomputed.
* :func:`reward_diagnostics` runs the rewards on a detached copy of a video batch — one reward
  forward and two reward backward passes, never through the generator — for periodic logging.

Both give per-sample values: sample i's rewards depend only on video i (the reward model is
frozen, in eval mode), so the gradient of the batch sum holds every sample's own gradient.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def gradient_cosine(quality: torch.Tensor, semantic: torch.Tensor, wrt: torch.Tensor, *, eps: float = 1e-12) -> Dict[str, torch.Tensor]:
    """Per-sample cosine of ``∇_wrt quality[i]`` and ``∇_wrt semantic[i]`` (the graph is kept).

    Args:
        quality, semantic: ``(B,)`` rewards computed from ``wrt``.
        wrt: the ``(B, ...)`` tensor to differentiate against (the generated video).

    Returns:
        ``{"grad_cosine": (B,), "grad_norm_quality": (B,), "grad_norm_semantic": (B,)}``, detached.
        A sample whose gradient is exactly zero for either reward gets cosine 0.
    """
    for name, r in (("quality", quality), ("semantic", semantic)):
        if not isinstance(r, torch.Tensor) or r.dim() != 1:
            raise ValueError(f"{name} must be a (B,) tensor, got {getattr(r, 'shape', type(r).__name__)}")
    if not isinstance(wrt, torch.Tensor) or wrt.dim() < 1 or wrt.shape[0] != quality.shape[0] or semantic.shape != quality.shape:
        raise ValueError("quality and semantic must be (B,) and wrt must be (B, ...) with the same B")
    if not wrt.requires_grad:
        raise ValueError("wrt does not require grad: compute the rewards from a tensor with requires_grad=True")
    (g_q,) = torch.autograd.grad(quality.sum(), wrt, retain_graph=True, allow_unused=True)
    (g_s,) = torch.autograd.grad(semantic.sum(), wrt, retain_graph=True, allow_unused=True)
    b = wrt.shape[0]
    g_q = torch.zeros_like(wrt) if g_q is None else g_q
    g_s = torch.zeros_like(wrt) if g_s is None else g_s
    g_q, g_s = g_q.reshape(b, -1).double(), g_s.reshape(b, -1).double()
    n_q, n_s = g_q.norm(dim=1), g_s.norm(dim=1)
    cos = (g_q * g_s).sum(1) / (n_q * n_s).clamp_min(eps)
    return {"grad_cosine": cos.float(), "grad_norm_quality": n_q.float(), "grad_norm_semantic": n_s.float()}


def reward_diagnostics(rewards, video: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Both rewards and their gradient cosine for a video batch (detached; for logging).

    Args:
        rewards: a :class:`~pisces_fast.rewards.PiscesRewards` (any module returning
            ``{"quality", "semantic"}`` from ``(video, prompts)``).
        video: ``(B, T, 3, H, W)`` in [0, 1] (it is detached first; the generator is not touched).

    Returns:
        ``{"quality", "semantic", "grad_cosine", "grad_norm_quality", "grad_norm_semantic"}``,
        each ``(B,)`` and detached; ``grad_cosine.mean()`` is Figure 8's curve.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    x = video.detach().requires_grad_(True)
    with torch.enable_grad():
        out = rewards(x, prompts)
        stats = gradient_cosine(out["quality"], out["semantic"], x)
    return {"quality": out["quality"].detach(), "semantic": out["semantic"].detach(), **stats}
