"""A memory plan before the GPUs: `train.py --config X --dry_run`.

Builds the real architecture from its config.json files on the meta device (no weights are read or allocated),
applies the run's LoRA exactly as the trainer does, counts trainable and frozen parameters, and estimates the
memory of one GPU under the configured DeepSpeed ZeRO stage for N GPUs.

The estimate model (every number printed comes from one of these rules):

* Parameters, gradients, optimizer states: the ZeRO paper's mixed-precision accounting (Rajbhandari et al.
  2020). Denoiser weights in the compute dtype (bf16: 2 B/param; DeepSpeed casts the module). Trainable (LoRA)
  parameters also carry a 16-bit gradient (2 B) and AdamW's fp32 master copy + two moments (12 B). ZeRO-1
  partitions optimizer states over the N data-parallel ranks, ZeRO-2 also gradients, ZeRO-3 also parameters
  (the frozen base and the EMA target adapter included: they live in the engine's module). Without DeepSpeed
  (one process, torch AdamW) gradients and both moments are in the parameters' dtype and nothing is partitioned.
* Frozen helpers outside the engine (text encoder(s), VAE, the reward model) are replicated on every GPU in
  their configured dtype (model.dtype; reward.backbone.dtype).
* Activations: measured, not modelled. The run's forward passes that keep a graph are executed on the meta
  device at the run's shapes, and every tensor autograd saves for backward is counted once (by storage;
  parameters and buffers excluded). Attention through `F.scaled_dot_product_attention` is counted as the fused
  GPU kernels (flash / memory-efficient) store it: q, k, v, the output and an fp32 log-sum-exp per query, never
  the L x L score matrix. Attention a module writes out by hand is counted as written. Measured at batch 2 and
  scaled linearly to the run's batch. With gradient checkpointing on, the tensors saved outside the checkpointed
  blocks, the inputs each checkpointed block keeps for recomputation, and the largest single block's
  recomputed activations (live during its backward) are counted.
  Which graphs are live at the backward: cd: one student forward at micro-batch x reward.group_size, plus
  the VAE decode of the reward frames and the reward model's forward (gradients flow to the video); grpo:
  round(timestep_fraction x SDE steps) policy forwards (grpo.sde_steps, or num_sampling_steps when 0) at
  micro-batch x grpo.group_size (x2 with classifier-free guidance) kept together until backward, plus one CD
  forward when grpo.cd_weight > 0 (the rollout and the reward run without a graph); dpo: one forward at
  2 x micro-batch (winner and loser).
* The reward's VAE decode: `VideoGenerator.decode_latents` run as the CD step runs it (reward.num_frames,
  reward.vae_decode / vae_checkpointing / vae_tiling), the VAE in model.dtype. Its checkpointing is nested (each
  causal chunk / temporal or spatial tile, and inside it diffusers' own VAE block checkpointing), measured by
  NestedCheckpointRecorder: block inputs are kept by the parent, a block's backward holds what it saves plus its
  largest child's backward.
* DeepSpeed buffers: ZeRO-2 reduce + all-gather buckets (at most the trainable parameter count, 16-bit);
  ZeRO-3 prefetch bucket + max live parameters (at most the denoiser's parameter count, 16-bit).
* Not counted: the CUDA context and allocator fragmentation (a 2 GiB reserve is kept when judging the fit),
  transient no-grad passes (teacher, EMA target, reference), which free their activations layer by layer,
  and temporary buffers inside kernels.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

GiB = 1024 ** 3
GPU_GIB = 80.0  # A100 80GB
RESERVE_GIB = 2.0  # CUDA context + allocator fragmentation, kept free when judging the fit
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------------------------------------
# counting what autograd saves


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


class SavedTensorAccounting:
    """Sums the bytes of distinct storages autograd saves for backward (excluding `exclude` storages)."""

    def __init__(self, exclude_modules: tuple = ()):
        self.exclude = {_storage_key(t) for m in exclude_modules for t in list(m.parameters()) + list(m.buffers())}
        self.seen: dict = {}
        # Counted tensors are kept alive while counting: a storage freed meanwhile (a checkpoint input the real
        # checkpoint would keep, a replaced causal cache) could hand its address to a new one, counted as seen.
        self._alive: list = []

    def add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = t.untyped_storage().nbytes()
            self._alive.append(t)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    @contextlib.contextmanager
    def recording(self):
        def pack(t):
            self.add(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self


def saved_bytes(fn: Callable[[], object], exclude_modules: tuple = ()) -> int:
    """Bytes autograd keeps for the backward of `fn()` (run it on meta tensors: nothing is computed)."""
    acc = SavedTensorAccounting(exclude_modules)
    with torch.enable_grad(), fused_attention_accounting(), acc.recording():
        fn()
    return acc.bytes


class _FusedSDPA(torch.autograd.Function):
    """Stands in for F.scaled_dot_product_attention while counting: saves what flash / memory-efficient
    attention keeps for backward (q, k, v, output, fp32 log-sum-exp per query and head)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: plans only count
        raise RuntimeError("memory_plan: _FusedSDPA is a counting stand-in without a backward")


@contextlib.contextmanager
def fused_attention_accounting():
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        return _FusedSDPA.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class _CheckpointRecorder:
    """A diffusers `gradient_checkpointing_func` that records what checkpointing keeps: each block's tensor
    inputs (kept for the recomputation) and the largest block's own activations (live during its backward)."""

    def __init__(self, acc: SavedTensorAccounting, exclude_modules: tuple):
        self.acc, self.exclude_modules = acc, exclude_modules
        self.peak_block = 0

    def __call__(self, fn, *args, **kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                self.acc.add(a)
        # The block runs once, under its own accounting: what it saves is what its recomputation holds during
        # its backward; the outer accounting (what stays alive until the backward) never sees it, as with
        # torch.utils.checkpoint, whose own saved-tensor hooks take precedence inside the block.
        inner = SavedTensorAccounting(self.exclude_modules)
        with inner.recording():
            out = fn(*args, **kwargs)
        self.peak_block = max(self.peak_block, inner.bytes)
        return out


class NestedCheckpointRecorder:
    """A checkpoint function (`fn(*args)`, as torch.utils.checkpoint and diffusers' `gradient_checkpointing_func`
    take it) that measures nested checkpointing: the reward's VAE decode checkpoints each chunk / tile, and inside
    them diffusers checkpoints the VAE's blocks (AutoencoderKLHunyuanVideo: mid block + up blocks, each resnet).
    A block's tensor inputs are kept by its parent (for the recomputation); a block's backward holds what it saves
    itself plus the largest backward among its own checkpointed children. `measure(fn)` = what the outermost graph
    keeps + the largest block backward."""

    def __init__(self, exclude_modules: tuple = ()):
        self.exclude_modules = exclude_modules
        self._stack: list = []  # [accounting, largest child backward]
        # On the meta device a block's cost depends only on the block and its inputs' shapes: a block seen before
        # (the VAE decoder on another tile of the same size) is not run again; its output is a fresh tensor.
        self._seen: dict = {}

    def _memo_key(self, fn, args, kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors or any(t.device.type != "meta" for t in tensors):
            return None
        code = getattr(fn, "__code__", None)
        cells = tuple(id(c.cell_contents) for c in (getattr(fn, "__closure__", None) or ()))
        ident = (code, cells, tuple(getattr(fn, "__defaults__", None) or ())) if code is not None else id(fn)
        sig = tuple((tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else repr(a)
                    for a in list(args) + list(kwargs.values()))
        return ident, sig

    def __call__(self, fn, *args, **kwargs):
        parent = self._stack[-1]
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                parent[0].add(a)
        key = self._memo_key(fn, args, kwargs)
        if key is not None and key in self._seen:
            peak, shape, dtype, grad = self._seen[key]
            parent[1] = max(parent[1], peak)
            out = torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)
            return out.clone() if grad else out  # not a leaf: callers may write into it (diffusers' blends)
        frame = [SavedTensorAccounting(self.exclude_modules), 0]
        self._stack.append(frame)
        try:
            with frame[0].recording():
                out = fn(*args, **kwargs)
        finally:
            self._stack.pop()
        peak = frame[0].bytes + frame[1]
        parent[1] = max(parent[1], peak)
        if key is not None and isinstance(out, torch.Tensor):
            self._seen[key] = (peak, tuple(out.shape), out.dtype, out.requires_grad)
        return out

    def measure(self, fn: Callable[[], object]) -> int:
        root = [SavedTensorAccounting(self.exclude_modules), 0]
        self._stack = [root]
        try:
            with torch.enable_grad(), fused_attention_accounting(), root[0].recording():
                fn()
        finally:
            self._stack = []
        return root[0].bytes + root[1]


def reward_decode_bytes(gen, latents: torch.Tensor, num_frames: Optional[int], vae_decode: str,
                        checkpointing: bool, tiling: bool = False) -> int:
    """Activations the reward's VAE decode keeps for backward (`gen.decode_latents` as the CD step calls it, on meta
    tensors), with the decode's own gradient checkpointing measured by NestedCheckpointRecorder."""
    codec = gen.codec
    ckpt = checkpointing and not codec.per_frame
    recorder = NestedCheckpointRecorder((codec,))
    vae = getattr(codec, "vae", None)
    # diffusers' tile blends (row by row: slow on meta) save nothing for backward (products with Python scalars,
    # sums, copies into slices): skipped while counting on meta tensors.
    skip = [n for n in ("blend_v", "blend_h", "blend_t") if latents.device.type == "meta" and hasattr(vae, n)]
    for name in skip:
        setattr(vae, name, lambda a, b, extent: b)
    if ckpt:
        codec.set_checkpointing(recorder)
    try:
        return recorder.measure(lambda: gen.decode_latents(latents, num_frames, vae_decode, ckpt, tiling))
    finally:
        if ckpt:
            codec.set_checkpointing(None)
        for name in skip:
            delattr(vae, name)


def activation_bytes(module: nn.Module, fn: Callable[[], object], checkpointing: bool) -> int:
    """Activations of `fn()` (which runs `module`) kept for backward, with or without gradient checkpointing."""
    exclude = (module,)
    if not checkpointing:
        return saved_bytes(fn, exclude)
    if not getattr(module, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(module).__name__} does not support gradient checkpointing")
    acc = SavedTensorAccounting(exclude)
    recorder = _CheckpointRecorder(acc, exclude)
    was_on = bool(getattr(module, "is_gradient_checkpointing", False))
    module.enable_gradient_checkpointing(gradient_checkpointing_func=recorder)
    try:
        with torch.enable_grad(), fused_attention_accounting(), acc.recording():
            fn()
    finally:
        module.disable_gradient_checkpointing()
        if was_on:
            module.enable_gradient_checkpointing()
    return acc.bytes + recorder.peak_block


# ----------------------------------------------------------------------------------------------------------
# ZeRO arithmetic


def engine_memory(frozen: int, trainable: int, ema: int, stage: int, num_gpus: int, weight_bytes: int,
                  deepspeed: bool = True) -> dict:
    """Bytes per GPU of the denoiser inside the training engine (see the module docstring)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage: expected 0, 1, 2 or 3, got {stage!r}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus: expected an integer >= 1, got {num_gpus!r}")
    if not deepspeed:  # one process, torch AdamW on the parameters' own dtype
        return {"weights": (frozen + trainable + ema) * weight_bytes, "grads": trainable * weight_bytes,
                "optimizer": 2 * trainable * weight_bytes}
    n_param = num_gpus if stage >= 3 else 1
    n_grad = num_gpus if stage >= 2 else 1
    n_opt = num_gpus if stage >= 1 else 1
    return {"weights": (frozen + trainable + ema) * weight_bytes / n_param,
            "grads": trainable * 2 / n_grad,
            "optimizer": trainable * 12 / n_opt}


def deepspeed_buffers(ds: dict, trainable: int, total: int) -> int:
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage in (1, 2):
        return int(2 * (min(float(zero.get("reduce_bucket_size", 5e8)), trainable)
                        + min(float(zero.get("allgather_bucket_size", 5e8)), trainable)))
    if stage == 3:
        return int(2 * (min(float(zero.get("stage3_prefetch_bucket_size", 5e7)), total)
                        + min(float(zero.get("stage3_max_live_parameters", 1e9)), total)))
    return 0


# ----------------------------------------------------------------------------------------------------------
# building the architecture on the meta device


def _read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def architecture_directory(cfg) -> str:
    """Where the config.json files come from: model.path once it is a real directory, else model.reference_config."""
    from .config import is_placeholder

    m = cfg.model
    if m.path is not None and not is_placeholder(m.path):
        path = cfg.resolve_path(m.path)
        if os.path.isdir(path):
            return path
    if m.reference_config is not None:
        return cfg.resolve_path(m.reference_config)
    raise ValueError("config `model.reference_config`: --dry_run needs the model's config.json files; fill in "
                     "model.path or set model.reference_config (e.g. configs/models/wan2.1-t2v-1.3b)")


def _component_classes(directory: str) -> dict:
    index = os.path.join(directory, "model_index.json")
    out = {}
    if os.path.isfile(index):
        for name, value in _read_json(index).items():
            if isinstance(value, list) and len(value) == 2 and value[1]:
                out[name] = (value[0], value[1])
    return out


def _meta_diffusers(directory: str, sub: str) -> nn.Module:
    import diffusers

    path = os.path.join(directory, sub, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model directory {directory}: missing {sub}/config.json")
    config = _read_json(path)
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None:
        raise ValueError(f"{path}: `_class_name` {cls_name!r} is not a diffusers model class")
    with torch.device("meta"):
        return cls.from_config(config)


def _meta_transformers(directory: str, sub: str, cls_name: Optional[str]) -> nn.Module:
    import transformers

    path = os.path.join(directory, sub)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model directory {directory}: missing {sub}/config.json")
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, cls_name, None) if cls_name else None
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(config)
        model = transformers.AutoModel.from_config(config)
    if hasattr(model, "get_encoder") and getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model


@dataclass
class MetaModel:
    gen: object  # VideoGenerator with meta modules
    text_encoders: dict  # name -> module (frozen)
    directory: str


def build_meta_model(cfg) -> MetaModel:
    """The run's generator, built on the meta device from config.json files (tiny models: built for real)."""
    from .generators import FrameVAECodec, PixelCodec, VideoGenerator, VideoVAECodec, build_tiny_generator

    m = cfg.model
    if m.tiny is not None:
        gen = build_tiny_generator(m.tiny, m.tiny_vae, m.num_frames, m.height, m.width, m.init_seed, m.text_max_length,
                                   m.dtype)
        return MetaModel(gen, {"text_encoder": gen.text_encoder}, f"tiny:{m.tiny}")
    import diffusers

    directory = architecture_directory(cfg)
    classes = _component_classes(directory)
    if os.path.isdir(os.path.join(directory, "unet")):
        sub, arch = "unet", "unet3d"
    elif os.path.isdir(os.path.join(directory, "transformer")):
        sub = "transformer"
        cls = _read_json(os.path.join(directory, sub, "config.json")).get("_class_name")
        arch = {"HunyuanVideoTransformer3DModel": "hunyuan", "WanTransformer3DModel": "wan"}.get(cls)
        if arch is None:
            raise ValueError(f"model directory {directory}: transformer/ holds {cls!r}; supported: "
                             "HunyuanVideoTransformer3DModel, WanTransformer3DModel")
    else:
        raise FileNotFoundError(f"model directory {directory}: expected a unet/ or transformer/ subfolder")
    denoiser = _meta_diffusers(directory, sub)
    sched_cfg = _read_json(os.path.join(directory, "scheduler", "scheduler_config.json"))
    sched_cls = diffusers.DDIMScheduler if arch == "unet3d" else getattr(diffusers, sched_cfg.get("_class_name", ""),
                                                                         diffusers.FlowMatchEulerDiscreteScheduler)
    scheduler = sched_cls.from_config(sched_cfg)
    if os.path.isdir(os.path.join(directory, "vae")):
        vae = _meta_diffusers(directory, "vae")
        codec: nn.Module = FrameVAECodec(vae) if type(vae).__name__ == "AutoencoderKL" else VideoVAECodec(vae)
    else:
        codec = PixelCodec()
    text_encoders = {}
    for name in sorted(n for n in os.listdir(directory) if n.startswith("text_encoder")):
        if os.path.isdir(os.path.join(directory, name)):
            text_encoders[name] = _meta_transformers(directory, name, classes.get(name, (None, None))[1])
    if not text_encoders:
        raise FileNotFoundError(f"model directory {directory}: missing text_encoder/ subfolder")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[m.dtype]
    codec.to("meta")  # the codecs' latent statistics are built on the CPU
    gen = VideoGenerator(arch, denoiser, scheduler, codec, text_encoders["text_encoder"], m.num_frames, m.height,
                         m.width, dtype)
    return MetaModel(gen, text_encoders, directory)


def apply_lora(cfg, gen) -> Optional[float]:
    """The trainer's trainable parts, injected as the trainer does (on the meta device for real architectures): the
    guidance (w) input of a CD student, the LoRA, and the EMA target adapter. Returns the EMA decay or None."""
    from .lora import ADAPTER, EMA_ADAPTER, add_lora

    lc, denoiser = cfg.lora, gen.denoiser
    device = next(denoiser.parameters()).device
    distils = cfg.mode == "cd" or (cfg.mode == "grpo" and cfg.grpo.cd_weight > 0)
    with torch.device(device):
        if cfg.cd.guidance_conditioning and distils:
            gen.enable_guidance_conditioning(cfg.cd.guidance_embedding_dim)
        add_lora(denoiser, lc.rank, lc.alpha, lc.target_modules, lc.dropout, True, adapter_name=ADAPTER)
        ema = cfg.cd.ema_decay if distils else None
        if ema:
            add_lora(denoiser, lc.rank, lc.alpha, lc.target_modules, 0.0, True, adapter_name=EMA_ADAPTER)
    return ema


def build_reward_model(cfg) -> tuple[Optional[nn.Module], str, int, str]:
    """(model on meta or None, description, bytes per parameter, note) of the reward that runs beside the generator."""
    r = cfg.reward
    if r.kind == "none":
        return None, "none", 0, ""
    if r.kind == "toy":
        return None, "toy (no parameters)", 0, ""
    if r.kind != "pisces":
        return None, r.kind, 0, "a python: reward is not estimated"
    backbone = dict(r.backbone or {})
    kind = backbone.get("kind", "internvideo2")
    dtype = backbone.get("dtype", "float32")
    if kind != "internvideo2":
        return None, f"pisces/{kind}", _BYTES.get(dtype, 4), f"the {kind} backbone is not estimated"
    from pisces_fast.rewards.backbones.internvideo2 import InternVideo2, InternVideo2Config

    spec = backbone.get("config", "stage2_1b")
    frames = int(backbone.get("num_frames", 8))
    if spec in (None, "stage2_1b"):
        icfg = InternVideo2Config.stage2_1b(num_frames=frames)
    elif isinstance(spec, dict):
        icfg = InternVideo2Config.from_dict({**spec, "num_frames": spec.get("num_frames", frames)})
    else:
        icfg = InternVideo2Config.from_dict(_read_json(cfg.resolve_path(spec)))
    with torch.device("meta"):
        model = InternVideo2(icfg)
    return model, f"InternVideo2 ({icfg.vision_depth}x{icfg.vision_width} ViT, {icfg.text_depth}-layer BERT)", \
        _BYTES.get(dtype, 4), ""


# A dry run over several recipes in one process (the tests, a sweep) builds each architecture + LoRA once and
# measures each forward once: meta models hold no storage, and nothing below mutates them between plans.
_MODEL_CACHE: dict = {}
_ACTIVATION_CACHE: dict = {}


def _meta_model_with_lora(cfg) -> tuple:
    m, lc = cfg.model, cfg.lora
    if m.tiny is not None:  # real (tiny) weights: always fresh
        mm = build_meta_model(cfg)
        return mm, apply_lora(cfg, mm.gen)
    key = (architecture_directory(cfg), m.num_frames, m.height, m.width, m.dtype, lc.rank, lc.alpha,
           tuple(lc.target_modules), cfg.mode, cfg.grpo.cd_weight > 0, cfg.cd.ema_decay, cfg.cd.guidance_conditioning,
           cfg.cd.guidance_embedding_dim)
    if key not in _MODEL_CACHE:
        base_key = key[:5]
        if base_key not in _MODEL_CACHE:
            _MODEL_CACHE[base_key] = build_meta_model(cfg)
        mm = copy.deepcopy(_MODEL_CACHE[base_key])  # meta tensors: a copy costs no memory
        _MODEL_CACHE[key] = (mm, apply_lora(cfg, mm.gen))
    return _MODEL_CACHE[key]


def _count(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class MemoryPlan:
    title: str
    params: dict  # name -> count
    rows: dict  # name -> bytes per GPU (the total is their sum)
    activations_with_ckpt: Optional[int]
    activations_without_ckpt: int
    checkpointing: bool
    num_gpus: int
    zero_stage: int
    notes: list = field(default_factory=list)
    shapes: str = ""

    @property
    def total(self) -> float:
        return float(sum(self.rows.values()))

    @property
    def fits(self) -> bool:
        return self.total / GiB + RESERVE_GIB <= GPU_GIB

    def format(self) -> str:
        p = self.params
        lines = [self.title, self.shapes, "parameters:"]
        for name, count in p.items():
            lines.append(f"  {name:<44} {count:>16,}")
        lines.append(f"memory per GPU (ZeRO-{self.zero_stage}, {self.num_gpus} GPU{'s' if self.num_gpus > 1 else ''}):")
        for name, b in self.rows.items():
            lines.append(f"  {name:<44} {b / GiB:>10.2f} GiB")
        lines.append(f"  {'total':<44} {self.total / GiB:>10.2f} GiB")
        other = self.activations_with_ckpt if not self.checkpointing else self.activations_without_ckpt
        if other is not None:
            lines.append(f"  (denoiser activations with gradient checkpointing {'off' if self.checkpointing else 'on'}: "
                         f"{other / GiB:.2f} GiB)")
        verdict = "yes" if self.fits else "NO"
        lines.append(f"fits in {GPU_GIB:.0f} GiB (keeping {RESERVE_GIB:.0f} GiB for the CUDA context): {verdict} "
                     f"({GPU_GIB - RESERVE_GIB - self.total / GiB:+.2f} GiB)")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("estimate model: ZeRO mixed-precision accounting for weights/grads/AdamW states; activations "
                     "measured on the meta device (autograd's saved tensors, fused attention); see "
                     "pisces_fast/training/memory_plan.py")
        return "\n".join(lines)


def _ds_config(cfg) -> Optional[dict]:
    if cfg.deepspeed is None:
        return None
    return _read_json(cfg.resolve_path(cfg.deepspeed))


def default_num_gpus(cfg) -> int:
    if cfg.dry_run_gpus is not None:
        return int(cfg.dry_run_gpus)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if world > 1 else 8


def _text_inputs(gen, batch: int, length: int):
    from .generators import TextConditioning

    c = gen.denoiser.config
    dim = getattr(c, "cross_attention_dim", None) or getattr(c, "text_dim", None) or getattr(c, "text_embed_dim", None)
    pooled = getattr(c, "pooled_projection_dim", None) or 1
    dev = next(gen.denoiser.parameters()).device
    return TextConditioning(torch.zeros(batch, length, dim, device=dev), torch.ones(batch, length, dtype=torch.bool,
                                                                                   device=dev),
                            torch.zeros(batch, pooled, device=dev))


def plan_memory(cfg, num_gpus: Optional[int] = None, measure_both: bool = True) -> MemoryPlan:
    """The per-GPU memory plan of `cfg` (a validated TrainConfig; placeholders allowed under dry_run)."""
    num_gpus = default_num_gpus(cfg) if num_gpus is None else int(num_gpus)
    if num_gpus < 1:
        raise ValueError(f"dry_run_gpus: expected an integer >= 1, got {num_gpus}")
    mm, ema_decay = _meta_model_with_lora(cfg)
    gen, den = mm.gen, mm.gen.denoiser
    ds = _ds_config(cfg)
    stage = int((ds or {}).get("zero_optimization", {}).get("stage", 0)) if ds is not None else 0
    bf16 = bool((ds or {}).get("bf16", {}).get("enabled", False))
    fp16 = bool((ds or {}).get("fp16", {}).get("enabled", False))
    compute = "bfloat16" if bf16 else "float16" if fp16 else cfg.model.dtype
    wbytes = _BYTES[compute]
    helper_bytes = _BYTES[cfg.model.dtype]
    if ds is None:
        num_gpus = 1

    from .lora import ADAPTER, EMA_ADAPTER, lora_parameters

    before = sum(p.numel() for n, p in den.named_parameters() if "lora_" not in n)

    trainable = sum(p.numel() for p in den.parameters() if p.requires_grad)
    ema = sum(p.numel() for _, p in lora_parameters(den, EMA_ADAPTER)) if ema_decay else 0
    lora_default = sum(p.numel() for _, p in lora_parameters(den, ADAPTER))
    frozen = _count(den) - trainable - ema
    reward_model, reward_desc, reward_bytes, reward_note = build_reward_model(cfg)

    params = {f"denoiser {type(den).__name__} (base, frozen)": before,
              f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.target_modules)}"
              f"{' + w projection' if gen.w_conditioned and gen.arch == 'unet3d' else ''} (trainable)": lora_default}
    if trainable != lora_default:
        params["other trainable parameters"] = trainable - lora_default
    if ema:
        params["EMA target adapter (frozen)"] = ema
    for name, te in mm.text_encoders.items():
        params[f"{name} {type(te).__name__} (frozen)"] = _count(te)
    vae = getattr(gen.codec, "vae", None)
    if vae is not None:
        params[f"vae {type(vae).__name__} (frozen)"] = _count(vae)
    if reward_model is not None:
        params[f"reward {reward_desc} (frozen)"] = _count(reward_model)

    rows: dict = {}
    eng = engine_memory(frozen, trainable, ema, stage, num_gpus, wbytes, deepspeed=ds is not None)
    split = f"/{num_gpus}" if stage >= 3 else "replicated"
    rows[f"denoiser weights + adapters ({compute}, {split})"] = eng["weights"]
    rows[f"gradients of trainable params ({'16-bit' if ds else compute}{'/' + str(num_gpus) if stage >= 2 else ''})"] = \
        eng["grads"]
    rows[f"AdamW states ({'fp32 master+m+v' if ds else 'm+v'}{'/' + str(num_gpus) if stage >= 1 else ''})"] = \
        eng["optimizer"]
    te_total = sum(_count(te) for te in mm.text_encoders.values())
    rows[f"text encoder(s) ({cfg.model.dtype}, replicated)"] = te_total * helper_bytes
    if vae is not None:
        rows[f"VAE ({cfg.model.dtype}, replicated)"] = _count(vae) * helper_bytes
    if reward_model is not None:
        rows["reward model (replicated)"] = _count(reward_model) * reward_bytes
    if ds is not None:
        rows["DeepSpeed buffers (buckets / live params)"] = deepspeed_buffers(ds, trainable, _count(den))

    # -- activations --------------------------------------------------------------------------------------
    notes = []
    b = cfg.data.batch_size
    mode = cfg.mode
    meas_batch = 2
    latents_shape = gen.latent_shape(meas_batch)
    dev = next(den.parameters()).device
    act_dtype = {2: torch.bfloat16 if compute == "bfloat16" else torch.float16, 4: torch.float32}[wbytes]
    gen.dtype = act_dtype
    den.to(act_dtype)  # (a model built for this plan only: DeepSpeed casts the real one the same way)
    from .generators import DEFAULT_TEXT_MAX_LENGTH

    family = {"unet3d": "modelscope", "wan": "wan", "hunyuan": "hunyuan"}[gen.arch]
    text_len = cfg.model.text_max_length or (16 if cfg.model.tiny else DEFAULT_TEXT_MAX_LENGTH[family])
    text = _text_inputs(gen, meas_batch, text_len)
    latents = torch.zeros(latents_shape, device=dev)
    t = torch.full((meas_batch,), 500, device=dev) if gen.prediction == "epsilon" else torch.full((meas_batch,), 0.5,
                                                                                                      device=dev)

    guidance = cfg.cd.guidance_scale_min if mode in ("cd", "grpo") else None

    def denoiser_fwd():
        return gen.denoise(den, latents, t, text, guidance=guidance)

    if mode == "cd":
        group = cfg.reward.group_size if (cfg.reward.kind != "none" and cfg.reward.fusion == "group"
                                          and cfg.reward.group_size) else 1
        graphs, per_graph_batch = 1, b * group
    elif mode == "grpo":
        g = cfg.grpo
        n_train = max(1, int(round(g.timestep_fraction * (g.sde_steps or g.num_sampling_steps))))
        cfg_passes = 1 if (g.guidance_scale == 1.0 or gen.w_conditioned) else 2
        graphs, per_graph_batch = n_train, b * g.group_size * cfg_passes
    else:
        graphs, per_graph_batch = 1, 2 * b
    scale = per_graph_batch / meas_batch
    ckpt_supported = bool(getattr(den, "_supports_gradient_checkpointing", False))
    def measured(checkpointing: bool) -> int:
        key = (mm.directory, tuple(latents.shape), tuple(text.embeds.shape), compute, checkpointing,
               cfg.lora.rank, tuple(cfg.lora.target_modules), cfg.cd.guidance_conditioning and mode in ("cd", "grpo"))
        if key not in _ACTIVATION_CACHE or dev.type != "meta":
            _ACTIVATION_CACHE[key] = activation_bytes(den, denoiser_fwd, checkpointing=checkpointing)
        return _ACTIVATION_CACHE[key]

    act_off = measured(False) if (measure_both or not cfg.model.gradient_checkpointing) else None
    act_on = measured(True) if ckpt_supported and (measure_both or cfg.model.gradient_checkpointing) else None
    den_act = {k: (v * scale * graphs if v is not None else None) for k, v in (("off", act_off), ("on", act_on))}
    if mode == "grpo" and cfg.grpo.cd_weight > 0:
        extra = {k: (v * b / meas_batch if v is not None else None) for k, v in (("off", act_off), ("on", act_on))}
        den_act = {k: (den_act[k] + extra[k] if den_act[k] is not None else None) for k in den_act}
    use_ckpt = cfg.model.gradient_checkpointing and den_act["on"] is not None
    plus_cd = f" + CD at batch {b}" if mode == "grpo" and cfg.grpo.cd_weight > 0 else ""
    rows[f"denoiser activations ({graphs} graph{'s' if graphs > 1 else ''} x batch {per_graph_batch}{plus_cd}, "
         f"checkpointing {'on' if use_ckpt else 'off'})"] = den_act["on" if use_ckpt else "off"]
    if mode == "cd" and cfg.reward.kind != "none":
        lat = torch.zeros(gen.latent_shape(1), device=dev, requires_grad=True)
        codec = gen.codec
        if vae is not None:  # the run loads the VAE in model.dtype (load_generator); meta modules cast for free
            vae.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype])
        r = cfg.reward
        how = "" if codec.per_frame else (f", {r.vae_decode}{', checkpointed' if r.vae_checkpointing else ''}"
                                          f"{', tiled' if r.vae_tiling else ''}")
        try:
            key = ("vae", mm.directory, tuple(lat.shape), r.num_frames, compute, r.vae_decode, r.vae_checkpointing,
                   r.vae_tiling)
            if key not in _ACTIVATION_CACHE or dev.type != "meta":
                _ACTIVATION_CACHE[key] = reward_decode_bytes(gen, lat, r.num_frames, r.vae_decode, r.vae_checkpointing,
                                                             r.vae_tiling)
            vae_act = _ACTIVATION_CACHE[key]
            rows[f"VAE decode for the reward (batch {b * group}, with grad{how})"] = vae_act * b * group
            if not codec.per_frame and not (r.vae_decode == "sparse" and r.vae_checkpointing):
                notes.append("the reward's VAE decode: reward.vae_decode 'sparse' + reward.vae_checkpointing true "
                             "decode with graph only what the reward's frames need (see docs/real_models.md)")
        except Exception as exc:  # noqa: BLE001 - a VAE that cannot run on meta is reported, not fatal
            notes.append(f"VAE decode activations not measured ({type(exc).__name__}: {exc})")
        if reward_model is not None:
            rows[f"reward forward to the video (batch {b * group}, with grad)"] = \
                _reward_activations(reward_model, reward_bytes) * b * group
    elif mode == "grpo":
        notes.append("grpo: rollouts, VAE decode and reward run without a graph (not counted)")
    if reward_note:
        notes.append(reward_note)
    if cfg.model.gradient_checkpointing and not ckpt_supported:
        notes.append(f"{type(den).__name__} does not support gradient checkpointing; counted without it")
    shapes = (f"mode {mode}, micro-batch {b} x grad_accum {cfg.optim.grad_accum}, {cfg.model.num_frames} frames "
              f"{cfg.model.height}x{cfg.model.width} -> latents {tuple(gen.latent_shape(1))[1:]}, text length "
              f"{text_len}, compute {compute}")
    title = f"dry run: {type(den).__name__} built on the meta device from {mm.directory} (no weights)"
    return MemoryPlan(title, params, rows, den_act["on"], den_act["off"], use_ckpt, num_gpus, stage, notes, shapes)


def _reward_activations(model: nn.Module, param_bytes: int) -> int:
    """One sample through the reward with gradients to the pixels: video ViT + fusion (matching) layers."""
    c = model.config
    key = ("reward", json.dumps(c.to_dict(), sort_keys=True), param_bytes)
    if key not in _ACTIVATION_CACHE:
        _ACTIVATION_CACHE[key] = _measure_reward_activations(model, param_bytes)
    return _ACTIVATION_CACHE[key]


def _measure_reward_activations(model: nn.Module, param_bytes: int) -> int:
    c = model.config
    dtype = torch.float32 if param_bytes == 4 else torch.bfloat16
    model.to(dtype)
    pixels = torch.zeros(2, c.num_frames, 3, c.image_size, c.image_size, device="meta", dtype=dtype, requires_grad=True)

    def run():
        tokens, _pooled, mask, grid = model.encode_vision(pixels)
        frame_idx, coords = model.video_positions(grid, pixels.device)
        text = torch.zeros(2, c.max_text_len, c.text_width, device="meta", dtype=dtype)
        text_mask = torch.ones(2, c.max_text_len, dtype=torch.bool, device="meta")
        return model.vtm_logits(text, text_mask, tokens, mask, frame_idx, coords)

    return saved_bytes(run, (model,)) // 2


def dry_run(cfg, out=print) -> MemoryPlan:
    """`train.py --dry_run`: print the plan (and return it)."""
    plan = plan_memory(cfg)
    out(plan.format())
    return plan
