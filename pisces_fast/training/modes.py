"""The three training objectives: `cd` (Eq. 5 / Algorithm 1), `grpo` (Eq. 6, + CD), `dpo` (DF-DPO).

Each mode's `loss(batch, step)` returns (scalar loss, {term: float}). The denoiser is always run through
`forward` (plain module or DeepSpeed engine); the frozen teacher / reference policy is the same network with
the LoRA adapter disabled, the EMA target theta^- a second (frozen) adapter.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from pisces_fast.rewards.fusion import fuse_rewards, group_ids_from_prompts, grpo_advantages

from . import diffusion_math as dm
from .generators import VideoGenerator, bcast
from .lora import EMA_ADAPTER, active_adapter, adapter_disabled


class _Mode:
    def __init__(self, gen: VideoGenerator, forward: Callable, denoiser: torch.nn.Module, cfg, reward: Optional[Callable]):
        self.gen, self.forward, self.denoiser, self.cfg, self.reward = gen, forward, denoiser, cfg, reward
        self.device = gen.device

    def rewards_of(self, latents: torch.Tensor, prompts: list[str]):
        """Decode (frames subsampled first where possible) and score -> ({name: (B,)}, {reward/name: mean})."""
        r = self.cfg.reward
        video = self.gen.decode_latents(latents, r.num_frames, r.vae_decode, r.vae_checkpointing, r.vae_tiling)
        rewards = self.reward(video, list(prompts))
        if not isinstance(rewards, dict):
            raise TypeError(f"reward: expected a dict of (B,) tensors, got {type(rewards).__name__}")
        return rewards, {f"reward/{k}": float(v.detach().float().mean()) for k, v in rewards.items()}

    def score(self, latents: torch.Tensor, prompts: list[str]):
        """Rewards fused with reward.weights / reward.fusion, groups = prompts -> (fused (B,), {reward/name: mean})."""
        rewards, metrics = self.rewards_of(latents, prompts)
        fused = fuse_rewards(rewards, self.cfg.reward.weights, self.cfg.reward.fusion,
                             group_ids_from_prompts(list(prompts), device=latents.device))
        return fused, metrics

    def repeat_for_groups(self, prompts: list[str], z0: torch.Tensor):
        """reward.fusion 'group': each caption repeated reward.group_size times (each copy gets its own noise and
        timestep), so every reward is normalised across generations of the same prompt (PISCES Table 4)."""
        if self.reward is None or self.cfg.reward.fusion != "group":
            return list(prompts), z0
        g = self.cfg.reward.group_size
        return [p for p in prompts for _ in range(g)], z0.repeat_interleave(g, dim=0)

    def after_optimizer_step(self) -> None:
        pass


class ConsistencyDistillation(_Mode):
    """LCM-style CD: student at t_{n+k}, teacher ODE step with CFG to t_n, target theta^- at t_n, boundary conditions,
    pseudo-Huber; the student's one-step x0 is decoded and scored by the rewards (L = L_CD - R).

    Consistency function: epsilon, LCM's c_skip(t) x + c_out(t) x0(eps) (sigma_data, timestep_scaling); flow,
    x - sigma v (already the identity at sigma = 0), so the student is sampled exactly by LCMScheduler /
    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) and `sampler="consistency"`.
    Guidance: the teacher uses CFG at s ~ U[cd.guidance_scale_min, max] (Hunyuan: its embedded guidance). A
    w-conditioned student (`gen.w_conditioned`: cd.guidance_conditioning on UNet3D, always for Hunyuan) gets s as
    its w input; otherwise it learns the fixed-s teacher and is sampled with guidance_scale 1."""

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
        # The consistency sampler (validation, the API) uses the grid and boundary condition trained here.
        self.gen.use_consistency_config(c)

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
        if self.gen.prediction == "flow":
            return x0  # x - sigma v
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
        w_student = w if gen.w_conditioned else None
        z_t = gen.add_noise(z0, noise, t_start)
        out = gen.denoise(self.forward, z_t, t_start, cond, guidance=w_student)
        pred = self._boundary(z_t, gen.x0_from_output(z_t, out, t_start), ts_scaled)
        with torch.no_grad():
            with adapter_disabled(self.denoiser):
                teacher = gen.guided(self.forward, z_t, t_start, cond, uncond, w, w_input=gen.guidance_embeds)
            if gen.prediction == "epsilon":
                x0_teacher = gen.x0_from_output(z_t, teacher, t_start)
                ab_end = gen.alpha_at(z_t, t_end)
                z_end = ab_end.sqrt() * x0_teacher + (1 - ab_end).sqrt() * teacher
            else:
                z_end = z_t + bcast(t_end - t_start, z_t) * teacher  # Euler step of the flow ODE
            ctx = active_adapter(self.denoiser, EMA_ADAPTER) if self.ema_decay else contextlib.nullcontext()
            with ctx:
                out_target = gen.denoise(self.forward, z_end, t_end, cond, guidance=w_student)
            target = self._boundary(z_end, gen.x0_from_output(z_end, out_target, t_end), te_scaled)
        loss_cd = dm.pseudo_huber(pred, target, c.huber_c)
        return loss_cd, pred, {"guidance_scale": w}

    def loss(self, batch: dict, step: int):
        prompts, z0 = self.repeat_for_groups(batch["caption"], self.gen.encode_video(batch["video"]))
        loss_cd, pred, metrics = self.cd_terms(z0, prompts)
        loss = self.cfg.cd.cd_weight * loss_cd
        metrics["loss_cd"] = float(loss_cd.detach())
        if self.reward is not None:
            fused, rm = self.score(pred, prompts)
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


@contextlib.contextmanager
def dropout_off(module: torch.nn.Module):
    """Eval mode for the duration (UNet3D's temporal convolutions have dropout p=0.1): a rollout's log-probs, their
    recomputation under the policy, and the reference's predictions must all come from the same deterministic
    function, or the PPO ratio and the DPO implicit reward measure dropout noise instead of the adapter's change.
    Gradients still flow (eval mode only switches the dropout/normalisation behaviour)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class GRPO(_Mode):
    """Eq. 6: G SDE rollouts per prompt with per-step log-probs, group advantages, PPO clip on a random fraction of
    the steps, optional KL to the adapter-disabled reference; plus the CD loss (L_totalGRPO).

    A rollout is reused for `grpo.updates_per_rollout` optimizer steps (the first is on-policy: every ratio is
    exactly 1; later ones are importance-weighted and clipped). The policy runs with dropout off everywhere in
    this objective (`dropout_off`). Logged per step: reward mean/std (fused, and each reward), advantage std,
    ratio mean/min/max, clip fraction, approx. KL(old || new), and the KL to the reference when kl_beta > 0.
    `grpo.sde_steps` > 0: only the first sde_steps sampling steps are stochastic and trained; the rest are
    deterministic (their noise would move the reward little but dominate the gradient, see the config field)."""

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
        self._rollout: Optional[dict] = None  # reused for grpo.updates_per_rollout steps

    def _step_dist(self, x: torch.Tensor, out: torch.Tensor, i: int):
        """Mean and std of sampling step i; a deterministic step (i >= sde_steps) has std 0 (DDIM eta 0 / ODE)."""
        g = self.cfg.grpo
        stochastic = i < self.num_sde_steps
        if self.gen.prediction == "epsilon":
            t = self.ts[i]
            return dm.ddim_sde_mean_std(self.gen.alpha_at(x, t), self.gen.alpha_at(x, t - self.ratio), x, out,
                                        g.eta if stochastic else 0.0)
        s, s_next = self.ts[i], self.ts[i + 1]
        return dm.flow_sde_mean_std(x, out, s, s_next, g.noise_level if stochastic else 0.0, self.sigma_max)

    def _predict(self, x, i, cond, uncond):
        return self.gen.guided(self.forward, x, self.ts[i], cond, uncond, self.cfg.grpo.guidance_scale)

    @property
    def num_steps(self) -> int:
        return self.cfg.grpo.num_sampling_steps

    @property
    def num_sde_steps(self) -> int:
        """The stochastic, trained sampling steps (the first ones): grpo.sde_steps, 0 = all."""
        return self.cfg.grpo.sde_steps or self.num_steps

    @torch.no_grad()
    def rollout(self, prompts_per_group: list[str], generator: Optional[torch.Generator] = None) -> dict:
        """G SDE samples per prompt from the current policy (theta_old), their per-step log-probs, rewards and
        group advantages. `generator`: fixed initial and per-step noise (held-out evaluation)."""
        g, gen = self.cfg.grpo, self.gen
        prompts = [p for p in prompts_per_group for _ in range(g.group_size)]
        N = len(prompts)
        cond, uncond = gen.encode_text(prompts), gen.encode_text([""] * N)
        shape = gen.latent_shape(N)

        def randn(shape):
            if generator is None:
                return torch.randn(shape, device=self.device)
            return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

        if g.shared_noise:
            x = randn((N // g.group_size, *shape[1:])).repeat_interleave(g.group_size, 0)
        else:
            x = randn(shape)
        traj, logp_old = [x], []
        with dropout_off(self.denoiser):
            for i in range(self.num_steps):
                mean, std = self._step_dist(x, self._predict(x, i, cond, uncond), i)
                if i < self.num_sde_steps:
                    std = bcast(std, mean)
                    x = mean + std * randn(mean.shape)
                    logp_old.append(dm.gaussian_logprob(x, mean, std))
                else:
                    x = mean  # deterministic step: no noise, no log-prob, not trained
                traj.append(x)
        rewards, metrics = self.rewards_of(x, prompts)
        group_ids = group_ids_from_prompts(prompts, device=x.device)
        # One fusion, one normalisation per prompt group (pisces_fast.rewards.fusion.grpo_advantages).
        adv, fused = grpo_advantages(rewards, self.cfg.reward.weights, self.cfg.reward.fusion, group_ids, clip=g.adv_clip)
        # The objective before any normalisation (the weighted sum), what held-out evaluation reports.
        raw = fuse_rewards(rewards, self.cfg.reward.weights, "equal").detach()
        metrics.update({"reward_mean": float(raw.mean()), "reward_std": float(raw.std(unbiased=False)),
                        "reward_fused": float(fused.mean()), "advantage_std": float(adv.std(unbiased=False)),
                        "advantage_abs": float(adv.abs().mean()),
                        "reward_group_std": float(raw.view(-1, g.group_size).std(1, unbiased=False).mean())})
        return {"cond": cond, "uncond": uncond, "traj": traj, "logp_old": logp_old, "adv": adv, "reward": raw,
                "prompts": prompts, "metrics": metrics}

    def policy_loss(self, ro: dict, steps: Optional[list[int]] = None):
        """Eq. 6 (+ beta KL) averaged over the chosen sampling steps (a random `timestep_fraction` of the SDE steps)."""
        g = self.cfg.grpo
        if steps is None:
            n_train = max(1, int(round(g.timestep_fraction * self.num_sde_steps)))
            steps = torch.randperm(self.num_sde_steps)[:n_train].tolist()
        cond, uncond, traj = ro["cond"], ro["uncond"], ro["traj"]
        loss_pg, loss_kl = 0.0, 0.0
        logps, logps_old = [], []
        with dropout_off(self.denoiser):
            for i in steps:
                mean, std = self._step_dist(traj[i], self._predict(traj[i], i, cond, uncond), i)
                std = bcast(std, mean)
                logp = dm.gaussian_logprob(traj[i + 1], mean, std)
                lp, _, _ = dm.grpo_clip_loss(logp, ro["logp_old"][i], ro["adv"], g.clip_range)
                loss_pg = loss_pg + lp / len(steps)
                logps.append(logp.detach())
                logps_old.append(ro["logp_old"][i])
                if g.kl_beta > 0:
                    with torch.no_grad(), adapter_disabled(self.denoiser):
                        mean_ref, _ = self._step_dist(traj[i], self._predict(traj[i], i, cond, uncond), i)
                    loss_kl = loss_kl + dm.gaussian_kl_same_std(mean, mean_ref, std).mean() / len(steps)
        metrics = {"loss_grpo": float(loss_pg.detach()),
                   **dm.ppo_diagnostics(torch.cat(logps), torch.cat(logps_old), g.clip_range)}
        if g.kl_beta > 0:
            metrics["kl"] = float(loss_kl.detach())
        return loss_pg + g.kl_beta * loss_kl, metrics

    def loss(self, batch: dict, step: int):
        g = self.cfg.grpo
        fresh = self._rollout is None or step % g.updates_per_rollout == 0
        if fresh:
            self._rollout = self.rollout(list(batch["caption"]))
        ro = self._rollout
        loss, metrics = self.policy_loss(ro)
        metrics.update(ro["metrics"])
        if self.cd is not None and g.cd_weight > 0:
            # CD anchors the policy to the teacher (Appendix M); on data clips when the batch has them.
            prompts = ro["prompts"][:: g.group_size]
            z0 = self.gen.encode_video(batch["video"]) if ("video" in batch and fresh) else ro["traj"][-1][:: g.group_size]
            loss_cd, _, _ = self.cd.cd_terms(z0, list(batch["caption"]) if fresh else prompts)
            loss = loss + g.cd_weight * loss_cd
            metrics["loss_cd"] = float(loss_cd.detach())
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, prompts: list[str], seed: int) -> dict:
        """The objective GRPO optimises on fixed prompts and noise: G SDE samples per prompt drawn with a generator
        seeded by `seed` (identical across calls), -> {"reward_mean", "reward_std", "reward/<name>": mean}."""
        ro = self.rollout(list(prompts), generator=torch.Generator().manual_seed(int(seed)))
        m = ro["metrics"]
        return {k: v for k, v in m.items() if k.startswith("reward")}

    def after_optimizer_step(self) -> None:
        if self.cd is not None:
            self.cd.after_optimizer_step()


class DFDPO(_Mode):
    """Discriminator-free DPO: winner = real clip, loser = distorted copy (curriculum), Diffusion-DPO loss with the
    same noise and timestep for the pair, reference = adapter disabled, + lambda * SFT (denoising loss) on winners.
    Policy and reference run with dropout off (`dropout_off`), so the implicit reward is the adapter's effect alone."""

    def __init__(self, *args):
        super().__init__(*args)
        from .distortions import DistortionCurriculum

        self.curriculum = DistortionCurriculum(self.cfg.dpo.curriculum, self.cfg.dpo.curriculum_every)

    def pair_errors(self, win: torch.Tensor, lose: torch.Tensor, captions: list[str],
                    noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None):
        """Denoising errors of policy and reference on (winner, loser) pairs with shared noise and timestep ->
        (mse_w, mse_l, ref_w, ref_l), each (B,); the policy's carry gradients."""
        gen = self.gen
        B = win.shape[0]
        z = torch.cat([gen.encode_video(win.to(self.device)), gen.encode_video(lose.to(self.device))])
        noise = (torch.randn_like(z[:B]) if noise is None else noise.to(z)).repeat(2, 1, 1, 1, 1)
        t = (gen.sample_train_t(B, self.device) if t is None else t.to(self.device)).repeat(2)
        x_t = gen.add_noise(z, noise, t)
        target = gen.training_target(z, noise)
        cond = gen.encode_text(list(captions))
        cond2 = cond.cat(cond)
        with dropout_off(self.denoiser):
            out = gen.denoise(self.forward, x_t, t, cond2)
            mse = ((out - target) ** 2).flatten(1).mean(1)
            with torch.no_grad(), adapter_disabled(self.denoiser):
                ref = ((gen.denoise(self.forward, x_t, t, cond2) - target) ** 2).flatten(1).mean(1)
        mse_w, mse_l = mse.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        return mse_w, mse_l, ref_w, ref_l

    def loss(self, batch: dict, step: int):
        p = self.cfg.dpo
        win = batch["video"].to(self.device)
        lose, ops = self.curriculum(win, step)
        mse_w, mse_l, ref_w, ref_l = self.pair_errors(win, lose, list(batch["caption"]))
        loss_dpo, acc, inside = dm.diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, p.beta)
        loss_sft = mse_w.mean()
        loss = loss_dpo + p.sft_weight * loss_sft
        stage = self.curriculum.stages.index(self.curriculum.stage(step))
        metrics = {"loss_dpo": float(loss_dpo.detach()), "loss_sft": float(loss_sft.detach()), "implicit_acc": float(acc),
                   "dpo_margin": float(inside.detach().mean()), "mse_win": float(mse_w.detach().mean()),
                   "mse_lose": float(mse_l.detach().mean()), "curriculum_stage": stage}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, pairs: dict) -> dict:
        """Held-out preference: `pairs` = {op: {"win", "lose", "caption", "noise", "t"}} (fixed noise and timesteps,
        e.g. from `heldout_pairs`) -> {"acc/<op>", "margin/<op>", "loss/<op>"} and their means over ops."""
        out = {}
        for op, pr in pairs.items():
            terms = self.pair_errors(pr["win"], pr["lose"], pr["caption"], pr["noise"], pr["t"])
            loss, _, inside = dm.diffusion_dpo_loss(*terms, self.cfg.dpo.beta)
            acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()  # a tie (policy == reference): 1/2
            out.update({f"acc/{op}": float(acc), f"margin/{op}": float(inside.mean()), f"loss/{op}": float(loss)})
        for key in ("acc", "margin", "loss"):
            vals = [v for k, v in out.items() if k.startswith(key + "/")]
            out[key] = sum(vals) / len(vals)
        return out

    def heldout_pairs(self, videos: torch.Tensor, captions: list[str], ops: list[str], strength: float, seed: int,
                      noise_per_pair: int = 1) -> dict:
        """Fixed held-out (real, distorted) pairs per operator, with fixed noise and timesteps drawn from `seed`
        (each pair repeated `noise_per_pair` times with different noise)."""
        from .distortions import apply_distortion

        g = torch.Generator().manual_seed(int(seed))
        videos = videos.repeat_interleave(noise_per_pair, 0)
        captions = [c for c in captions for _ in range(noise_per_pair)]
        B = videos.shape[0]
        latent = self.gen.latent_shape(B)
        pairs = {}
        for op in ops:
            lose = apply_distortion(videos, op, strength, generator=g)
            noise = torch.randn(latent, generator=g)
            state = torch.random.get_rng_state()
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))
            t = self.gen.sample_train_t(B, torch.device("cpu"))
            torch.random.set_rng_state(state)
            pairs[op] = {"win": videos, "lose": lose, "caption": captions, "noise": noise, "t": t}
        return pairs
