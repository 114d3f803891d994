"""The three training objectives: `cd` (Eq. 5 / Algorithm 1), `grpo` (Eq. 6, + CD), `dpo` (DF-DPO).

Each mode's `loss(batch, step)` returns (scalar loss, {term: float}). The denoiser is always run through
`forward` (plain module or DeepSpeed engine); the frozen teacher / reference policy is the same network with
the LoRA adapter disabled, the EMA target theta^- a second (frozen) adapter.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from . import diffusion_math as dm
from .generators import VideoGenerator, bcast
from .lora import EMA_ADAPTER, active_adapter, adapter_disabled
from .reward_fusion import fuse_rewards


class _Mode:
    def __init__(self, gen: VideoGenerator, forward: Callable, denoiser: torch.nn.Module, cfg, reward: Optional[Callable]):
        self.gen, self.forward, self.denoiser, self.cfg, self.reward = gen, forward, denoiser, cfg, reward
        self.device = gen.device

    def score(self, latents: torch.Tensor, prompts: list[str], group_size: Optional[int]):
        """Decode (frames subsampled first where possible), score, fuse -> (fused (B,), {name: mean})."""
        video = self.gen.decode_latents(latents, self.cfg.reward.num_frames)
        rewards = self.reward(video, list(prompts))
        if not isinstance(rewards, dict):
            raise TypeError(f"reward: expected a dict of (B,) tensors, got {type(rewards).__name__}")
        weights = {k: v for k, v in self.cfg.reward.weights.items() if v != 0}
        fused = fuse_rewards(rewards, weights, self.cfg.reward.fusion, group_size)
        return fused, {f"reward/{k}": float(v.detach().float().mean()) for k, v in rewards.items()}

    def after_optimizer_step(self) -> None:
        pass


class ConsistencyDistillation(_Mode):
    """LCM-style CD: student at t_{n+k}, teacher ODE step with CFG to t_n, target theta^- at t_n, boundary conditions,
    pseudo-Huber; the student's one-step x0 is decoded and scored by the rewards (L = L_CD - R)."""

    def __init__(self, *args, ema_decay: Optional[float] = None, backend=None):
        super().__init__(*args)
        c = self.cfg.cd
        self.S, self.k = c.num_ddim_timesteps, c.skip_k
        if self.gen.prediction == "epsilon":
            ratio = self.gen.num_train_timesteps // self.S
            if ratio < 1:
                raise ValueError(f"cd.num_ddim_timesteps: at most {self.gen.num_train_timesteps}, got {self.S}")
            self.grid = (torch.arange(1, self.S + 1) * ratio - 1).to(self.device)  # t_1 < ... < t_S
            self.ratio = ratio
        else:
            self.grid = self.gen.flow_sigmas(self.S).flip(0).to(self.device)  # 0 = sigma_0 < ... < sigma_S
        self.ema_decay = ema_decay
        self.backend = backend

    def _timesteps(self, batch: int):
        if self.gen.prediction == "epsilon":
            idx = torch.randint(0, self.S, (batch,), device=self.device)
            t_start = self.grid[idx]
            t_end = (t_start - self.k * self.ratio).clamp(min=0)
            return t_start, t_end, t_start.float(), t_end.float()
        idx = torch.randint(self.k, self.S + 1, (batch,), device=self.device)
        s_start, s_end = self.grid[idx], self.grid[idx - self.k]
        n = self.gen.num_train_timesteps
        return s_start, s_end, s_start * n, s_end * n

    def _boundary(self, z: torch.Tensor, x0: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = dm.lcm_boundary_scalings(t_scaled, self.cfg.cd.sigma_data, self.cfg.cd.timestep_scaling)
        return bcast(c_skip, z) * z + bcast(c_out, z) * x0

    def cd_terms(self, z0: torch.Tensor, prompts: list[str]):
        gen, c = self.gen, self.cfg.cd
        B = z0.shape[0]
        cond, uncond = gen.encode_text(prompts), gen.encode_text([""] * B)
        noise = torch.randn_like(z0)
        t_start, t_end, ts_scaled, te_scaled = self._timesteps(B)
        w = float(torch.empty(()).uniform_(c.guidance_scale_min, c.guidance_scale_max)) \
            if c.guidance_scale_max > c.guidance_scale_min else c.guidance_scale_min
        z_t = gen.add_noise(z0, noise, t_start)
        out = gen.denoise(self.forward, z_t, t_start, cond)
        pred = self._boundary(z_t, gen.x0_from_output(z_t, out, t_start), ts_scaled)
        with torch.no_grad():
            with adapter_disabled(self.denoiser):
                teacher = gen.guided(self.forward, z_t, t_start, cond, uncond, w)
            if gen.prediction == "epsilon":
                x0_teacher = gen.x0_from_output(z_t, teacher, t_start)
                ab_end = gen.alpha_at(z_t, t_end)
                z_end = ab_end.sqrt() * x0_teacher + (1 - ab_end).sqrt() * teacher
            else:
                z_end = z_t + bcast(t_end - t_start, z_t) * teacher  # Euler step of the flow ODE
            ctx = active_adapter(self.denoiser, EMA_ADAPTER) if self.ema_decay else contextlib.nullcontext()
            with ctx:
                out_target = gen.denoise(self.forward, z_end, t_end, cond)
            target = self._boundary(z_end, gen.x0_from_output(z_end, out_target, t_end), te_scaled)
        loss_cd = dm.pseudo_huber(pred, target, c.huber_c)
        return loss_cd, pred, {"guidance_scale": w}

    def loss(self, batch: dict, step: int):
        prompts = batch["caption"]
        z0 = self.gen.encode_video(batch["video"])
        loss_cd, pred, metrics = self.cd_terms(z0, prompts)
        loss = self.cfg.cd.cd_weight * loss_cd
        metrics["loss_cd"] = float(loss_cd.detach())
        if self.reward is not None:
            fused, rm = self.score(pred, prompts, group_size=len(prompts) if self.cfg.reward.fusion == "group" else None)
            loss_reward = -self.cfg.cd.reward_scale * fused.mean()
            loss = loss + loss_reward
            metrics.update(rm)
            metrics["loss_reward"] = float(loss_reward.detach())
        return loss, metrics

    def after_optimizer_step(self) -> None:
        if not self.ema_decay:
            return
        from .lora import ema_update, lora_parameters

        params = [p for _, p in lora_parameters(self.denoiser)] + [p for _, p in lora_parameters(self.denoiser, EMA_ADAPTER)]
        with self.backend.gathered(params, modifier_rank=0):
            ema_update(self.denoiser, self.ema_decay)


class GRPO(_Mode):
    """Eq. 6: G SDE rollouts per prompt with per-step log-probs, group advantages, PPO clip on a random fraction of
    the steps, optional KL to the adapter-disabled reference; plus the CD loss (L_totalGRPO)."""

    def __init__(self, *args, cd: Optional[ConsistencyDistillation] = None):
        super().__init__(*args)
        if self.reward is None:
            raise ValueError("mode grpo needs a reward: set reward.kind to 'toy', 'pisces' or 'python:...'")
        self.cd = cd
        g = self.cfg.grpo
        self.ts = self.gen.sampling_timesteps(g.num_sampling_steps).to(self.device)
        if self.gen.prediction == "epsilon":
            self.ratio = self.gen.num_train_timesteps // g.num_sampling_steps
        else:
            self.sigma_max = float(self.ts[1]) if len(self.ts) > 2 else 0.99

    def _step_dist(self, x: torch.Tensor, out: torch.Tensor, i: int):
        g = self.cfg.grpo
        if self.gen.prediction == "epsilon":
            t = self.ts[i]
            return dm.ddim_sde_mean_std(self.gen.alpha_at(x, t), self.gen.alpha_at(x, t - self.ratio), x, out, g.eta)
        s, s_next = self.ts[i], self.ts[i + 1]
        return dm.flow_sde_mean_std(x, out, s, s_next, g.noise_level, self.sigma_max)

    def _predict(self, x, i, cond, uncond):
        return self.gen.guided(self.forward, x, self.ts[i], cond, uncond, self.cfg.grpo.guidance_scale)

    @property
    def num_steps(self) -> int:
        return self.cfg.grpo.num_sampling_steps

    @torch.no_grad()
    def rollout(self, prompts_per_group: list[str]) -> dict:
        """G SDE samples per prompt from the current policy (theta_old), their per-step log-probs, rewards and
        group advantages."""
        g, gen = self.cfg.grpo, self.gen
        prompts = [p for p in prompts_per_group for _ in range(g.group_size)]
        N = len(prompts)
        cond, uncond = gen.encode_text(prompts), gen.encode_text([""] * N)
        shape = gen.latent_shape(N)
        if g.shared_noise:
            x = torch.randn((N // g.group_size, *shape[1:]), device=self.device).repeat_interleave(g.group_size, 0)
        else:
            x = torch.randn(shape, device=self.device)
        traj, logp_old = [x], []
        for i in range(self.num_steps):
            mean, std = self._step_dist(x, self._predict(x, i, cond, uncond), i)
            std = bcast(std, mean)
            x = mean + std * torch.randn_like(mean)
            logp_old.append(dm.gaussian_logprob(x, mean, std))
            traj.append(x)
        fused, metrics = self.score(x, prompts, g.group_size)
        adv = dm.group_advantages(fused, g.group_size, g.adv_clip)
        metrics.update({"reward_fused": float(fused.mean()), "advantage_abs": float(adv.abs().mean())})
        return {"cond": cond, "uncond": uncond, "traj": traj, "logp_old": logp_old, "adv": adv, "metrics": metrics}

    def policy_loss(self, ro: dict, steps: Optional[list[int]] = None):
        """Eq. 6 (+ beta KL) averaged over the chosen sampling steps (a random `timestep_fraction` of them)."""
        g = self.cfg.grpo
        if steps is None:
            n_train = max(1, int(round(g.timestep_fraction * self.num_steps)))
            steps = torch.randperm(self.num_steps)[:n_train].tolist()
        cond, uncond, traj = ro["cond"], ro["uncond"], ro["traj"]
        loss_pg, loss_kl, clipfrac = 0.0, 0.0, 0.0
        for i in steps:
            mean, std = self._step_dist(traj[i], self._predict(traj[i], i, cond, uncond), i)
            std = bcast(std, mean)
            logp = dm.gaussian_logprob(traj[i + 1], mean, std)
            lp, frac, _ = dm.grpo_clip_loss(logp, ro["logp_old"][i], ro["adv"], g.clip_range)
            loss_pg = loss_pg + lp / len(steps)
            clipfrac += float(frac) / len(steps)
            if g.kl_beta > 0:
                with torch.no_grad(), adapter_disabled(self.denoiser):
                    mean_ref, _ = self._step_dist(traj[i], self._predict(traj[i], i, cond, uncond), i)
                loss_kl = loss_kl + dm.gaussian_kl_same_std(mean, mean_ref, std).mean() / len(steps)
        metrics = {"loss_grpo": float(loss_pg.detach()), "clipfrac": clipfrac}
        if g.kl_beta > 0:
            metrics["kl"] = float(loss_kl.detach())
        return loss_pg + g.kl_beta * loss_kl, metrics

    def loss(self, batch: dict, step: int):
        g = self.cfg.grpo
        ro = self.rollout(list(batch["caption"]))
        loss, metrics = self.policy_loss(ro)
        metrics.update(ro["metrics"])
        if self.cd is not None and g.cd_weight > 0:
            # CD anchors the policy to the teacher (Appendix M); on data clips when the batch has them.
            z0 = self.gen.encode_video(batch["video"]) if "video" in batch else ro["traj"][-1][:: g.group_size]
            loss_cd, _, _ = self.cd.cd_terms(z0, list(batch["caption"]))
            loss = loss + g.cd_weight * loss_cd
            metrics["loss_cd"] = float(loss_cd.detach())
        return loss, metrics

    def after_optimizer_step(self) -> None:
        if self.cd is not None:
            self.cd.after_optimizer_step()


class DFDPO(_Mode):
    """Discriminator-free DPO: winner = real clip, loser = distorted copy (curriculum), Diffusion-DPO loss with the
    same noise and timestep for the pair, reference = adapter disabled, + lambda * SFT (denoising loss) on winners."""

    def __init__(self, *args):
        super().__init__(*args)
        from .distortions import DistortionCurriculum

        self.curriculum = DistortionCurriculum(self.cfg.dpo.curriculum, self.cfg.dpo.curriculum_every)

    def loss(self, batch: dict, step: int):
        gen, p = self.gen, self.cfg.dpo
        win = batch["video"].to(self.device)
        lose, ops = self.curriculum(win, step)
        B = win.shape[0]
        z = torch.cat([gen.encode_video(win), gen.encode_video(lose)])
        noise = torch.randn_like(z[:B]).repeat(2, 1, 1, 1, 1)
        t = gen.sample_train_t(B, self.device).repeat(2)
        x_t = gen.add_noise(z, noise, t)
        target = gen.training_target(z, noise)
        cond = gen.encode_text(list(batch["caption"]))
        cond2 = cond.cat(cond)
        out = gen.denoise(self.forward, x_t, t, cond2)
        mse = ((out - target) ** 2).flatten(1).mean(1)
        with torch.no_grad(), adapter_disabled(self.denoiser):
            ref = ((gen.denoise(self.forward, x_t, t, cond2) - target) ** 2).flatten(1).mean(1)
        mse_w, mse_l = mse.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        loss_dpo, acc, inside = dm.diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, p.beta)
        loss_sft = mse_w.mean()
        loss = loss_dpo + p.sft_weight * loss_sft
        stage = self.curriculum.stages.index(self.curriculum.stage(step))
        metrics = {"loss_dpo": float(loss_dpo.detach()), "loss_sft": float(loss_sft.detach()), "implicit_acc": float(acc),
                   "dpo_margin": float(inside.detach().mean()), "mse_win": float(mse_w.detach().mean()), "mse_lose": float(mse_l.detach().mean()),
                   "curriculum_stage": stage}
        return loss, metrics
