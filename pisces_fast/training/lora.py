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
    for n, p in denoiser.named_parameters():
        p.requires_grad_(f".{ADAPTER}." in n and "lora_" in n)
    set_active_adapter(denoiser, ADAPTER)
    denoiser._pisces_lora = {"rank": rank, "alpha": alpha, "target_modules": list(target_modules)}
    return denoiser


def lora_layers(denoiser: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return (m for m in denoiser.modules() if isinstance(m, LoraLayer))


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
    with safe_open(path, framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("pisces_lora", "{}"))
    return load_file(path), meta


def diffusers_prefix(arch: str) -> str:
    return "unet" if arch == "unet3d" else "transformer"


def export_diffusers_lora(state: dict[str, torch.Tensor], arch: str, directory: str, meta: Optional[dict] = None) -> str:
    """Write `pytorch_lora_weights.safetensors` in the layout diffusers' LoRA loaders read."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    prefix = diffusers_prefix(arch)
    out = {f"{prefix}.{k}": v.contiguous() for k, v in state.items()}
    path = os.path.join(directory, DIFFUSERS_WEIGHT_NAME)
    metadata = {"format": "pt", "pisces_lora": json.dumps(meta or {})}
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
        state, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(directory, weight_name=weight_name)
        state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        _, meta = read_lora(os.path.join(directory, weight_name))
        rank = meta.get("rank") or next(v.shape[0] for k, v in state.items() if "lora_A" in k)
        targets = meta.get("target_modules") or sorted({k.split(".lora_")[0].split(".")[-1] for k in state})
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
