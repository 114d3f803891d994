"""Typed training configuration: dataclasses, YAML loading, command-line overrides, validation.

Style follows TRL / diffusers training scripts: one dataclass per concern, every field has a default and a
docstring-like comment, and `TrainConfig.validate()` turns bad values into a `ValueError` that names the
field and what was expected. Overrides use dotted keys (`--cd.skip_k 5`, `--optim.lr 1e-5`) or the
top-level names (`--output_dir`, `--max_steps`, `--checkpoint_every`, `--resume latest`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

MODES = ("cd", "grpo", "dpo")
TINY_ARCHS = ("unet3d", "hunyuan", "wan")
DTYPES = ("float32", "bfloat16", "float16")
DATA_KINDS = ("synthetic", "shapes", "file")
# Recipes ship the paths a user fills in as "<FILL IN: what goes here>": training refuses to start while one is
# left (the error names the field); `--dry_run` plans memory without them (it reads model.reference_config).
PLACEHOLDER_PREFIX = "<FILL IN"


def is_placeholder(value) -> bool:
    return isinstance(value, str) and value.strip().startswith(PLACEHOLDER_PREFIX)


def placeholder_fields(node, prefix: str = "") -> list:
    """(dotted field name, value) of every unfilled placeholder in a config (dataclasses, dicts, lists)."""
    if dataclasses.is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    elif isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        return [(prefix.rstrip("."), node)] if is_placeholder(node) else []
    out = []
    for key, value in items:
        out += placeholder_fields(value, f"{prefix}{key}.")
    return out


@dataclass
class ModelConfig:
    # A diffusers-format directory: unet/ or transformer/, scheduler/, optional vae/, text_encoder/ (+ tokenizer/).
    path: Optional[str] = None
    # Build a tiny randomly initialised model of this architecture instead (tests, CI): unet3d | hunyuan | wan.
    tiny: Optional[str] = None
    # Tiny models only: "pixel" (identity VAE, the denoiser works on pixels) or "tiny_kl" (a small AutoencoderKL).
    tiny_vae: str = "pixel"
    num_frames: int = 8
    height: int = 16
    width: int = 16
    # Precision of the frozen modules and of the denoiser's forward pass.
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # "auto" uses flash-attn on CUDA when it is installed; None keeps diffusers' default processors.
    attention_backend: Optional[str] = "auto"
    # Prompt length in tokens; None = the stock pipeline's default for the layout (TextToVideoSDPipeline/CLIP 77,
    # WanPipeline 512, HunyuanVideoPipeline 256 after the template crop; 16 for tiny and other encoders).
    text_max_length: Optional[int] = None
    # Seed for the tiny models' random weights (independent of the training seed).
    init_seed: int = 0
    # A directory with the model's published config.json files and no weights (configs/models/<family>):
    # `--dry_run` builds the architecture from it on the meta device while model.path is still a placeholder.
    reference_config: Optional[str] = None


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # peft init: "gaussian" gives a non-zero B so tiny tests see gradients everywhere; True = B zero (standard).
    init: Any = True
    # Load an existing LoRA (safetensors, ours or diffusers-format) before training.
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    # "synthetic" (in-memory moving squares, tests) or "file" (a CSV/JSONL index of video paths and captions).
    kind: str = "synthetic"
    path: Optional[str] = None
    video_root: Optional[str] = None
    fps: Optional[float] = None
    batch_size: int = 1
    synthetic_size: int = 16


@dataclass
class RewardConfig:
    """The reward the generator is trained against (``reward:`` in YAML).

    ``kind: pisces`` builds :class:`pisces_fast.rewards.PiscesRewards` from these fields (the schema is
    parsed and checked by :func:`pisces_fast.rewards.build.pisces_reward_spec_from_dict`; every error
    names the field)::

        reward:
          kind: pisces
          weights: {quality: 1.0, semantic: 1.0}   # exactly the rewards that are fused; 0 = not computed
          fusion: group                  # equal | group (each reward normalised within its prompt's group)
          group_size: 4                  # mode cd + fusion group: generations per prompt (captions repeated)
          num_frames: 8                  # frames of the decoded video handed to the reward (strided)
          vae_decode: sparse             # full | sparse: decode only what those frames need (video VAEs)
          vae_checkpointing: true        # recompute the reward's VAE decode in backward
          vae_tiling: false              # spatially tiled VAE decode (diffusers' enable_tiling)
          backbone:
            kind: internvideo2           # internvideo2 | blip
            checkpoint: /weights/InternVideo2-stage2_1b-224p-f4.safetensors  # converted once from the .pt:
                                         #   python -m pisces_fast.rewards.convert_internvideo2 IN.pt OUT.safetensors --trust-pickle
            tokenizer: /weights/bert-large-uncased   # transformers tokenizer directory (vocab must match)
            config: stage2_1b            # stage2_1b | path to an InternVideo2Config JSON | inline mapping of its fields
            num_frames: 8                # frames the backbone samples from each video
            dtype: float32               # float32 | bfloat16 | float16
          # backbone: {kind: blip, path: /weights/blip-itm-large-coco, num_frames: 8}  # a transformers directory
          #   (BlipForImageTextRetrieval + its tokenizer; `tokenizer:` may point elsewhere)
          ot_map: /runs/reward/ot_map    # directory written by `python -m pisces_fast.rewards.prepare`
          use_ot_map: true               # false: plain VLM cosine in the quality reward ("w/o OT")
          use_pot: true                  # false: vanilla cross-attention in the semantic reward ("w/o OT")
          pot: {gamma: 0.2, eta: 0.2, eps: 0.05, mass: 0.9, backend: auto}  # partial OT: any field of
                                         #   pisces_fast.ops.OTConfig (eps, mass, max_iter, tol, gamma, eta, fuse_eps,
                                         #   domain, kernel_dtype, check_inputs) + backend (auto|reference|cpp|triton)

    Relative paths are resolved like every other path in the file (working directory, then next to the YAML).
    """
    # none | toy | pisces | python:package.module:factory (a callable returning a reward module)
    kind: str = "toy"
    # The rewards that are fused, with their weights (a reward not named here is logged but not trained on).
    weights: dict = field(default_factory=lambda: {"quality": 1.0, "semantic": 1.0})
    # "equal": weighted sum of raw rewards; "group": each reward standardised within its prompt group first
    # (statistics detached), then the weighted sum (PISCES Table 4; pisces_fast.rewards.fusion).
    fusion: str = "equal"
    # Mode cd with fusion "group": each caption of the batch is repeated this many times (fresh noise and
    # timestep each) so rewards are normalised across generations of the same prompt. GRPO uses grpo.group_size.
    group_size: Optional[int] = None
    # Frames given to the reward (strided subsample of the decoded video); None = all.
    num_frames: Optional[int] = None
    # How a temporal video VAE (AutoencoderKLWan, AutoencoderKLHunyuanVideo) decodes the reward's frames with their
    # graph; per-frame VAEs (ModelScope / VideoCrafter2) always decode just those frames and ignore these fields.
    # "full": every latent frame, then the frames are picked (exact gradient; memory grows with the clip: ~312 GiB
    # per GPU for Wan 81x480x832 in bf16, --dry_run). "sparse": only what the picked frames need, the same frames bit for bit -- Hunyuan: the
    # VAE's temporal tiles holding them (exact gradient); Wan: its causal chunks up to the last picked frame, those
    # without a picked frame run without graph (they only fill the causal cache), so the gradient reaches the picked
    # frames' own latent frames, not earlier ones through the cache. See docs/real_models.md.
    vae_decode: str = "full"
    # Recompute each decoded chunk / tile (and the VAE's blocks, where diffusers supports it) in backward.
    vae_checkpointing: bool = False
    # Decode the reward's frames in spatial tiles (diffusers' vae.enable_tiling() with its default tile sizes, as
    # HunyuanVideoPipeline's example decodes); with vae_checkpointing each spatial tile is recomputed on its own.
    # AutoencoderKLHunyuanVideo with either vae_decode; AutoencoderKLWan only with vae_decode "full".
    vae_tiling: bool = False
    # kind pisces: the backbone section (see the class docstring), the OT map directory, the POT settings.
    backbone: dict = field(default_factory=dict)
    ot_map: Optional[str] = None
    use_ot_map: bool = True
    use_pot: bool = True
    pot: dict = field(default_factory=dict)
    # kind toy / python:...: keyword arguments of the reward's constructor or factory.
    kwargs: dict = field(default_factory=dict)

    def pisces_section(self) -> dict:
        """The fields kind pisces is built from (pisces_fast.rewards.build.pisces_reward_spec_from_dict)."""
        return {"backbone": self.backbone, "ot_map": self.ot_map, "use_ot_map": self.use_ot_map, "use_pot": self.use_pot,
                "pot": self.pot, "weights": self.weights}


@dataclass
class CDConfig:
    # The teacher's DDIM grid (epsilon: t_n = n * T/S - 1, LCMScheduler's original_inference_steps; flow: S sigmas).
    num_ddim_timesteps: int = 50
    skip_k: int = 1
    # CFG scale s of the teacher, out = u + s (c - u), drawn uniformly from [min, max] per step. LCM / T2V-Turbo
    # write c + w (c - u): their w ~ U[5, 15] is s ~ U[6, 16] here. Without guidance_conditioning use min == max.
    guidance_scale_min: float = 7.5
    guidance_scale_max: float = 7.5
    # Guidance (w) conditioning of the student (C2): UNet3D gets time_cond_proj_dim = guidance_embedding_dim and a
    # zero-initialised time_embedding.cond_proj fed diffusers' LCM guidance embedding of s - 1 (trained, checkpointed
    # and exported with the LoRA); Hunyuan uses its own `guidance` input; Wan has none (an error: distil at a fixed s).
    guidance_conditioning: bool = False
    guidance_embedding_dim: int = 256
    huber_c: float = 0.001
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    # EMA target theta^-; None or 0 means theta^- = stop_grad(theta).
    ema_decay: Optional[float] = 0.95
    reward_scale: float = 1.0
    cd_weight: float = 1.0


@dataclass
class GRPOConfig:
    group_size: int = 4
    num_sampling_steps: int = 8
    guidance_scale: float = 1.0
    eta: float = 1.0  # DDIM eta for epsilon models
    noise_level: float = 0.7  # flow SDE noise level
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    timestep_fraction: float = 0.6
    kl_beta: float = 0.0
    cd_weight: float = 1.0
    # One initial noise per prompt group (DanceGRPO): the group's rewards then differ only through the SDE steps
    # whose log-probs carry the gradient, not through x_T (no log-prob term): without it the advantages are mostly
    # noise and free-running GRPO on the shapes world did not raise its reward.
    shared_noise: bool = True
    # Optimizer steps per rollout: the first is on-policy (ratios exactly 1); later ones reuse the samples,
    # importance-weighted and clipped to [1 - clip_range, 1 + clip_range] (log-probs are per-element means). The
    # rollout is not checkpointed: a run resumed in the middle of a cycle starts it with a fresh rollout.
    updates_per_rollout: int = 1
    # Stochastic (SDE) sampling steps, from the first: steps 0..sde_steps-1 are SDE steps and the only ones trained;
    # the rest are deterministic DDIM (eta = 0) / flow ODE steps (Flow-GRPO-Fast, MixGRPO). 0 = every step. Why: with
    # few steps the last ones have a tiny std, so their noise barely changes the reward while their log-prob's
    # gradient (noise / std) is the largest; the policy gradient is then mostly noise (world, DDIM eta 1 at 4 steps:
    # steps 2-3 have std 0.04/0.02 and move the reward by 0.006/0.002 std against 0.17/0.14 for steps 0-1).
    sde_steps: int = 0


@dataclass
class DPOConfig:
    beta: float = 5000.0
    sft_weight: float = 1.0
    # Curriculum: list of stages, each {"ops": [names], "strength": float}; advanced every `curriculum_every` steps.
    curriculum: Optional[list] = None
    curriculum_every: int = 100


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"  # constant | linear | cosine
    grad_accum: int = 1


@dataclass
class ValidationConfig:
    every: int = 0  # 0 disables
    prompts: list = field(default_factory=lambda: ["a red square moving right", "a blue circle moving left"])
    num_steps: int = 4
    guidance_scale: float = 1.0
    # "ddim" (deterministic DDIM / flow Euler) or "consistency" (LCM-style few-step sampler for a CD student);
    # a w-conditioned student gets guidance_scale as its w input (one pass).
    sampler: str = "ddim"
    format: str = "gif"  # gif | mp4
    seed: int = 1234
    fps: int = 4


@dataclass
class TrainConfig:
    # cd (consistency distillation + rewards) | grpo | dpo (discriminator-free DPO).
    mode: str = "cd"
    # Where metrics.jsonl, checkpoints/, validation/ and the exported LoRA go.
    output_dir: str = "outputs/run"
    # Optimizer steps to train (each is optim.grad_accum micro-batches on every rank).
    max_steps: int = 100
    # Training seed (rank r uses seed + 1000 r); the data order and validation noise have their own seeds.
    seed: int = 0
    # Save a checkpoint every this many steps (0: only at the end).
    checkpoint_every: int = 50
    # How many checkpoints to keep (oldest are deleted).
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # None | "latest" | path to a checkpoint directory
    # Write a metrics.jsonl line every this many steps (and at the last step).
    log_every: int = 1
    # DeepSpeed JSON config path; None = plain torch on one process (or a built-in ZeRO-2 under a launcher).
    deepspeed: Optional[str] = None
    # Export the final LoRA in diffusers format to OUTPUT_DIR/lora_diffusers.
    export_lora: bool = True
    # Also save the base model with the LoRA merged in, to OUTPUT_DIR/merged.
    merge_lora: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cd: CDConfig = field(default_factory=CDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # Directory of the YAML file, for resolving relative paths inside it (not a user setting).
    config_dir: Optional[str] = None
    # `train.py --dry_run`: build the architecture on the meta device, print parameter counts and the per-GPU
    # memory plan (pisces_fast/training/memory_plan.py) for `dry_run_gpus` GPUs (None: the launcher's world size,
    # else 8), and exit without training.
    dry_run: bool = False
    dry_run_gpus: Optional[int] = None

    def validate(self) -> "TrainConfig":
        def need(cond, name, expected, value):
            if not cond:
                raise ValueError(f"config `{name}`: expected {expected}, got {value!r}")

        unfilled = placeholder_fields(self)
        if unfilled and not self.dry_run:
            name, value = unfilled[0]
            raise ValueError(f"config `{name}`: placeholder {value!r} is not filled in; set it in the YAML or with "
                             f"`--{name} VALUE` (`--dry_run` plans memory without it)")
        need(self.dry_run_gpus is None or self.dry_run_gpus >= 1, "dry_run_gpus", "None or an integer >= 1",
             self.dry_run_gpus)
        need(self.mode in MODES, "mode", f"one of {MODES}", self.mode)
        need(self.max_steps >= 1, "max_steps", "an integer >= 1", self.max_steps)
        need(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0 (0 = only at the end)", self.checkpoint_every)
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1", self.keep_checkpoints)
        need(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        need(bool(self.output_dir), "output_dir", "a non-empty path", self.output_dir)
        m = self.model
        need((m.path is None) != (m.tiny is None), "model.path / model.tiny",
             "exactly one of them set (a diffusers-format directory, or a tiny architecture name)", (m.path, m.tiny))
        if m.tiny is not None:
            need(m.tiny in TINY_ARCHS, "model.tiny", f"one of {TINY_ARCHS}", m.tiny)
            need(m.tiny_vae in ("pixel", "tiny_kl"), "model.tiny_vae", "'pixel' or 'tiny_kl'", m.tiny_vae)
        if m.path is not None and not is_placeholder(m.path):
            path = self.resolve_path(m.path)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"config `model.path`: directory not found: {path}")
        if m.reference_config is not None and not os.path.isdir(self.resolve_path(m.reference_config)):
            raise FileNotFoundError(f"config `model.reference_config`: directory not found: "
                                    f"{self.resolve_path(m.reference_config)}")
        need(m.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", m.dtype)
        for name in ("num_frames", "height", "width"):
            need(getattr(m, name) >= 1, f"model.{name}", "an integer >= 1", getattr(m, name))
        need(m.text_max_length is None or m.text_max_length >= 1, "model.text_max_length",
             "null (the pipeline's default) or an integer >= 1", m.text_max_length)
        need(self.lora.rank >= 1, "lora.rank", "an integer >= 1", self.lora.rank)
        need(self.lora.alpha > 0, "lora.alpha", "a positive number", self.lora.alpha)
        need(0 <= self.lora.dropout < 1, "lora.dropout", "a number in [0, 1)", self.lora.dropout)
        need(len(self.lora.target_modules) > 0, "lora.target_modules", "a non-empty list", self.lora.target_modules)
        if self.lora.init_from is not None and not is_placeholder(self.lora.init_from) and not os.path.exists(self.resolve_path(self.lora.init_from)):
            raise FileNotFoundError(f"config `lora.init_from`: file not found: {self.resolve_path(self.lora.init_from)}")
        d = self.data
        need(d.kind in DATA_KINDS, "data.kind", f"one of {DATA_KINDS}", d.kind)
        if d.kind == "file":
            need(d.path is not None, "data.path", "a CSV or JSONL file when data.kind is 'file'", d.path)
            if not is_placeholder(d.path) and not os.path.isfile(self.resolve_path(d.path)):
                raise FileNotFoundError(f"config `data.path`: file not found: {self.resolve_path(d.path)}")
        need(d.batch_size >= 1, "data.batch_size", "an integer >= 1", d.batch_size)
        need(d.synthetic_size >= 1, "data.synthetic_size", "an integer >= 1", d.synthetic_size)
        r = self.reward
        need(r.kind in ("none", "toy", "pisces") or r.kind.startswith("python:"), "reward.kind",
             "'none', 'toy', 'pisces' or 'python:module:factory'", r.kind)
        need(r.fusion in ("equal", "group"), "reward.fusion", "'equal' or 'group'", r.fusion)
        for k, v in r.weights.items():
            need(isinstance(v, (int, float)), f"reward.weights.{k}", "a number", v)
        need(r.num_frames is None or r.num_frames >= 1, "reward.num_frames", "None or an integer >= 1", r.num_frames)
        need(r.vae_decode in ("full", "sparse"), "reward.vae_decode", "'full' or 'sparse'", r.vae_decode)
        if self.mode == "cd" and r.kind != "none" and r.fusion == "group":
            need(r.group_size is not None and r.group_size >= 2, "reward.group_size",
                 "an integer >= 2 with mode cd and reward.fusion 'group' (generations per prompt to normalise across)",
                 r.group_size)
        elif r.group_size is not None:
            need(False, "reward.group_size", "null unless mode is cd with reward.fusion 'group' (GRPO's groups are "
                 "grpo.group_size)", r.group_size)
        if r.kind == "pisces":
            if not placeholder_fields(r):  # (placeholders are left only under --dry_run)
                self._check_pisces_reward()
        else:
            for name in ("backbone", "ot_map", "pot"):
                need(not getattr(r, name), f"reward.{name}", f"unset unless reward.kind is 'pisces' (kind is {r.kind!r})",
                     getattr(r, name))
        c = self.cd
        need(c.num_ddim_timesteps >= 2, "cd.num_ddim_timesteps", "an integer >= 2", c.num_ddim_timesteps)
        need(1 <= c.skip_k < c.num_ddim_timesteps, "cd.skip_k", f"an integer in [1, {c.num_ddim_timesteps - 1}]", c.skip_k)
        need(0 <= c.guidance_scale_min <= c.guidance_scale_max, "cd.guidance_scale_min/max", "0 <= min <= max",
             (c.guidance_scale_min, c.guidance_scale_max))
        need(c.huber_c > 0, "cd.huber_c", "a positive number", c.huber_c)
        need(c.guidance_embedding_dim >= 2, "cd.guidance_embedding_dim", "an integer >= 2", c.guidance_embedding_dim)
        if c.guidance_conditioning and m.tiny == "wan":
            need(False, "cd.guidance_conditioning", "false for Wan (WanTransformer3DModel has no guidance input; distil at "
                 "a fixed cd.guidance_scale_min == cd.guidance_scale_max)", c.guidance_conditioning)
        need(c.sigma_data > 0, "cd.sigma_data", "a positive number", c.sigma_data)
        need(c.ema_decay is None or 0 <= c.ema_decay < 1, "cd.ema_decay", "None or a number in [0, 1)", c.ema_decay)
        g = self.grpo
        need(g.group_size >= 2, "grpo.group_size", "an integer >= 2 (advantages need a group)", g.group_size)
        need(g.num_sampling_steps >= 1, "grpo.num_sampling_steps", "an integer >= 1", g.num_sampling_steps)
        need(g.eta > 0, "grpo.eta", "a positive number (eta = 0 is deterministic DDIM: no log-probs)", g.eta)
        need(g.noise_level > 0, "grpo.noise_level", "a positive number", g.noise_level)
        need(g.clip_range > 0, "grpo.clip_range", "a positive number", g.clip_range)
        need(g.adv_clip > 0, "grpo.adv_clip", "a positive number", g.adv_clip)
        need(0 < g.timestep_fraction <= 1, "grpo.timestep_fraction", "a number in (0, 1]", g.timestep_fraction)
        need(isinstance(g.sde_steps, int) and not isinstance(g.sde_steps, bool) and 0 <= g.sde_steps <= g.num_sampling_steps,
             "grpo.sde_steps", f"an integer in [0, grpo.num_sampling_steps = {g.num_sampling_steps}] (0 = every step)",
             g.sde_steps)
        need(g.kl_beta >= 0, "grpo.kl_beta", "a number >= 0", g.kl_beta)
        need(isinstance(g.updates_per_rollout, int) and not isinstance(g.updates_per_rollout, bool)
             and g.updates_per_rollout >= 1, "grpo.updates_per_rollout", "an integer >= 1", g.updates_per_rollout)
        p = self.dpo
        need(p.beta > 0, "dpo.beta", "a positive number", p.beta)
        need(p.sft_weight >= 0, "dpo.sft_weight", "a number >= 0", p.sft_weight)
        need(p.curriculum_every >= 1, "dpo.curriculum_every", "an integer >= 1", p.curriculum_every)
        if p.curriculum is not None:
            from .distortions import validate_curriculum

            validate_curriculum(p.curriculum)
        o = self.optim
        need(o.lr > 0, "optim.lr", "a positive number", o.lr)
        need(o.grad_accum >= 1, "optim.grad_accum", "an integer >= 1", o.grad_accum)
        need(o.lr_scheduler in ("constant", "linear", "cosine"), "optim.lr_scheduler",
             "'constant', 'linear' or 'cosine'", o.lr_scheduler)
        need(len(o.betas) == 2, "optim.betas", "a list of two numbers", o.betas)
        need(o.max_grad_norm >= 0, "optim.max_grad_norm", "a number >= 0 (0 disables clipping)", o.max_grad_norm)
        v = self.validation
        need(v.format in ("gif", "mp4"), "validation.format", "'gif' or 'mp4'", v.format)
        need(v.every >= 0, "validation.every", "an integer >= 0", v.every)
        need(v.num_steps >= 1, "validation.num_steps", "an integer >= 1", v.num_steps)
        need(v.sampler in ("ddim", "consistency"), "validation.sampler", "'ddim' or 'consistency'", v.sampler)
        if self.deepspeed is not None and not os.path.isfile(self.resolve_path(self.deepspeed)):
            raise FileNotFoundError(f"config `deepspeed`: DeepSpeed JSON not found: {self.resolve_path(self.deepspeed)}")
        if self.resume not in (None, "latest") and not os.path.isdir(self.resume):
            raise FileNotFoundError(f"config `resume`: expected 'latest' or a checkpoint directory, not found: {self.resume}")
        return self

    def _check_pisces_reward(self) -> None:
        """Parse the `reward:` section of kind pisces (pisces_fast.rewards.build) and store its resolved paths."""
        from pisces_fast.rewards.build import pisces_reward_spec_from_dict

        r = self.reward
        spec = pisces_reward_spec_from_dict(r.pisces_section(), resolve=self.resolve_path)
        b = spec.backbone
        r.backbone = {**r.backbone, **{k: getattr(b, k) for k in ("checkpoint", "tokenizer", "path") if r.backbone.get(k)}}
        if isinstance(r.backbone.get("config"), str):
            r.backbone["config"] = b.config
        r.ot_map = spec.ot_map

    def resolve_path(self, path: str) -> str:
        """A relative path is looked up from the working directory, then next to the YAML file."""
        if os.path.isabs(path) or os.path.exists(path) or self.config_dir is None:
            return path
        candidate = os.path.join(self.config_dir, path)
        return candidate if os.path.exists(candidate) else path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# dict -> dataclass with type checks


def _type_matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"config `{prefix.rstrip('.') or 'root'}`: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config `{prefix}{unknown[0]}`: unknown key; valid keys here: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value or {}, prefix + name + ".")
            continue
        wants_float = tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp))
        if wants_float and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp) \
                and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_matches(value, tp):
            raise ValueError(f"config `{prefix}{name}`: expected {getattr(tp, '__name__', tp)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # `--optim.lr inf` would crash at step 2
            raise ValueError(f"config `{prefix}{name}`: expected a finite number, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override `--{dotted}`: `{p}` is not a section")
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> tuple[Optional[str], dict]:
    """Parse `--config PATH` and `--key value` / `--key=value` pairs. Values are read as YAML scalars."""
    config_path = None
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"command line: expected `--key value`, got {arg!r}")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"command line: `--{key}` needs a value")
            val = argv[i + 1]
            i += 1
        i += 1
        if key in ("local_rank", "local-rank"):  # added by the deepspeed launcher
            continue
        if key == "config":
            config_path = val
            continue
        try:
            parsed = yaml.safe_load(val)
        except yaml.YAMLError as exc:
            raise ValueError(f"command line: `--{key}`: {_yaml_problem(exc)} in {val!r}") from exc
        _set_dotted(overrides, key.replace("-", "_"), parsed)
    return config_path, overrides


def _yaml_problem(exc: "yaml.YAMLError") -> str:
    """PyYAML's multi-line error as one line: what is wrong and where."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None, defaults: Optional[dict] = None,
                config_class: type = None) -> TrainConfig:
    """Build a validated `TrainConfig` (or a subclass, `config_class`) from (defaults <- YAML file <- overrides)."""
    data: dict = dict(defaults or {})
    config_dir = None
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: not valid YAML: {_yaml_problem(exc)}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"--config {path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a YAML mapping at the top level")
        data = _merge(data, loaded)
        config_dir = os.path.dirname(os.path.abspath(path))
    data = _merge(data, overrides or {})
    cfg = _from_dict(config_class or TrainConfig, data)
    cfg.config_dir = cfg.config_dir or config_dir
    return cfg.validate()


def config_from_argv(argv: list[str], defaults: Optional[dict] = None, config_class: type = None) -> TrainConfig:
    path, overrides = parse_overrides(argv)
    return load_config(path, overrides, defaults, config_class)


# ----------------------------------------------------------------------------------------------------------
# train.py --help


def _field_comments(cls) -> dict[str, str]:
    """Each field's help: the `#` comment lines right above it plus a trailing comment on its line."""
    import inspect
    import re

    helps: dict[str, str] = {}
    pending: list[str] = []
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return helps
    field_re = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=\s*(.*?))?$")
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        code, _, trailing = line.partition("  # ")
        m = field_re.match(code.rstrip())
        if m and not stripped.startswith(("def ", "return", '"""')):
            text = " ".join(pending + ([trailing.strip()] if trailing else []))
            helps[m.group(1)] = text
        pending = []
    return helps


def config_help() -> str:
    """The text of `train.py --help`: every section and field with its type, default and help comment."""
    out = ["Config fields (YAML keys, or `--section.field VALUE` on the command line; values are read as YAML):"]

    def walk(cls, prefix: str, indent: str) -> None:
        helps = _field_comments(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "config_dir":
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                doc = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "(") else ""
                out.append(f"\n{indent}{f.name}:  {doc}".rstrip())
                walk(tp, prefix + f.name + ".", indent + "  ")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            tname = " | ".join("null" if a is type(None) else getattr(a, "__name__", str(a).replace("typing.", ""))
                               for a in args)
            line = f"{indent}--{prefix}{f.name} ({tname}, default {default!r})"
            text = helps.get(f.name, "")
            out.append(f"{line}: {text}" if text else line)

    walk(TrainConfig, "", "  ")
    return "\n".join(out)
