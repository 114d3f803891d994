"""Load an official InternVideo2 stage-2 checkpoint into :class:`~.internvideo2.InternVideo2`.

The official checkpoint (``InternVideo2-stage2_1b-224p-f4.pt``) is a DeepSpeed dict whose
``"module"`` holds keys under ``vision_encoder.``, ``text_encoder.bert.``, ``vision_proj.``,
``text_proj.``, ``itm_head.`` and ``temp`` (see ``../shared/notes/reference-facts.md``). Our
submodules mirror the official names, so the conversion is a prefix mapping plus:

* ``text_encoder.bert.*`` → ``text_encoder.*`` (we keep BERT without the MLM wrapper);
* dropped (training-only parts): the MLM head ``text_encoder.cls.*``, the BERT pooler, the
  unmasked-teacher decoders ``vision_encoder.clip_decoder.*`` / ``final_clip_decoder.*``, their
  position embeddings ``clip_pos_embed`` / ``clip_img_pos_embed`` / ``img_pos_embed``, any
  ``clip_teacher.*`` and the ``position_ids`` buffers;
* ``vision_encoder.pos_embed`` is resampled to the model's frame count when they differ (the
  official model is trained with 4 frames and run with 8 by exactly this interpolation).

``itm_head.*`` is kept: the popular demo loader (and T2V-Turbo's copy) drops it, but the semantic
reward needs the matching head.

Only the tiny configuration is exercised in tests (the real model cannot be downloaded here);
:func:`load_official_checkpoint` reports missing/unexpected keys and raises in strict mode, so a
layout drift in a real checkpoint shows up as a clear error rather than silently random weights.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import torch

from .internvideo2 import InternVideo2, interpolate_pos_embed

PREFIX_MAP: Tuple[Tuple[str, str], ...] = (
    ("text_encoder.bert.", "text_encoder."),
    ("vision_encoder.", "vision_encoder."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
)
IGNORED_PREFIXES: Tuple[str, ...] = (
    "text_encoder.cls.",
    "text_encoder.bert.pooler.",
    "text_encoder.pooler.",
    "vision_encoder.clip_decoder.",
    "vision_encoder.final_clip_decoder.",
    "vision_encoder.clip_pos_embed",
    "vision_encoder.clip_img_pos_embed",
    "vision_encoder.img_pos_embed",
    "clip_teacher.",
)
IGNORED_SUFFIXES: Tuple[str, ...] = ("position_ids",)
WRAPPER_KEYS: Tuple[str, ...] = ("module", "model", "state_dict")


def read_checkpoint(path: Union[str, Path], *, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, unwrapping ``module``/``model``/``state_dict``.

    Torch files are read with ``torch.load(weights_only=True)``. DeepSpeed checkpoints may carry
    pickled objects besides tensors; those fail to load unless ``trust_pickle=True`` (only for
    files you trust — better: convert once to safetensors and load that).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} holds objects other than tensors ({str(exc).splitlines()[0]}); it was not unpickled. "
                "If you trust the file, pass trust_pickle=True (or convert it to safetensors once)."
            ) from None
    return unwrap_state_dict(state, str(path))


def unwrap_state_dict(state, where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The tensor dict inside a ``{"module": ...}`` / ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper."""
    for key in WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where} does not contain a state dict of tensors")
    return dict(state)


@dataclass
class LoadReport:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)


def convert_official_state_dict(
    state: Mapping[str, torch.Tensor], model: InternVideo2
) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Map official stage-2 keys to ours (see module docstring); returns the state and a report."""
    report = LoadReport()
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            report.ignored.append(key)
            continue
        if key == "temp":
            out["temp"] = value.reshape(())
            continue
        for src, dst in PREFIX_MAP:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
        else:
            report.unexpected.append(key)
    pos_key = "vision_encoder.pos_embed"
    if pos_key in out:
        pos = out[pos_key]
        target = model.vision_encoder.pos_embed
        if pos.shape != target.shape:
            t, h, w = model.config.grid
            n = pos.shape[1] - 1
            if pos.dim() != 3 or pos.shape[-1] != target.shape[-1] or n % (h * w):
                raise ValueError(
                    f"checkpoint pos_embed {tuple(pos.shape)} cannot be resampled to {tuple(target.shape)} "
                    f"(expects 1 + T·{h}·{w} entries of width {target.shape[-1]})"
                )
            out[pos_key] = interpolate_pos_embed(pos, (n // (h * w), h, w), (t, h, w))
            report.resized.append(pos_key)
    return out, report


def load_official_checkpoint(
    model: InternVideo2,
    checkpoint: Union[str, Path, Mapping[str, torch.Tensor]],
    *,
    strict: bool = True,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load an official InternVideo2 stage-2 checkpoint (path or state dict) into ``model``.

    With ``strict=True`` any model parameter left unset or any unrecognised checkpoint key is an
    error naming the first offenders; with ``strict=False`` they are returned in the report.
    """
    if not isinstance(model, InternVideo2):
        raise TypeError(f"model must be an InternVideo2, got {type(model).__name__}")
    if isinstance(checkpoint, Mapping):
        state = unwrap_state_dict(checkpoint)
    else:
        state = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    converted, report = convert_official_state_dict(state, model)
    own = model.state_dict()
    for key, value in converted.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}: "
                "the InternVideo2Config does not match the checkpoint"
            )
    result = model.load_state_dict(converted, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected += list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"checkpoint does not match the model: {len(report.missing)} missing (e.g. {report.missing[:5]}), "
            f"{len(report.unexpected)} unexpected (e.g. {report.unexpected[:5]})"
        )
    return report
