"""LoRA on the denoiser only (peft), LoRA-only safetensors files, diffusers-format export, merge.

`UNet3DConditionModel` has no PeftAdapterMixin, so adapters are injected with `peft.inject_adapter_in_model`
for every architecture (one code path). Files:
- ours: `lora.safetensors` with peft keys *without* adapter names (`...to_q.lora_A.weight`) + metadata
  (rank, alpha, target modules) so it can be re-injected without the YAML;
- diffusers export: `pytorch_lora_weights.safetensors` with keys prefixed `unet.` (UNet3D) or `transformer.`
  (Hunyuan / Wan). `HunyuanVideoPipeline.load_lora_weights` / `WanPipeline.load_lora_weights` read it directly.
  diffusers' UNet3D loader path (`TextToVideoSDPipeline.load_lora_weights`) fails because the UNet3D class lacks
  `load_lora_adapter`; `load_diffusers_lora_into_denoiser` parses the same file with diffusers'
  `lora_state_dict` and injects it with peft.

`load_lora(pipe, directory)` (re-exported as `pisces_fast.load_lora`) is the one call for all three stock pipelines.
A guidance-conditioned UNet3D student (cd.guidance_conditioning) also trains `time_embedding.cond_proj`
(`GuidanceProjection`, one zero-initialised Linear per adapter), exported as `unet.time_embedding.cond_proj.weight`.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Iterator, Optional

import torch
import torch.nn as nn

ADAPTER = "default"
EMA_ADAPTER = "ema_target"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------------------
# guidance (w) conditioning of a UNet3D consistency student (LCM / T2V-Turbo)

# Our key (adapter name stripped) and the plain diffusers parameter it becomes in exports and merges.
GUIDANCE_KEY = "time_embedding.cond_proj.lora_w.weight"
GUIDANCE_EXPORT_KEY = "time_embedding.cond_proj.weight"


def guidance_scale_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The student's w input, diffusers' LCM convention (`LatentConsistencyModelPipeline.get_guidance_scale_embedding`
    applied to w = guidance_scale - 1): sinusoidal features of 1000 w, sin then cos, (B,) -> (B, dim) float32.

    `guidance_scale` is the CFG scale s of out = u + s (c - u); LCM / T2V-Turbo write the same teacher as
    c + w (c - u), so w = s - 1 (T2V-Turbo's w ~ U[5, 15] is s ~ U[6, 16])."""
    w = (torch.as_tensor(guidance_scale, dtype=torch.float32).reshape(-1) - 1.0) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(freq.device)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class GuidanceProjection(nn.Module):
    """`time_embedding.cond_proj` of a w-conditioned UNet3D student: one zero-initialised bias-free Linear per adapter.

    It sits where diffusers' `TimestepEmbedding` adds `cond_proj(timestep_cond)` before `linear_1`. Kept per adapter
    like the LoRA matrices (parameter names contain `lora_` and the adapter name), so it is trained, checkpointed,
    EMA'd, disabled for the teacher (-> exactly zero: the teacher is the unconditioned base model) and exported
    together with the LoRA by the same code."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lora_w = nn.ModuleDict()
        self._active_adapter = [ADAPTER]
        self._disable_adapters = False

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.lora_w:
            return
        ref = next(iter(self.lora_w.values()), None)
        layer = nn.Linear(self.in_features, self.out_features, bias=False)
        nn.init.zeros_(layer.weight)
        if ref is not None:
            layer.to(device=ref.weight.device, dtype=ref.weight.dtype)
        self.lora_w[adapter_name] = layer

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        name = self._active_adapter[0]
        if self._disable_adapters or name not in self.lora_w:
            return cond.new_zeros(*cond.shape[:-1], self.out_features)
        layer = self.lora_w[name]
        return layer(cond.to(layer.weight.dtype))


def add_guidance_projection(unet: nn.Module, dim: int = 256) -> nn.Module:
    """Give a UNet3DConditionModel the w input (`time_cond_proj_dim` = dim, `timestep_cond`), zero-initialised, with
    an entry for every adapter already injected (call before `add_lora`, or `add_lora` adds them later)."""
    te = getattr(unet, "time_embedding", None)
    if te is None or not hasattr(te, "linear_1"):
        raise ValueError(f"guidance conditioning: {type(unet).__name__} has no time_embedding.linear_1 (UNet3D expected)")
    if dim < 2:
        raise ValueError(f"cd.guidance_embedding_dim: expected an integer >= 2, got {dim}")
    if isinstance(getattr(te, "cond_proj", None), GuidanceProjection):
        return unet
    if getattr(te, "cond_proj", None) is not None:
        raise ValueError("guidance conditioning: the UNet already has time_embedding.cond_proj (time_cond_proj_dim="
                         f"{unet.config.time_cond_proj_dim}); it is already w-conditioned")
    proj = GuidanceProjection(dim, te.linear_1.in_features)
    adapters = {n for m in lora_layers(unet) for n in getattr(m, "lora_A", {})} or {ADAPTER}
    for name in sorted(adapters, key=lambda n: n != ADAPTER):
        proj.add_adapter(name)
    proj.to(device=te.linear_1.weight.device, dtype=te.linear_1.weight.dtype)
    proj.requires_grad_(False)
    te.cond_proj = proj
    unet.register_to_config(time_cond_proj_dim=dim)
    return unet


def _peft_config(rank: int, alpha: float, target_modules, dropout: float = 0.0, init=True):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      init_lora_weights=init)


def add_lora(denoiser: nn.Module, rank: int, alpha: float, target_modules, dropout: float = 0.0, init=True,
             adapter_name: str = ADAPTER) -> nn.Module:
    """Inject a LoRA adapter; freeze everything but this adapter's A/B matrices."""
    from peft import inject_adapter_in_model

    if adapter_name == ADAPTER:
        denoiser.requires_grad_(False)
    names = [n for n, _ in denoiser.named_modules()]
    for target in target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"lora.target_modules: no module named {target!r} in {type(denoiser).__name__}")
    with warnings.catch_warnings():
        # A second adapter (the EMA target network) is intended; peft warns about any second one.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(_peft_config(rank, alpha, target_modules, dropout, init), denoiser, adapter_name=adapter_name)
    for module in denoiser.modules():
        if isinstance(module, GuidanceProjection):
            module.add_adapter(adapter_name)
    for n, p in denoiser.named_parameters():
        p.requires_grad_(f".{ADAPTER}." in n and "lora_" in n)
    set_active_adapter(denoiser, ADAPTER)
    denoiser._pisces_lora = {"rank": rank, "alpha": alpha, "target_modules": list(target_modules)}
    return denoiser


def lora_layers(denoiser: nn.Module) -> Iterator[nn.Module]:
    """peft LoRA layers and guidance projections: everything the adapter switches (active / disabled) act on."""
    from peft.tuners.lora import LoraLayer

    return (m for m in denoiser.modules() if isinstance(m, (LoraLayer, GuidanceProjection)))


def lora_parameters(denoiser: nn.Module, adapter_name: str = ADAPTER) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in denoiser.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


def set_active_adapter(denoiser: nn.Module, adapter_name: str) -> None:
    # Assign the active adapter directly: peft's set_adapter() also flips requires_grad, which would make the
    # frozen EMA copy trainable and change the parameter set DeepSpeed reduces.
    for layer in lora_layers(denoiser):
        layer._active_adapter = [adapter_name]


@contextlib.contextmanager
def adapter_disabled(denoiser: nn.Module):
    """The frozen base model (the teacher / reference policy) without a second copy in memory."""
    layers = list(lora_layers(denoiser))
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


@contextlib.contextmanager
def active_adapter(denoiser: nn.Module, adapter_name: str):
    set_active_adapter(denoiser, adapter_name)
    try:
        yield
    finally:
        set_active_adapter(denoiser, ADAPTER)


def _strip_adapter(key: str, adapter_name: str) -> str:
    return key.replace(f".{adapter_name}.", ".")


def lora_state_dict(denoiser: nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """Adapter weights with peft key names (no adapter name), on CPU, float32. Under ZeRO-3 call inside
    `gathered(...)` so each tensor is the full parameter."""
    return {_strip_adapter(n, adapter_name): p.detach().float().cpu().clone() for n, p in lora_parameters(denoiser, adapter_name)}


def load_lora_state_dict(denoiser: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = ADAPTER) -> None:
    params = dict(lora_parameters(denoiser, adapter_name))
    expected = {_strip_adapter(n, adapter_name): n for n in params}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state: {len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}); was it saved with the same rank/target_modules/architecture?")
    with torch.no_grad():
        for k, full in expected.items():
            if params[full].shape != state[k].shape:
                raise ValueError(f"LoRA state: {k} has shape {tuple(state[k].shape)}, expected {tuple(params[full].shape)}")
            params[full].copy_(state[k].to(params[full].dtype))


def save_lora(path: str, state: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"pisces_lora": json.dumps(meta)})


def read_lora(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("pisces_lora", "{}"))
        state = load_file(path)
    except Exception as exc:  # noqa: BLE001 - truncated / not safetensors / bad metadata: one line naming the file
        raise ValueError(f"LoRA file {path}: not a readable safetensors LoRA ({str(exc).strip() or type(exc).__name__})") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"LoRA file {path}: {len(bad)} tensor(s) hold NaN or Inf (e.g. {bad[0]}); refusing to load it")
    return state, meta


def diffusers_prefix(arch: str) -> str:
    return "unet" if arch == "unet3d" else "transformer"


def export_diffusers_lora(state: dict[str, torch.Tensor], arch: str, directory: str, meta: Optional[dict] = None) -> str:
    """Write `pytorch_lora_weights.safetensors` in the layout diffusers' LoRA loaders read."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    prefix = diffusers_prefix(arch)
    # A w-conditioned UNet3D student's projection is written under its plain diffusers name, and its use is recorded.
    out = {f"{prefix}.{GUIDANCE_EXPORT_KEY if k == GUIDANCE_KEY else k}": v.contiguous() for k, v in state.items()}
    meta = dict(meta or {})
    if GUIDANCE_KEY in state:
        meta["guidance_embedding"] = {"dim": int(state[GUIDANCE_KEY].shape[1]), "input": "guidance_scale - 1",
                                      "key": f"{prefix}.{GUIDANCE_EXPORT_KEY}"}
    path = os.path.join(directory, DIFFUSERS_WEIGHT_NAME)
    metadata = {"format": "pt", "pisces_lora": json.dumps(meta)}
    if meta and "rank" in meta:
        # diffusers reads rank / alpha / targets from this key (as written by its own save_lora_weights);
        # without it, it assumes alpha = rank and the scale would silently change.
        cfg = _peft_config(meta["rank"], meta.get("alpha", meta["rank"]), meta.get("target_modules", [])).to_dict()
        packed = {f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        metadata["lora_adapter_metadata"] = json.dumps(packed, sort_keys=True, default=str)
    save_file(out, path, metadata=metadata)
    return path


def load_diffusers_lora_into_denoiser(denoiser: nn.Module, arch: str, path: str, adapter_name: str = ADAPTER) -> nn.Module:
    """Inject and load a diffusers-format LoRA into a plain diffusers denoiser.

    Hunyuan / Wan go through diffusers' own `load_lora_into_transformer`; UNet3D (no `load_lora_adapter`) is
    parsed with diffusers' `lora_state_dict` and injected with peft."""
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin, StableDiffusionLoraLoaderMixin, WanLoraLoaderMixin

    directory, weight_name = (path, DIFFUSERS_WEIGHT_NAME) if os.path.isdir(path) else os.path.split(path)
    if arch == "unet3d":
        raw, meta = read_lora(os.path.join(directory, weight_name))
        guidance = raw.get(f"unet.{GUIDANCE_EXPORT_KEY}")
        state, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(directory, weight_name=weight_name)
        state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.") and k != f"unet.{GUIDANCE_EXPORT_KEY}"}
        rank = meta.get("rank") or next(v.shape[0] for k, v in state.items() if "lora_A" in k)
        targets = meta.get("target_modules") or sorted({k.split(".lora_")[0].split(".")[-1] for k in state})
        if guidance is not None:
            add_guidance_projection(denoiser, guidance.shape[1])
            state[GUIDANCE_KEY] = guidance
        add_lora(denoiser, rank, meta.get("alpha", rank), targets, adapter_name=adapter_name)
        load_lora_state_dict(denoiser, state, adapter_name)
        return denoiser
    mixin = HunyuanVideoLoraLoaderMixin if arch == "hunyuan" else WanLoraLoaderMixin
    state, metadata = mixin.lora_state_dict(directory, weight_name=weight_name, return_lora_metadata=True)
    mixin.load_lora_into_transformer(state, transformer=denoiser, adapter_name=adapter_name, metadata=metadata)
    return denoiser


def merge_lora(denoiser: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and remove the LoRA layers (for plain diffusers export)."""
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, GuidanceProjection):  # -> the plain Linear of a time_cond_proj_dim UNet3D
            plain = module.lora_w[ADAPTER]
            parent_name, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name), child, plain)
            plain.requires_grad_(False)
            continue
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            setattr(parent, child, module.get_base_layer())
    return denoiser


def ema_update(denoiser: nn.Module, decay: float) -> None:
    """theta^- <- decay theta^- + (1 - decay) theta, over the LoRA weights (the base is shared)."""
    student = dict(lora_parameters(denoiser, ADAPTER))
    target = dict(lora_parameters(denoiser, EMA_ADAPTER))
    with torch.no_grad():
        for n, p in target.items():
            src = student[n.replace(f".{EMA_ADAPTER}.", f".{ADAPTER}.")]
            p.mul_(decay).add_(src.detach().to(p.dtype), alpha=1 - decay)


def copy_adapter(denoiser: nn.Module, src: str, dst: str) -> None:
    s = dict(lora_parameters(denoiser, src))
    with torch.no_grad():
        for n, p in lora_parameters(denoiser, dst):
            p.copy_(s[n.replace(f".{dst}.", f".{src}.")])


def load_lora(pipe, directory: str, *, guidance_scale: Optional[float] = None, adapter_name: str = ADAPTER):
    """Load a LoRA exported by pisces_fast (`OUTPUT_DIR/lora_diffusers`) into a stock diffusers pipeline; returns `pipe`.

    - `TextToVideoSDPipeline` (UNet3D has no `load_lora_adapter`, so `pipe.load_lora_weights` fails): the LoRA is
      injected into `pipe.unet` with peft. A guidance-conditioned (w) consistency student also carries its w
      projection; stock pipelines never pass `timestep_cond`, so for the `guidance_scale` given here the projected
      w-embedding is folded exactly into `time_embedding.linear_1`'s bias (cond_proj is linear and added before
      linear_1). Sample it with `LCMScheduler.from_config(pipe.scheduler.config)` and the pipeline's own
      `guidance_scale=1.0` (one pass, no CFG): the w is already in the weights.
    - `WanPipeline` / `HunyuanVideoPipeline`: `pipe.load_lora_weights(directory)` (diffusers' own loader). A Hunyuan
      student takes w through the transformer's `guidance` input: pass it as the pipeline's `guidance_scale`.
    """
    if not os.path.isdir(directory) or not os.path.isfile(os.path.join(directory, DIFFUSERS_WEIGHT_NAME)):
        raise FileNotFoundError(f"load_lora: expected a directory holding {DIFFUSERS_WEIGHT_NAME} (train.py's "
                                f"OUTPUT_DIR/lora_diffusers), got {directory}")
    unet = getattr(pipe, "unet", None)
    if unet is None:
        if guidance_scale is not None:
            raise ValueError("load_lora: guidance_scale is only folded into UNet3D students; for "
                             f"{type(pipe).__name__} pass guidance_scale to the pipeline call")
        if not hasattr(pipe, "load_lora_weights"):
            raise TypeError(f"load_lora: {type(pipe).__name__} has neither a `unet` nor `load_lora_weights`")
        pipe.load_lora_weights(directory, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=adapter_name)
        return pipe
    if type(unet).__name__ != "UNet3DConditionModel":
        raise TypeError(f"load_lora: pipe.unet is {type(unet).__name__}; pisces_fast exports UNet3DConditionModel LoRAs")
    if any(True for _ in lora_layers(unet)):
        raise ValueError("load_lora: pipe.unet already holds a LoRA; load into a freshly loaded pipeline")
    load_diffusers_lora_into_denoiser(unet, "unet3d", directory, adapter_name)
    proj = getattr(unet.time_embedding, "cond_proj", None)
    if isinstance(proj, GuidanceProjection):
        if guidance_scale is None:
            raise ValueError("load_lora: this UNet3D student is guidance-conditioned (w input); pass guidance_scale=s, "
                             "the CFG scale it should reproduce (it was trained on cd.guidance_scale_min..max)")
        fold_guidance_into_bias(unet, float(guidance_scale))
    elif guidance_scale is not None:
        raise ValueError("load_lora: guidance_scale given but this LoRA has no guidance projection (it was trained "
                         "without cd.guidance_conditioning); pass guidance_scale to the pipeline call instead")
    unet.eval()
    return pipe


@torch.no_grad()
def fold_guidance_into_bias(unet: nn.Module, guidance_scale: float) -> None:
    """Replace a UNet3D's w projection by a constant: linear_1.bias += linear_1(cond_proj(emb(s))) - linear_1(0),
    exact up to float rounding because `TimestepEmbedding` computes linear_1(t_emb + cond_proj(emb))."""
    te = unet.time_embedding
    proj = te.cond_proj
    emb = guidance_scale_embedding(torch.tensor([guidance_scale]), proj.in_features).to(te.linear_1.weight.device)
    shift = proj(emb.to(te.linear_1.weight.dtype)).float()
    lin = te.linear_1
    delta = (lin(shift.to(lin.weight.dtype)) - lin(torch.zeros_like(shift).to(lin.weight.dtype))).float()[0]
    base = lin.get_base_layer() if hasattr(lin, "get_base_layer") else lin
    base.bias.add_(delta.to(base.bias.dtype))
    te.cond_proj = None
    unet.register_to_config(time_cond_proj_dim=None)
