"""The training loop behind `train.py`: build, resume, train, log, checkpoint, validate, export.

One optimizer step = `optim.grad_accum` micro-batches on every rank. After each step: one JSON line in
OUTPUT_DIR/metrics.jsonl (step, loss, every loss/reward term, lr, grad norm), a checkpoint every
`checkpoint_every` steps, a validation grid every `validation.every` steps. A non-finite loss saves a checkpoint
of the last good state and raises `FloatingPointError`. Test hook: the environment variable
PISCES_FAST_CRASH_AFTER_STEP=k makes every rank `os._exit(17)` right after step k (simulates a killed job).
"""
from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy as np
import torch

from ..fileio import atomic_write_text
from . import checkpoint as ckpt
from .backend import DeepSpeedBackend, TorchBackend, launched_world_size
from .batches import ShardedBatches
from .config import TrainConfig
from .generators import generator_from_config
from .lora import (ADAPTER, EMA_ADAPTER, add_lora, copy_adapter, export_diffusers_lora, load_lora_state_dict,
                   lora_parameters, lora_state_dict, merge_lora, read_lora)
from .modes import DFDPO, GRPO, ConsistencyDistillation
from .rewards_loader import build_reward

CRASH_ENV = "PISCES_FAST_CRASH_AFTER_STEP"


def build_dataset(cfg: TrainConfig):
    from pisces_fast.data.video_dataset import SyntheticVideoDataset, VideoTextDataset

    m, d = cfg.model, cfg.data
    if d.kind == "synthetic":
        return SyntheticVideoDataset(d.synthetic_size, m.num_frames, m.height, m.width, seed=cfg.seed)
    if d.kind == "shapes":
        from pisces_fast.data.shapes import ShapesDataset, WorldConfig

        return ShapesDataset(d.synthetic_size, "train", seed=cfg.seed,
                             config=WorldConfig(num_frames=m.num_frames, height=m.height, width=m.width))
    if d.kind == "file":
        return VideoTextDataset(cfg.resolve_path(d.path), m.num_frames, m.height, m.width, fps=d.fps,
                                video_root=d.video_root)
    raise ValueError(f"data.kind: expected 'synthetic', 'shapes' or 'file', got {d.kind!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        use_ds = cfg.deepspeed is not None or launched_world_size() > 1
        rank = int(os.environ.get("RANK", "0")) if use_ds else 0
        seed_everything(cfg.seed + 1000 * rank)
        self.gen = generator_from_config(cfg.model)
        if cfg.cd.guidance_conditioning and (cfg.mode == "cd" or (cfg.mode == "grpo" and cfg.grpo.cd_weight > 0)):
            self.gen.enable_guidance_conditioning(cfg.cd.guidance_embedding_dim)  # the w input trains with the LoRA
        den = self.gen.denoiser
        lc = cfg.lora
        add_lora(den, lc.rank, lc.alpha, lc.target_modules, lc.dropout, lc.init)
        self.lora_meta = {"rank": lc.rank, "alpha": lc.alpha, "target_modules": list(lc.target_modules), "arch": self.gen.arch}
        if lc.init_from is not None:
            state, _ = read_lora(cfg.resolve_path(lc.init_from))
            load_lora_state_dict(den, state)
        self.ema_decay = cfg.cd.ema_decay if (cfg.mode == "cd" or (cfg.mode == "grpo" and cfg.grpo.cd_weight > 0)) else None
        if self.ema_decay:
            add_lora(den, lc.rank, lc.alpha, lc.target_modules, 0.0, True, adapter_name=EMA_ADAPTER)
            copy_adapter(den, ADAPTER, EMA_ADAPTER)
        self.resume_from = ckpt.find_resume_checkpoint(cfg.output_dir, cfg.resume)
        resume_state = None
        if self.resume_from is not None:
            resume_state = ckpt.read_trainer_state(self.resume_from)  # read first: a corrupt one fails fast
            # Weights go in before DeepSpeed builds its fp32 master copies / partitions.
            load_lora_state_dict(den, ckpt.read_checkpoint_lora(os.path.join(self.resume_from, "lora.safetensors")))
            if self.ema_decay:
                load_lora_state_dict(den, ckpt.read_checkpoint_lora(os.path.join(self.resume_from, "lora_ema.safetensors")),
                                     EMA_ADAPTER)
        if use_ds:
            self.backend = DeepSpeedBackend(den, cfg, cfg.resolve_path(cfg.deepspeed) if cfg.deepspeed else None)
            if self.backend.bf16:
                self.gen.dtype = torch.bfloat16
            elif self.backend.fp16:
                self.gen.dtype = torch.float16
        else:
            self.backend = TorchBackend(den, cfg.optim, cfg.max_steps)
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        self.gen.to(self.device)
        self.rank, self.world = self.backend.rank, self.backend.world_size
        self.dataset = build_dataset(cfg)
        self.batches = ShardedBatches(self.dataset, cfg.data.batch_size, self.rank, self.world, cfg.seed)
        self.reward = build_reward(cfg.reward, self.device)
        args = (self.gen, self.backend.forward, den, cfg, self.reward)
        cd = ConsistencyDistillation(*args, ema_decay=self.ema_decay, backend=self.backend)
        if cfg.mode == "cd":
            self.mode = cd
        elif cfg.mode == "grpo":
            self.mode = GRPO(*args, cd=cd if cfg.grpo.cd_weight > 0 else None)
        else:
            self.mode = DFDPO(*args)
        self.writer = ckpt.CheckpointWriter(cfg.output_dir, self.backend, cfg.keep_checkpoints)
        self.step = 0
        if self.resume_from is not None:
            self.backend.load_state(self.resume_from)
            self.step = int(resume_state["step"])
            try:
                self.batches.load_state_dict(resume_state["data"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ckpt.CheckpointError(f"checkpoint file corrupt: {os.path.join(self.resume_from, 'trainer_state.json')}: "
                                           f"bad data position ({exc})") from exc
            ckpt.load_rng(os.path.join(self.resume_from, "rng"), self.rank)
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            self._truncate_metrics()
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
                json.dump(cfg.to_dict(), fh, indent=1)

    # ------------------------------------------------------------------------------------------------------
    def _truncate_metrics(self) -> None:
        """On resume, drop lines logged after the checkpoint (they are about to be recomputed)."""
        if not os.path.isfile(self.metrics_path):
            return
        def kept(line: str) -> bool:
            try:
                return json.loads(line)["step"] <= self.step
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill: after the checkpoint, recomputed
                return False

        with open(self.metrics_path, encoding="utf-8", errors="replace") as fh:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in fh if ln.strip() and kept(ln)]
        atomic_write_text(self.metrics_path, "".join(lines))

    def _lora_getter(self, adapter: str):
        def get():
            params = [p for _, p in lora_parameters(self.gen.denoiser, adapter)]
            with self.backend.gathered(params):
                return lora_state_dict(self.gen.denoiser, adapter), self.lora_meta
        return get

    def save_checkpoint(self, reason: str = "periodic") -> str:
        files = {"lora.safetensors": self._lora_getter(ADAPTER)}
        if self.ema_decay:
            files["lora_ema.safetensors"] = self._lora_getter(EMA_ADAPTER)
        state = {"step": self.step, "data": self.batches.state_dict(), "mode": self.cfg.mode, "reason": reason,
                 "world_size": self.world, "config": self.cfg.to_dict()}
        return self.writer.save(self.step, files, state)

    def validate(self) -> Optional[str]:
        from .video_io import save_video_grid

        v = self.cfg.validation
        # Exact resume needs validation to draw nothing from the global RNG: its own generator for the noise, and
        # eval mode so the denoiser's dropout layers (UNet3D has p=0.1) neither draw random numbers nor perturb it.
        g = torch.Generator().manual_seed(v.seed)
        den = self.gen.denoiser
        was_training = den.training
        den.eval()
        try:
            with torch.no_grad():
                video = self.gen.sample(self.backend.forward, list(v.prompts), v.num_steps, v.guidance_scale, generator=g,
                                        sampler=v.sampler)
        finally:
            den.train(was_training)
        if self.rank != 0:
            return None
        path = os.path.join(self.cfg.output_dir, "validation", f"step-{self.step:08d}.{v.format}")
        return save_video_grid(video, path, fps=v.fps)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        crash_after = os.environ.get(CRASH_ENV)
        crash_after = int(crash_after) if crash_after else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"pisces {cfg.mode}", disable=self.rank != 0,
                   dynamic_ncols=True)
        last_saved = self.step if self.resume_from else None
        self.gen.denoiser.train()
        while self.step < cfg.max_steps:
            sums: dict = {}
            for micro in range(cfg.optim.grad_accum):
                batch = next(self.batches)
                loss, metrics = self.mode.loss(batch, self.step)
                finite = self.backend.all_min(torch.isfinite(loss.detach()).float().reshape(1))
                if float(finite) < 1:
                    path = self.save_checkpoint(reason="non-finite loss")
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                    raise FloatingPointError(
                        f"non-finite loss ({float(loss)}) at step {self.step + 1} (micro-batch {micro}) in mode "
                        f"{cfg.mode}; terms: {terms}. The last good state is saved in {path}; lower optim.lr or check "
                        "the reward / data, then resume with --resume latest.")
                self.backend.backward(loss)
                self.backend.micro_step(boundary=micro == cfg.optim.grad_accum - 1)
                metrics["loss"] = float(loss.detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.optim.grad_accum
            self.mode.after_optimizer_step()
            self.step += 1
            keys = sorted(sums)
            means = self.backend.all_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()
            record = {"step": self.step, **dict(zip(keys, means)), "lr": self.backend.lr()}
            if self.backend.grad_norm is not None:
                record["grad_norm"] = self.backend.grad_norm
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
            if cfg.validation.every and self.step % cfg.validation.every == 0:
                self.validate()
            if crash_after is not None and self.step == crash_after:
                os._exit(17)
        bar.close()
        if self.rank == 0:
            plot_run_curves(self.metrics_path, os.path.join(cfg.output_dir, "curves.png"))
        if last_saved != self.step:
            self.save_checkpoint(reason="final")
        out = {"step": self.step, "output_dir": cfg.output_dir}
        if cfg.export_lora:
            out["lora_diffusers"] = self.export()
        return out

    def export(self) -> Optional[str]:
        """diffusers-format LoRA in OUTPUT_DIR/lora_diffusers (+ a merged model directory when merge_lora)."""
        state, meta = self._lora_getter(ADAPTER)()
        path = None
        if self.rank == 0:
            path = export_diffusers_lora(state, self.gen.arch, os.path.join(self.cfg.output_dir, "lora_diffusers"), meta)
        if self.cfg.merge_lora:
            if self.backend.zero_stage == 3:
                raise ValueError("merge_lora under ZeRO-3: merge offline with pisces_fast.training.lora.merge_lora on the "
                                 "exported LoRA (the base weights are partitioned across ranks here)")
            if self.rank == 0:
                from .generators import save_generator

                if self.ema_decay:  # the EMA adapter is training state, not part of the merged model
                    from peft.tuners.tuners_utils import BaseTunerLayer

                    for m in self.gen.denoiser.modules():
                        if isinstance(m, BaseTunerLayer) and EMA_ADAPTER in m.lora_A:
                            m.delete_adapter(EMA_ADAPTER)
                merge_lora(self.gen.denoiser)
                save_generator(self.gen, os.path.join(self.cfg.output_dir, "merged"))
        self.backend.barrier()
        return path


# Panels of curves.png, in this order (then every other logged number): what each mode optimises first, then its
# diagnostics (GRPO: ratios, clipping, KL, advantages; DF-DPO: implicit accuracy and margin, curriculum stage).
CURVE_ORDER = ("loss", "reward_mean", "reward_std", "loss_grpo", "ratio_mean", "ratio_min", "ratio_max", "clipfrac",
               "approx_kl", "kl", "advantage_std", "loss_dpo", "implicit_acc", "dpo_margin", "curriculum_stage",
               "mse_win", "mse_lose", "loss_sft", "loss_cd", "loss_reward")


def plot_run_curves(metrics_path: str, out_path: str) -> Optional[str]:
    """One panel per number in metrics.jsonl (raw and a running mean) -> `out_path` PNG; None if nothing logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(metrics_path):
        return None
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        return None
    keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    names = [k for k in CURVE_ORDER if k in keys] + sorted(keys - set(CURVE_ORDER))
    ncol = min(4, len(names))
    nrow = (len(names) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], float(r[name])) for r in rows if isinstance(r.get(name), (int, float))]
        steps, values = [p[0] for p in pts], np.array([p[1] for p in pts])
        ax.plot(steps, values, lw=0.8, alpha=0.5)
        window = max(1, len(values) // 10)
        if window > 1:
            ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"), lw=1.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).train()
