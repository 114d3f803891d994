"""Samplers of a `VideoGenerator` (C1): latents out; `VideoGenerator.sample` decodes them to pixels.

sampler="ddim": the deterministic sampler of the stock pipelines' default schedulers. Epsilon models: DDIM with
eta = 0 on `DDIMScheduler.set_timesteps(n)` (as `TextToVideoSDPipeline` with its DDIMScheduler); flow models: the
Euler ODE on the family's sigma grid (as `WanPipeline` / `HunyuanVideoPipeline` with
FlowMatchEulerDiscreteScheduler).

sampler="consistency": few-step multistep consistency sampling (a teacher sampled this way is "the stochastic
multistep sampler"). Each step maps x_t to the consistency function's x0 and re-noises it to the next timestep with
fresh noise; the last step returns x0.
- epsilon (LCM): timesteps of `LCMScheduler.set_timesteps(n)` on the `original_inference_steps` grid (50 =
  cd.num_ddim_timesteps) and the boundary condition f = c_skip(t) x_t + c_out(t) x0(eps) with sigma_data 0.5 and
  `timestep_scaling` (10; the generator's consistency_* attributes, set by the CD mode from cd.*; LCMScheduler
  hard-codes sigma_data 0.5): step for step `LCMScheduler.step` (tested). `TextToVideoSDPipeline` reshapes latents to
  (B*F, C, h, w) before `scheduler.step`, so the fresh noise is drawn in that (frame-major) layout too: the same
  `generator` gives the same frames as the stock pipeline with LCMScheduler.
- flow: f = x - sigma v (it already satisfies f(x, 0) = x; the CD mode trains flow students with this
  parameterisation), re-noised as (1 - sigma') f + sigma' noise on the family's sigma grid: step for step
  `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).step`, noise drawn in the latent layout (B, C, F, h, w).
  `WanPipeline` / `HunyuanVideoPipeline` do not pass their generator to `scheduler.step`, so their fresh noise
  comes from the global torch RNG: sample here with generator=None (and the same torch.manual_seed) to match.

Guidance: a w-conditioned denoiser (Hunyuan's `guidance`, a UNet3D student's `timestep_cond`) gets guidance_scale
as its input in one pass; otherwise classifier-free guidance with two passes (none when guidance_scale == 1).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import diffusion_math as dm

SAMPLERS = ("ddim", "consistency")


def check_sampler(sampler: str, name: str = "sampler") -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"{name}: expected one of {SAMPLERS}, got {sampler!r}")
    return sampler


def consistency_scheduler_config(gen) -> dict:
    """The generator's scheduler config on its consistency grid: what LCMScheduler / TCDScheduler `from_config` need
    to sample it as the consistency sampler does."""
    return {**gen.scheduler.config, "original_inference_steps": gen.consistency_original_steps,
            "timestep_scaling": gen.consistency_timestep_scaling}


def lcm_timesteps(gen, num_steps: int) -> torch.Tensor:
    """Decreasing LCMScheduler timesteps for `num_steps` steps on the generator's consistency grid."""
    from diffusers import LCMScheduler

    lcm = LCMScheduler.from_config(consistency_scheduler_config(gen))
    if num_steps > gen.consistency_original_steps:
        raise ValueError(f"num_steps: the consistency sampler takes at most original_inference_steps="
                         f"{gen.consistency_original_steps} steps, got {num_steps}")
    lcm.set_timesteps(num_steps)
    return lcm.timesteps.long().clone()


def lcm_step(gen, x: torch.Tensor, eps: torch.Tensor, t: int, t_next: Optional[int],
             noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCM step: (x at t_next, denoised x0). t_next None = last step (returns x0 itself)."""
    ab_t = gen.alpha_at(x, t)
    c_skip, c_out = dm.lcm_boundary_scalings(torch.tensor(float(t)), gen.consistency_sigma_data,
                                             gen.consistency_timestep_scaling)
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    denoised = float(c_out) * x0 + float(c_skip) * x
    if t_next is None:
        return denoised, denoised
    ab_next = gen.alpha_at(x, t_next)
    return ab_next.sqrt() * denoised + (1 - ab_next).sqrt() * noise, denoised


def flow_consistency_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                          noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = x - sigma v, re-noised to sigma_next (the last step, sigma_next = 0, returns x0)."""
    x0 = x - sigma * v
    if noise is None or float(sigma_next) == 0:
        return x0, x0
    return (1 - sigma_next) * x0 + sigma_next * noise, x0


def _fresh_noise(gen, shape: tuple, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Noise for a consistency step, in the layout the family's stock pipeline draws it (see the module doc)."""
    dev = generator.device if generator is not None else device
    if gen.arch == "unet3d":  # TextToVideoSDPipeline steps on (B*F, C, h, w)
        B, C, F, h, w = shape
        return torch.randn((B, F, C, h, w), generator=generator, device=dev).permute(0, 2, 1, 3, 4).to(device)
    return torch.randn(shape, generator=generator, device=dev).to(device)


@torch.no_grad()
def sample_latents(gen, forward: Callable, prompts: list[str], num_steps: int, guidance_scale: float = 1.0,
                   generator: Optional[torch.Generator] = None, on_step: Optional[Callable[[], None]] = None, *,
                   sampler: str = "ddim", latents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final latents (B, C, F, h, w) of `sampler` from `latents` (or noise drawn with `generator`)."""
    check_sampler(sampler)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
    shape = gen.latent_shape(len(prompts))
    if latents is None:
        dev = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=dev).to(gen.device)
    else:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected a tensor of shape {tuple(shape)} (B, C, F, h, w), got {got}")
        x = latents.to(gen.device, torch.float32)
    cond = gen.encode_text(list(prompts))
    uncond = None if gen.w_conditioned or guidance_scale == 1.0 else gen.encode_text([""] * len(prompts))

    def predict(x, t):
        return gen.guided(forward, x, t, cond, uncond, guidance_scale)

    def tick():
        if on_step is not None:
            on_step()

    if gen.prediction == "epsilon":
        if sampler == "ddim":
            ts = gen.sampling_timesteps(num_steps).to(gen.device)
            ratio = gen.num_train_timesteps // num_steps
            for t in ts:
                x = dm.ddim_step(gen.alpha_at(x, t), gen.alpha_at(x, t - ratio), x, predict(x, t))
                tick()
            return x
        ts = lcm_timesteps(gen, num_steps).tolist()
        for i, t in enumerate(ts):
            eps = predict(x, torch.tensor(t, device=gen.device))
            last = i == len(ts) - 1
            noise = None if last else _fresh_noise(gen, shape, generator, gen.device)
            x, _ = lcm_step(gen, x, eps, t, None if last else ts[i + 1], noise)
            tick()
        return x
    sigmas = gen.flow_sigmas(num_steps).to(gen.device)
    for i in range(len(sigmas) - 1):
        v = predict(x, sigmas[i])
        if sampler == "ddim":
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        else:
            last = i == len(sigmas) - 2
            noise = None if last else _fresh_noise(gen, shape, generator, gen.device)
            x, _ = flow_consistency_step(x, v, sigmas[i], sigmas[i + 1], noise)
        tick()
    return x
