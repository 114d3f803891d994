"""Build the PISCES reward from a configuration mapping (the ``reward:`` section of a training YAML).

The schema (also in :class:`pisces_fast.training.config.RewardConfig`)::

    backbone:
      kind: internvideo2          # internvideo2 | blip
      checkpoint: IV2.safetensors # internvideo2: official stage-2 keys (convert the .pt once with
                                  #   python -m pisces_fast.rewards.convert_internvideo2) or our own layout
      tokenizer: bert-large-uncased/   # internvideo2: a transformers tokenizer directory
      config: stage2_1b           # internvideo2: stage2_1b | an InternVideo2Config JSON | inline mapping
      path: blip-itm-large-coco/  # blip: a transformers directory (BlipForImageTextRetrieval + tokenizer)
      num_frames: 8               # frames sampled per video (default: the config's / 8)
      max_text_len: 40            # prompt truncation (default: the config's / BLIP's 35)
      dtype: float32              # float32 | bfloat16 | float16
    ot_map: ot_map/               # directory written by python -m pisces_fast.rewards.prepare
    use_ot_map: true
    use_pot: true
    pot: {gamma: 0.2, eta: 0.2, eps: 0.05, mass: 0.9, backend: auto}   # the partial-OT settings: the
                                  # fields of pisces_fast.ops.OTConfig (eps, mass, max_iter, tol, gamma, eta,
                                  # fuse_eps, domain, kernel_dtype, check_inputs) + backend (POTConfig)
    weights: {quality: 1.0, semantic: 1.0}

Every error names the field (``reward.backbone.checkpoint: ...``). Nothing is unpickled: checkpoints
are safetensors, tokenizers and BLIP directories are read by transformers with ``local_files_only``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .patching import POTConfig

BACKBONE_KINDS = ("internvideo2", "blip")
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REWARD_NAMES = ("quality", "semantic")
CONVERT_HINT = "python -m pisces_fast.rewards.convert_internvideo2 IN.pt OUT.safetensors --trust-pickle"
PREPARE_HINT = "python -m pisces_fast.rewards.prepare --backbone-config X.yaml --data pairs.csv --out DIR"

# Which keys each backbone kind takes (the rest are errors, so a misplaced key is never silently ignored).
_BACKBONE_KEYS = {
    "internvideo2": {"kind", "checkpoint", "tokenizer", "config", "num_frames", "max_text_len", "dtype"},
    "blip": {"kind", "path", "tokenizer", "num_frames", "max_text_len", "dtype"},
}
_REWARD_KEYS = {"backbone", "ot_map", "use_ot_map", "use_pot", "pot", "weights"}


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed, checked ``backbone:`` section (paths resolved)."""

    kind: str
    checkpoint: Optional[str] = None
    tokenizer: Optional[str] = None
    config: Any = "stage2_1b"
    path: Optional[str] = None
    num_frames: Optional[int] = None
    max_text_len: Optional[int] = None
    dtype: str = "float32"
    field: str = "backbone"  # how errors name this section


@dataclass(frozen=True)
class PiscesRewardSpec:
    """A parsed, checked reward section for ``kind: pisces``."""

    backbone: BackboneSpec
    ot_map: Optional[str]
    use_ot_map: bool
    use_pot: bool
    pot: POTConfig
    weights: Dict[str, float]
    field: str = "reward"


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unknown_keys(data: Mapping, allowed, where: str, hint: str = "") -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key{hint}; valid keys here: {sorted(allowed)}")


def _path(data: Mapping, key: str, where: str, resolve: Callable[[str], str], *, required: bool) -> Optional[str]:
    value = data.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}.{key}: required")
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{where}.{key}: expected a path, got {value!r}")
    return resolve(str(value))


def backbone_spec_from_dict(
    data: Mapping,
    *,
    field: str = "reward.backbone",
    resolve: Optional[Callable[[str], str]] = None,
    check_files: bool = True,
) -> BackboneSpec:
    """Parse and check a ``backbone:`` mapping (see module docstring). ``resolve`` maps relative paths."""
    resolve = resolve or (lambda p: p)
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{field}: expected a mapping with kind: internvideo2 | blip (and its paths), got {data!r}")
    kind = data.get("kind")
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"{field}.kind: expected one of {BACKBONE_KINDS}, got {kind!r}")
    other = "blip" if kind == "internvideo2" else "internvideo2"
    stray = sorted(set(data) - _BACKBONE_KEYS[kind])
    hint = f" for kind {kind}" + (f" (kind {other} takes it)" if stray and stray[0] in _BACKBONE_KEYS[other] else "")
    _unknown_keys(data, _BACKBONE_KEYS[kind], field, hint=hint)
    for key in ("num_frames", "max_text_len"):
        v = data.get(key)
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{field}.{key}: expected an integer >= 1, got {v!r}")
    dtype = data.get("dtype", "float32")
    if dtype not in BACKBONE_DTYPES:
        raise ValueError(f"{field}.dtype: expected one of {tuple(BACKBONE_DTYPES)}, got {dtype!r}")
    common = dict(kind=kind, num_frames=data.get("num_frames"), max_text_len=data.get("max_text_len"), dtype=dtype, field=field)
    if kind == "internvideo2":
        checkpoint = _path(data, "checkpoint", field, resolve, required=True)
        tokenizer = _path(data, "tokenizer", field, resolve, required=True)
        config = data.get("config", "stage2_1b")
        if isinstance(config, str) and config != "stage2_1b":
            config = resolve(config)
        elif not isinstance(config, (str, Mapping)):
            raise ValueError(f"{field}.config: expected 'stage2_1b', a JSON file or a mapping of InternVideo2Config fields, "
                             f"got {config!r}")
        spec = BackboneSpec(checkpoint=checkpoint, tokenizer=tokenizer, config=config, **common)
    else:
        spec = BackboneSpec(path=_path(data, "path", field, resolve, required=True),
                            tokenizer=_path(data, "tokenizer", field, resolve, required=False), **common)
    if check_files:
        check_backbone_files(spec)
    return spec


def check_backbone_files(spec: BackboneSpec) -> None:
    """The files a backbone spec names exist and have the expected form (cheap checks, no loading)."""
    f = spec.field
    if spec.kind == "internvideo2":
        ckpt = Path(spec.checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(f"{f}.checkpoint: file not found: {ckpt}")
        if ckpt.suffix != ".safetensors":
            raise ValueError(f"{f}.checkpoint: {ckpt} is not a .safetensors file; pickled checkpoints are not loaded. "
                             f"Convert the official .pt once: {CONVERT_HINT}")
        if isinstance(spec.config, str) and spec.config != "stage2_1b" and not Path(spec.config).is_file():
            raise FileNotFoundError(f"{f}.config: expected 'stage2_1b' or an InternVideo2Config JSON file, not found: {spec.config}")
    else:
        d = Path(spec.path)
        if not d.is_dir():
            raise FileNotFoundError(f"{f}.path: directory not found: {d} (expected a transformers BLIP ITM directory)")
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{f}.path: {d} has no config.json (expected a transformers BLIP ITM directory)")
    if spec.tokenizer is not None and not Path(spec.tokenizer).is_dir():
        raise FileNotFoundError(f"{f}.tokenizer: directory not found: {spec.tokenizer} (expected a transformers tokenizer directory)")


def pisces_reward_spec_from_dict(
    data: Mapping,
    *,
    field: str = "reward",
    resolve: Optional[Callable[[str], str]] = None,
    check_files: bool = True,
) -> PiscesRewardSpec:
    """Parse and check the reward section of ``kind: pisces`` (keys: backbone, ot_map, use_ot_map, use_pot, pot, weights)."""
    resolve = resolve or (lambda p: p)
    if not isinstance(data, Mapping):
        raise ValueError(f"{field}: expected a mapping, got {type(data).__name__}")
    _unknown_keys(data, _REWARD_KEYS, field)
    if not data.get("backbone"):
        raise ValueError(f"{field}.backbone: required for kind pisces (kind: internvideo2 with checkpoint + tokenizer, "
                         "or kind: blip with path)")
    backbone = backbone_spec_from_dict(data["backbone"], field=f"{field}.backbone", resolve=resolve, check_files=check_files)
    for key in ("use_ot_map", "use_pot"):
        if not isinstance(data.get(key, True), bool):
            raise ValueError(f"{field}.{key}: expected true or false, got {data.get(key)!r}")
    use_ot_map, use_pot = bool(data.get("use_ot_map", True)), bool(data.get("use_pot", True))

    raw_weights = data.get("weights") or {name: 1.0 for name in REWARD_NAMES}
    if not isinstance(raw_weights, Mapping):
        raise ValueError(f"{field}.weights: expected a mapping {{quality: w, semantic: w}}, got {raw_weights!r}")
    weights = {}
    for name, w in raw_weights.items():
        if name not in REWARD_NAMES:
            raise ValueError(f"{field}.weights.{name}: kind pisces gives the rewards {REWARD_NAMES}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"{field}.weights.{name}: expected a number >= 0, got {w!r}")
        weights[name] = float(w)
    weights = {name: weights.get(name, 0.0) for name in REWARD_NAMES}  # not named = not fused = not computed
    if all(w == 0 for w in weights.values()):
        raise ValueError(f"{field}.weights: at least one of {REWARD_NAMES} must have a weight > 0")

    ot_map = _path(data, "ot_map", field, resolve, required=False)
    if use_ot_map and weights["quality"] > 0:
        if ot_map is None:
            raise ValueError(f"{field}.ot_map: required when use_ot_map is true and weights.quality > 0: the directory of "
                             f"a fitted OT map ({PREPARE_HINT}); or set use_ot_map: false for the plain VLM cosine")
        if check_files and not (Path(ot_map) / "config.json").is_file():
            raise FileNotFoundError(f"{field}.ot_map: {ot_map} is not an OT map directory (no config.json); fit one with "
                                    f"{PREPARE_HINT}")

    pot_data = data.get("pot") or {}
    if not isinstance(pot_data, Mapping):
        raise ValueError(f"{field}.pot: expected a mapping of POT settings, got {pot_data!r}")
    if "enabled" in pot_data:
        raise ValueError(f"{field}.pot.enabled: not a setting here; use {field}.use_pot: false for vanilla cross-attention")
    _unknown_keys(pot_data, {f.name for f in dataclasses.fields(POTConfig)} - {"enabled"}, f"{field}.pot")
    try:
        pot = POTConfig(**pot_data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}.pot: {exc}") from None
    return PiscesRewardSpec(backbone, ot_map, use_ot_map, use_pot, pot, weights, field)


def load_backbone_yaml(path: Union[str, os.PathLike], *, check_files: bool = True) -> BackboneSpec:
    """A backbone spec from a YAML file: the backbone mapping itself, or under ``backbone:``, or under
    ``reward: backbone:`` (so a training recipe works as is). Relative paths are resolved next to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-config: file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"--backbone-config {path}: expected a YAML mapping")
    field = "backbone"
    if isinstance(data.get("reward"), Mapping) and "backbone" in data["reward"]:
        data, field = data["reward"]["backbone"], "reward.backbone"
    elif "backbone" in data:
        data = data["backbone"]
    elif "kind" not in data:
        raise ValueError(f"--backbone-config {path}: no backbone section: expected the mapping itself (kind: internvideo2 | "
                         "blip, ...), or one under backbone: or reward: backbone:")
    base = path.parent.resolve()

    def resolve(p: str) -> str:
        if os.path.isabs(p) or os.path.exists(p):
            return p
        candidate = base / p
        return str(candidate) if candidate.exists() else p

    return backbone_spec_from_dict(data, field=f"{path.name}: {field}", resolve=resolve, check_files=check_files)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def internvideo2_config(spec: BackboneSpec):
    """The :class:`InternVideo2Config` a spec describes (``config`` + ``num_frames`` / ``max_text_len`` overrides)."""
    from .backbones.internvideo2 import InternVideo2Config

    f = spec.field
    if isinstance(spec.config, str) and spec.config == "stage2_1b":
        fields = InternVideo2Config.stage2_1b().to_dict()
    elif isinstance(spec.config, str):
        try:
            fields = json.loads(Path(spec.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{f}.config: cannot read {spec.config} as JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{f}.config: {spec.config} must hold a JSON object of InternVideo2Config fields")
        fields.pop("kind", None)  # config.json written by InternVideo2.save_pretrained
    else:
        fields = dict(spec.config)
    if spec.num_frames is not None:
        fields["num_frames"] = spec.num_frames
    if spec.max_text_len is not None:
        fields["max_text_len"] = spec.max_text_len
    try:
        return InternVideo2Config.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{f}.config: {exc}") from None


def _load_tokenizer(directory: str, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / others for unreadable directories
        raise ValueError(f"{where}: cannot load a tokenizer from {directory} ({type(exc).__name__}: {exc})") from None


def _top_level_names(keys) -> str:
    return ", ".join(sorted({k.split(".")[0] for k in keys})[:12])


def build_internvideo2_backbone(spec: BackboneSpec, device: Union[str, torch.device] = "cpu"):
    """:class:`InternVideo2Backbone` from a spec: config, safetensors checkpoint (official or our key layout), tokenizer."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .backbones.internvideo2 import InternVideo2, InternVideo2Backbone
    from .backbones.internvideo2_checkpoint import convert_official_state_dict

    f = spec.field
    check_backbone_files(spec)
    config = internvideo2_config(spec)
    try:
        with safe_open(spec.checkpoint, framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged or foreign file
        raise ValueError(f"{f}.checkpoint: {spec.checkpoint} is not a readable safetensors file ({exc})") from None
    official = any(k.startswith("text_encoder.bert.") for k in keys)
    ours = any(k.startswith("text_encoder.embeddings.") for k in keys)
    if not any(k.startswith("vision_encoder.") for k in keys) or not (official or ours):
        hint = " (a BLIP model? use kind: blip with path: its transformers directory)" if any(
            k.startswith("vision_model.") for k in keys) else ""
        lacking = [p for p, ok in (("vision_encoder.*", any(k.startswith("vision_encoder.") for k in keys)),
                                   ("text_encoder.bert.* (official) or text_encoder.embeddings.*", official or ours)) if not ok]
        raise ValueError(f"{f}.checkpoint: {spec.checkpoint} is not an InternVideo2 stage-2 checkpoint (no "
                         f"{' and no '.join(lacking)} tensors; its top-level names: {_top_level_names(keys)}){hint}")
    with torch.device("meta"):  # shapes first: a checkpoint that does not fit fails before 1B weights are allocated
        model = InternVideo2(config)
    state = load_file(spec.checkpoint)
    where = f"{f}.checkpoint: {spec.checkpoint} does not fit {f}.config " \
            f"({spec.config if isinstance(spec.config, str) else 'inline'})"
    unexpected = []
    if official:
        try:
            state, report = convert_official_state_dict(state, model)  # the official key mapping (+ pos_embed resampling)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        unexpected = list(report.unexpected)
    own = model.state_dict()
    bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(unexpected + [k for k in state if k not in own])
    if bad:
        raise ValueError(f"{where}: {bad[0]} is {tuple(state[bad[0]].shape)}, the config wants {tuple(own[bad[0]].shape)}")
    if missing or unexpected:
        raise ValueError(f"{where}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    model.load_state_dict(state, assign=True)
    tokenizer = _load_tokenizer(spec.tokenizer, f"{f}.tokenizer")
    vocab = config.vocab_size
    if len(tokenizer) != vocab:
        raise ValueError(f"{f}.tokenizer: {spec.tokenizer} has {len(tokenizer)} tokens but the checkpoint's vocabulary has "
                         f"{vocab} (text_encoder word embeddings): not this backbone's tokenizer (InternVideo2: bert-large-uncased)")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != config.pad_token_id:
        raise ValueError(f"{f}.tokenizer: {spec.tokenizer} pads with id {tokenizer.pad_token_id} but the model's pad_token_id "
                         f"is {config.pad_token_id}: not this backbone's tokenizer")
    model = model.to(device=device, dtype=BACKBONE_DTYPES[spec.dtype])
    return InternVideo2Backbone(model, tokenizer).eval()


def build_blip_backbone(spec: BackboneSpec, device: Union[str, torch.device] = "cpu"):
    """:class:`BlipVideoBackbone` from a transformers ``BlipForImageTextRetrieval`` directory."""
    from transformers import BlipForImageTextRetrieval

    from .backbones.blip import BlipVideoBackbone

    f = spec.field
    check_backbone_files(spec)
    directory = Path(spec.path)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}.path: {directory / 'config.json'} is not valid JSON ({exc})") from None
    archs = meta.get("architectures") or []
    if meta.get("model_type") != "blip" or (archs and "BlipForImageTextRetrieval" not in archs):
        raise ValueError(f"{f}.path: {directory} holds a {meta.get('model_type')!r} model {archs}, not BLIP image-text "
                         "matching (BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-large-coco)")
    weights = sorted(directory.glob("*.safetensors"))
    if weights:
        from safetensors import safe_open

        names = set()
        for w in weights:
            with safe_open(str(w), framework="pt") as fh:
                names.update(fh.keys())
        if not any(k.startswith("itm_head.") for k in names):
            raise ValueError(f"{f}.path: {directory} has no itm_head.* weights: not an image-text matching checkpoint "
                             "(the semantic reward needs the matching head)")
    try:
        model = BlipForImageTextRetrieval.from_pretrained(str(directory), attn_implementation="eager", local_files_only=True,
                                                          use_safetensors=bool(weights) or None)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{f}.path: cannot load BlipForImageTextRetrieval from {directory} ({exc})") from None
    tokenizer = _load_tokenizer(spec.tokenizer or str(directory), f"{f}.tokenizer" if spec.tokenizer else f"{f}.path")
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"{f}.{'tokenizer' if spec.tokenizer else 'path'}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"BLIP text model's vocabulary has {vocab}: not this model's tokenizer")
    kwargs = {}
    if spec.num_frames is not None:
        kwargs["num_frames"] = spec.num_frames
    if spec.max_text_len is not None:
        kwargs["max_text_len"] = spec.max_text_len
    model = model.to(device=device, dtype=BACKBONE_DTYPES[spec.dtype])
    return BlipVideoBackbone(model, tokenizer, **kwargs).eval()


def build_backbone(spec: BackboneSpec, device: Union[str, torch.device] = "cpu"):
    """The reward backbone a :class:`BackboneSpec` describes, frozen-ready (eval mode) on ``device``."""
    if spec.kind == "internvideo2":
        return build_internvideo2_backbone(spec, device)
    return build_blip_backbone(spec, device)


def backbone_input_size(backbone) -> tuple:
    """``(num_frames, image_size)`` a backbone samples a video to (to decode real clips at that size)."""
    from .backbones.blip import BlipVideoBackbone
    from .backbones.internvideo2 import InternVideo2Backbone

    if isinstance(backbone, InternVideo2Backbone):
        return backbone.config.num_frames, backbone.config.image_size
    if isinstance(backbone, BlipVideoBackbone):
        return backbone.num_frames, backbone.image_size
    raise TypeError(f"unsupported backbone {type(backbone).__name__}")


def build_pisces_rewards(spec: PiscesRewardSpec, device: Union[str, torch.device] = "cpu"):
    """:class:`PiscesRewards` (frozen, eval mode) from a :class:`PiscesRewardSpec`."""
    from .ot_map import OTMap
    from .pisces_rewards import PiscesRewards

    f = spec.field
    backbone = build_backbone(spec.backbone, device)
    needs_map = spec.use_ot_map and spec.weights["quality"] > 0
    ot = None
    if needs_map:
        try:
            ot = OTMap.load(spec.ot_map, map_location=device)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise ValueError(f"{f}.ot_map: {exc}") from None
        if ot.dim != backbone.embed_dim:
            raise ValueError(f"{f}.ot_map: the OT map at {spec.ot_map} maps {ot.dim}-d embeddings but the backbone's joint "
                             f"space is {backbone.embed_dim}-d: fit it on this backbone's embeddings ({PREPARE_HINT})")
    return PiscesRewards(backbone, ot, use_ot_map=needs_map, use_pot=spec.use_pot, pot=spec.pot, weights=spec.weights)
