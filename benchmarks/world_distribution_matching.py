"""Does distribution matching carry the world's 4-step student past the teacher's best row?

README blocker item 2: CD distils the teacher's probability-flow ODE, whose samples are worse on this world than the
teacher's stochastic 8-step sampler, and a regression onto that sampler's output learns its mean (Quality no better
than the ODE's: `world_sampler_steps.py --conditional_mean 4`). What can reach its *samples* is distribution matching.
This probe runs the main job (`pisces_fast.world.run_world_job`, same data, seed, evaluation grid and report) with
its CD objective extended by a DMD2-style term (Yin et al. 2024, "Improved Distribution Matching Distillation"):

* a fake score: a third LoRA adapter on the denoiser (zero-initialised, so it starts as the teacher; given the step's
  guidance w like the student), trained with the plain denoising loss on the student's detached outputs,
  `--fake_updates` AdamW steps per training step (two time scales);
* the real score: the teacher (adapters off) with CFG at the step's w;
* the student's output x is noised to t ~ U[t_min, t_max) and moved along (x0_fake - x0_real) / mean|x - x0_real|
  (the DMD gradient, normalised per sample), as the loss 0.5 * |x - sg(x - g)|^2 with weight `--dmd_weight`;
* x is the student's output at one of its 4 sampling steps, reached by running its own consistency sampler from
  noise up to that step (DMD2's backward simulation; `--no_backward_simulation`: CD's one-step output instead).

Not the paper's recipe and not a library mode (the fake adapter is neither checkpointed nor exported; run it with
one process, `python`, no DeepSpeed). Main-job overrides follow `--`:

    python benchmarks/world_distribution_matching.py --output_dir outputs/world_dmd -- --reward.kind none --max_steps 300

(23 min on 2 cores; `python train.py --output_dir outputs/world_cd --reward.kind none --max_steps 300` is the same run
without the DMD term, 7 min). The report is the main job's: OUTPUT_DIR/report.md / report.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: set before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pisces_fast.training import modes  # noqa: E402
from pisces_fast.training import trainer as trainer_module  # noqa: E402
from pisces_fast.training.lora import active_adapter, adapter_disabled, add_lora, lora_parameters  # noqa: E402
from pisces_fast.training.sampling import lcm_timesteps  # noqa: E402

FAKE_ADAPTER = "fake_score"


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Main-job overrides (train.py's --key value) go after a bare --.")
    p.add_argument("--output_dir", default="outputs/world_dmd", help="the main job's output directory")
    p.add_argument("--dmd_weight", type=float, default=4.0, help="weight of the distribution-matching term")
    p.add_argument("--fake_lr", type=float, default=1e-3, help="AdamW learning rate of the fake score's LoRA")
    p.add_argument("--fake_updates", type=int, default=2, help="fake-score updates per training step")
    p.add_argument("--t_min", type=int, default=20, help="smallest timestep the student's output is noised to")
    p.add_argument("--t_max", type=int, default=980, help="largest timestep (exclusive)")
    p.add_argument("--no_backward_simulation", action="store_true",
                   help="match CD's one-step output (from noised data) instead of the student's own sampling steps")
    args = p.parse_args(own)
    if args.dmd_weight <= 0 or args.fake_lr <= 0 or args.fake_updates < 1:
        p.error("--dmd_weight and --fake_lr: expected > 0; --fake_updates: expected >= 1")
    if not 0 <= args.t_min < args.t_max <= 1000:
        p.error(f"--t_min/--t_max: expected 0 <= t_min < t_max <= 1000, got {args.t_min}, {args.t_max}")
    if any(o in ("--output_dir", "--mode", "--resume") for o in overrides):
        p.error("--output_dir is this script's option, the mode is cd, and a run cannot be resumed (the fake score is "
                "not checkpointed): not main-job overrides")
    return args, overrides


def distribution_matching_cd(args):
    """The main job's ConsistencyDistillation with the DMD term (see the module docstring)."""

    class DistributionMatchingCD(modes.ConsistencyDistillation):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if self.gen.prediction != "epsilon":
                raise ValueError("world_distribution_matching: an epsilon-prediction generator expected (the world's)")
            meta = self.denoiser._pisces_lora
            add_lora(self.denoiser, meta["rank"], meta["alpha"], meta["target_modules"], 0.0, True,
                     adapter_name=FAKE_ADAPTER)  # leaves only the student's adapter trainable ...
            self.fake_params = [p for _, p in lora_parameters(self.denoiser, FAKE_ADAPTER)]
            for p in self.fake_params:  # ... and the fake score gets its own optimizer (the student's was built)
                p.requires_grad_(True)
            self.fake_optimizer = torch.optim.AdamW(self.fake_params, lr=args.fake_lr, weight_decay=0.0)
            self.sampling_timesteps = lcm_timesteps(self.gen, 4).tolist()  # the student's 4 consistency steps
            if self.reward is not None and self.cfg.reward.fusion == "group":
                raise ValueError("world_distribution_matching: reward.fusion 'group' is not supported")

        def student_sample_step(self, batch: int, cond, w: float) -> torch.Tensor:
            """Backward simulation: the student's own consistency sampler from noise; a random step k runs with
            gradients (its input is the student's re-noised sample of step k - 1), the earlier ones without."""
            gen = self.gen
            ts = torch.tensor(self.sampling_timesteps, device=self.device)
            k = int(torch.randint(0, len(ts), ()))
            z = torch.randn(gen.latent_shape(batch), device=self.device)
            for i in range(k + 1):
                t = ts[i].expand(batch)
                with torch.set_grad_enabled(i == k):
                    out = gen.denoise(self.forward, z, t, cond, guidance=w)
                    x0 = self._boundary(z, gen.x0_from_output(z, out, t), t.float())
                if i == k:
                    return x0
                z = gen.add_noise(x0.detach(), torch.randn_like(x0), ts[i + 1].expand(batch))
            raise AssertionError("unreachable")

        def loss(self, batch: dict, step: int):
            loss, metrics = super().loss(batch, step)
            gen, w = self.gen, metrics["guidance_scale"]
            prompts = batch["caption"]
            B = len(prompts)
            cond, uncond = gen.encode_text(prompts), gen.encode_text([""] * B)
            if args.no_backward_simulation:
                x = self.last_prediction
            else:
                x = self.student_sample_step(B, cond, w)
            with torch.no_grad():
                t = torch.randint(args.t_min, args.t_max, (B,), device=x.device)
                x_t = gen.add_noise(x.detach(), torch.randn_like(x), t)
                with adapter_disabled(self.denoiser):
                    x0_real = gen.x0_from_output(x_t, gen.guided(self.forward, x_t, t, cond, uncond, w, w_input=False), t)
                with active_adapter(self.denoiser, FAKE_ADAPTER):
                    x0_fake = gen.x0_from_output(x_t, gen.denoise(self.forward, x_t, t, cond, guidance=w), t)
                scale = (x.detach() - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp(min=1e-5)
                direction = torch.nan_to_num((x0_fake - x0_real) / scale)
            loss_dmd = 0.5 * F.mse_loss(x, (x - direction).detach())
            metrics["loss_dmd"] = float(loss_dmd.detach())
            metrics["dmd_direction_abs"] = float(direction.abs().mean())
            metrics["loss_fake_score"] = self.update_fake_score(x.detach(), cond, w)
            return loss + args.dmd_weight * loss_dmd, metrics

        def cd_terms(self, z0, prompts):
            loss_cd, pred, metrics = super().cd_terms(z0, prompts)
            self.last_prediction = pred
            return loss_cd, pred, metrics

        def update_fake_score(self, x: torch.Tensor, cond, w: float) -> float:
            """The fake score's denoising loss on the student's outputs, `fake_updates` optimizer steps."""
            gen, total = self.gen, 0.0
            for _ in range(args.fake_updates):
                t = torch.randint(0, gen.num_train_timesteps, (x.shape[0],), device=x.device)
                noise = torch.randn_like(x)
                with active_adapter(self.denoiser, FAKE_ADAPTER):
                    out = gen.denoise(self.forward, gen.add_noise(x, noise, t), t, cond, guidance=w)
                loss = F.mse_loss(out, noise)
                loss.backward()
                self.fake_optimizer.step()
                self.fake_optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) / args.fake_updates
            return total

    return DistributionMatchingCD


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    from pisces_fast.world import run_world_job, world_config_from_argv

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("world_distribution_matching: one process (python), not a DeepSpeed launch")
    cfg = world_config_from_argv(["--output_dir", args.output_dir] + overrides)
    if cfg.mode != "cd" or cfg.deepspeed is not None:
        raise SystemExit("world_distribution_matching: mode cd without a DeepSpeed config")
    with mock.patch.object(trainer_module, "ConsistencyDistillation", distribution_matching_cd(args)):
        return run_world_job(cfg)


if __name__ == "__main__":
    main()
