"""Typed training configuration: dataclasses, YAML loading, command-line overrides, validation.

Style follows TRL / diffusers training scripts: one dataclass per concern, every field has a default and a
docstring-like comment, and `TrainConfig.validate()` turns bad values into a `ValueError` that names the
field and what was expected. Overrides use dotted keys (`--cd.skip_k 5`, `--optim.lr 1e-5`) or the
top-level names (`--output_dir`, `--max_steps`, `--checkpoint_every`, `--resume latest`).
"""
from __future__ import annotations

import dataclasses
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
    text_max_length: int = 16
    # Seed for the tiny models' random weights (independent of the training seed).
    init_seed: int = 0


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
    # none | toy | pisces | python:package.module:factory (a callable returning a reward module)
    kind: str = "toy"
    weights: dict = field(default_factory=lambda: {"quality": 1.0, "semantic": 1.0})
    # "equal": weighted sum of raw rewards; "group": each reward standardised within its prompt group first.
    fusion: str = "equal"
    # Frames given to the reward (strided subsample of the decoded video); None = all.
    num_frames: Optional[int] = None
    path: Optional[str] = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class CDConfig:
    num_ddim_timesteps: int = 50
    skip_k: int = 1
    guidance_scale_min: float = 7.5
    guidance_scale_max: float = 7.5
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
    shared_noise: bool = False


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
    format: str = "gif"  # gif | mp4
    seed: int = 1234
    fps: int = 4


@dataclass
class WorldJobConfig:
    """The embedded-world main job (pisces_fast.training.world_job): OT-map fit, before/after evaluation."""
    enabled: bool = False
    # A saved world VLM directory; None = the one shipped with the package.
    vlm: Optional[str] = None
    # Algorithm 2 on the world: how many real train clips to embed, and the fit's budget.
    ot_map_clips: int = 1024
    ot_map_steps: int = 300
    ot_map_inner_steps: int = 5
    ot_map_lr: float = 1e-3
    ot_map_hidden: int = 128
    # Evaluation on held-out prompts: distinct prompts, sampling seeds per prompt, DDIM steps, guidance.
    eval_prompts: int = 16
    eval_seeds: list = field(default_factory=lambda: [0, 1])
    eval_steps: int = 20
    eval_guidance: float = 3.0
    eval_seed: int = 0


@dataclass
class TrainConfig:
    mode: str = "cd"
    output_dir: str = "outputs/run"
    max_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # None | "latest" | path to a checkpoint directory
    log_every: int = 1
    # DeepSpeed JSON config path; None = plain torch on one process (or a built-in ZeRO-2 under a launcher).
    deepspeed: Optional[str] = None
    # Where to export the final LoRA in diffusers format (None: OUTPUT_DIR/lora_diffusers).
    export_lora: bool = True
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
    world: WorldJobConfig = field(default_factory=WorldJobConfig)
    # Directory of the YAML file, for resolving relative paths inside it (not a user setting).
    config_dir: Optional[str] = None

    def validate(self) -> "TrainConfig":
        def need(cond, name, expected, value):
            if not cond:
                raise ValueError(f"config `{name}`: expected {expected}, got {value!r}")

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
        if m.path is not None:
            path = self.resolve_path(m.path)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"config `model.path`: directory not found: {path}")
        need(m.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", m.dtype)
        for name in ("num_frames", "height", "width", "text_max_length"):
            need(getattr(m, name) >= 1, f"model.{name}", "an integer >= 1", getattr(m, name))
        need(self.lora.rank >= 1, "lora.rank", "an integer >= 1", self.lora.rank)
        need(self.lora.alpha > 0, "lora.alpha", "a positive number", self.lora.alpha)
        need(0 <= self.lora.dropout < 1, "lora.dropout", "a number in [0, 1)", self.lora.dropout)
        need(len(self.lora.target_modules) > 0, "lora.target_modules", "a non-empty list", self.lora.target_modules)
        if self.lora.init_from is not None and not os.path.exists(self.resolve_path(self.lora.init_from)):
            raise FileNotFoundError(f"config `lora.init_from`: file not found: {self.resolve_path(self.lora.init_from)}")
        d = self.data
        need(d.kind in DATA_KINDS, "data.kind", f"one of {DATA_KINDS}", d.kind)
        if d.kind == "file":
            need(d.path is not None, "data.path", "a CSV or JSONL file when data.kind is 'file'", d.path)
            if not os.path.isfile(self.resolve_path(d.path)):
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
        c = self.cd
        need(c.num_ddim_timesteps >= 2, "cd.num_ddim_timesteps", "an integer >= 2", c.num_ddim_timesteps)
        need(1 <= c.skip_k < c.num_ddim_timesteps, "cd.skip_k", f"an integer in [1, {c.num_ddim_timesteps - 1}]", c.skip_k)
        need(0 <= c.guidance_scale_min <= c.guidance_scale_max, "cd.guidance_scale_min/max", "0 <= min <= max",
             (c.guidance_scale_min, c.guidance_scale_max))
        need(c.huber_c > 0, "cd.huber_c", "a positive number", c.huber_c)
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
        need(g.kl_beta >= 0, "grpo.kl_beta", "a number >= 0", g.kl_beta)
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
        w = self.world
        for name in ("ot_map_clips", "ot_map_steps", "ot_map_inner_steps", "ot_map_hidden", "eval_prompts", "eval_steps"):
            need(getattr(w, name) >= 1, f"world.{name}", "an integer >= 1", getattr(w, name))
        need(w.ot_map_lr > 0, "world.ot_map_lr", "a positive number", w.ot_map_lr)
        need(len(w.eval_seeds) >= 1 and all(isinstance(x, int) for x in w.eval_seeds), "world.eval_seeds",
             "a non-empty list of ints", w.eval_seeds)
        if w.vlm is not None and not os.path.isdir(self.resolve_path(w.vlm)):
            raise FileNotFoundError(f"config `world.vlm`: directory not found: {self.resolve_path(w.vlm)}")
        v = self.validation
        need(v.format in ("gif", "mp4"), "validation.format", "'gif' or 'mp4'", v.format)
        need(v.every >= 0, "validation.every", "an integer >= 0", v.every)
        need(v.num_steps >= 1, "validation.num_steps", "an integer >= 1", v.num_steps)
        if self.deepspeed is not None and not os.path.isfile(self.resolve_path(self.deepspeed)):
            raise FileNotFoundError(f"config `deepspeed`: DeepSpeed JSON not found: {self.resolve_path(self.deepspeed)}")
        if self.resume not in (None, "latest") and not os.path.isdir(self.resume):
            raise FileNotFoundError(f"config `resume`: expected 'latest' or a checkpoint directory, not found: {self.resume}")
        return self

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
        _set_dotted(overrides, key.replace("-", "_"), yaml.safe_load(val))
    return config_path, overrides


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None, defaults: Optional[dict] = None) -> TrainConfig:
    """Build a validated `TrainConfig` from (defaults <- YAML file <- overrides)."""
    data: dict = dict(defaults or {})
    config_dir = None
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a YAML mapping at the top level")
        data = _merge(data, loaded)
        config_dir = os.path.dirname(os.path.abspath(path))
    data = _merge(data, overrides or {})
    cfg = _from_dict(TrainConfig, data)
    cfg.config_dir = cfg.config_dir or config_dir
    return cfg.validate()


def config_from_argv(argv: list[str], defaults: Optional[dict] = None) -> TrainConfig:
    path, overrides = parse_overrides(argv)
    return load_config(path, overrides, defaults)
