"""Sampler steps with log-probabilities and the losses of the three modes, as plain tensor functions.

Every step here is checked against diffusers' schedulers in tests (DDIMScheduler.step with eta and
variance_noise; FlowMatchEulerDiscreteScheduler.step), so the training math and the inference pipelines agree.
Log-probabilities are averaged over the latent elements (as Flow-GRPO / DanceGRPO do), which is why PPO clip
ranges are ~1e-4; they are computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# epsilon models (DDIM)


def ddim_step(ab_t: torch.Tensor, ab_prev: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps."""
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


def ddim_sde_mean_std(ab_t: torch.Tensor, ab_prev: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, eta: float):
    """Mean and std of DDIM's stochastic step p(x_prev | x_t) with eta > 0 (DDPO's SDE for epsilon models)."""
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = ab_prev.sqrt() * x0 + (1 - ab_prev - std ** 2).clamp(min=0).sqrt() * eps
    return mean, std


# ----------------------------------------------------------------------------------------------------------
# flow models


def flow_sde_mean_std(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                      noise_level: float, sigma_max: float):
    """Flow-GRPO's SDE step: the reverse-time SDE with the same marginals as the flow ODE.

    std_t = noise_level * sqrt(sigma / (1 - sigma)) (sigma = 1 replaced by sigma_max to stay finite);
    mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt, with dt = sigma_next - sigma < 0;
    the step's std is std_t * sqrt(-dt).
    """
    s = sigma
    s_safe = torch.where(s >= 1, torch.as_tensor(sigma_max, dtype=s.dtype, device=s.device), s)
    std_t = noise_level * (s / (1 - s_safe)).sqrt()
    dt = sigma_next - s
    mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * (-dt).sqrt()


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2) averaged over all non-batch elements -> (B,)."""
    std = std.expand_as(mean) if std.dim() == mean.dim() else std
    lp = -((sample - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------
# consistency distillation


def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2): at t = 0 the consistency function is
    the identity (c_skip = 1, c_out = 0), as LCM / T2V-Turbo use."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt((pred - target)^2 + c^2) - c, averaged (elementwise, as T2V-Turbo)."""
    return (((pred.float() - target.float()) ** 2 + c ** 2).sqrt() - c).mean()


# ----------------------------------------------------------------------------------------------------------
# GRPO (Eq. 6)


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps), clipped to [-clip, clip]. Rewards are laid out group-major."""
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards: expected shape (num_prompts * group_size,) with group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)
    return adv.clamp(-clip, clip).reshape(-1)


def grpo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """max(-rho A, -clip(rho, 1-e, 1+e) A) averaged over samples; also returns the clipped fraction."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    frac = ((ratio - 1).abs() > clip_range).float().mean()
    return loss, frac, ratio


def ppo_diagnostics(logp: torch.Tensor, logp_old: torch.Tensor, clip_range: float) -> dict:
    """What a PPO step did, per sample batch: ratio mean/min/max, the clipped fraction, and the approximate
    KL(old || new) estimator k3 = E[(rho - 1) - log rho] (>= 0, unbiased; Schulman's "approx_kl")."""
    with torch.no_grad():
        log_ratio = (logp - logp_old).float()
        ratio = log_ratio.exp()
        return {"ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
                "clipfrac": float(((ratio - 1).abs() > clip_range).float().mean()),
                "approx_kl": float(((ratio - 1) - log_ratio).mean())}


def gaussian_kl_same_std(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, s^2) || N(mean_ref, s^2)) = (mean - mean_ref)^2 / (2 s^2), averaged per sample -> (B,)."""
    std = std.expand_as(mean) if std.dim() == mean.dim() else std
    return (((mean - mean_ref) ** 2) / (2 * std ** 2)).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO


def diffusion_dpo_loss(mse_w: torch.Tensor, mse_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float):
    """Diffusion-DPO: inside = -1/2 beta [(mse_w - mse_l) - (ref_w - ref_l)], loss = -log sigmoid(inside).

    Returns (loss, implicit accuracy = mean(inside > 0), inside)."""
    inside = -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean(), inside
