"""Convert the official (pickled) InternVideo2 stage-2 checkpoint to safetensors, once.

    python -m pisces_fast.rewards.convert_internvideo2 InternVideo2-stage2_1b-224p-f4.pt IV2.safetensors --trust-pickle

The official ``.pt`` is a DeepSpeed dict: besides the tensors under ``"module"`` it holds pickled
Python objects, and unpickling runs arbitrary code. The file is first read with
``torch.load(weights_only=True)``; only if that fails — and only with ``--trust-pickle`` — is it
unpickled. Its tensors are checked against the InternVideo2 architecture with the same key mapping
the loader uses (:mod:`.backbones.internvideo2_checkpoint`: zero missing / unexpected keys, shapes
equal, ``pos_embed`` resampleable) and written to safetensors in the official key layout, minus the
training-only parts the loader ignores. From then on ``reward.backbone.checkpoint`` points at the
safetensors file and nothing unpickles.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .backbones.internvideo2 import InternVideo2, InternVideo2Config
from .backbones.internvideo2_checkpoint import IGNORED_PREFIXES, IGNORED_SUFFIXES, convert_official_state_dict, unwrap_state_dict

FORMAT = "internvideo2-stage2-official"


class PickleRefused(ValueError):
    """The checkpoint needs full unpickling and the caller did not say it trusts the file."""


def _read(path: Path, trust_pickle: bool) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "objects other than tensors"
            raise PickleRefused(
                f"{path} holds pickled Python objects besides tensors ({reason}); unpickling it can run arbitrary code, "
                "so it was not loaded. If you trust this file (the official InternVideo2 release), rerun with --trust-pickle."
            ) from None
    return torch.load(path, map_location="cpu", weights_only=False)


def convert_internvideo2(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    trust_pickle: bool = False,
    config: Optional[InternVideo2Config] = None,
) -> dict:
    """Convert ``src`` (an official stage-2 ``.pt``) to ``dst`` (``.safetensors``); returns a summary dict.

    ``config`` is the architecture to check against (default: the official 1B layout).
    Raises :class:`PickleRefused` (a ValueError) if ``src`` needs unpickling and ``trust_pickle`` is False.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {dst}")
    state = unwrap_state_dict(_read(src, trust_pickle), str(src))
    if not any(k.startswith("text_encoder.bert.") for k in state) or not any(k.startswith("vision_encoder.") for k in state):
        names = ", ".join(sorted({k.split(".")[0] for k in state})[:12])
        raise ValueError(f"{src} is not an official InternVideo2 stage-2 checkpoint: no vision_encoder.* and "
                         f"text_encoder.bert.* tensors (its top-level names: {names})")
    config = config or InternVideo2Config.stage2_1b()
    with torch.device("meta"):  # shapes only: the 1B model is never materialised
        model = InternVideo2(config)
    try:
        converted, report = convert_official_state_dict(state, model)
    except ValueError as exc:
        raise ValueError(f"{src} does not match the InternVideo2 architecture: {exc}") from None
    own = model.state_dict()
    bad = sorted(k for k in set(own) & set(converted) if own[k].shape != converted[k].shape)
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(report.unexpected + [k for k in converted if k not in own])
    if bad or missing or unexpected:
        detail = (f"{bad[0]} has shape {tuple(converted[bad[0]].shape)}, the architecture wants {tuple(own[bad[0]].shape)}; "
                  if bad else "")
        raise ValueError(f"{src} does not match the InternVideo2 architecture: {detail}{len(missing)} missing "
                         f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    kept = {}
    for key in list(state):
        value = state.pop(key)  # one tensor in memory twice at most
        if key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        kept[key] = value.detach().clone().contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(kept, str(tmp), metadata={"format": FORMAT, "source": src.name,
                                        "architecture": json.dumps(config.to_dict())})
    tmp.replace(dst)
    n_params = sum(v.numel() for v in kept.values())
    return {"tensors": len(kept), "parameters": n_params, "ignored": len(report.ignored), "resized": report.resized,
            "output": str(dst)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pisces_fast.rewards.convert_internvideo2",
                                     description=__doc__.strip().split("\n")[0])
    parser.add_argument("src", help="the official checkpoint, e.g. InternVideo2-stage2_1b-224p-f4.pt")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of SRC (runs code stored in the file: only for files you trust)")
    parser.add_argument("--config", default=None,
                        help="architecture to check against: a JSON of InternVideo2Config fields (default: the 1B stage-2 model)")
    args = parser.parse_args(argv)
    try:
        config = None
        if args.config is not None:
            path = Path(args.config)
            if not path.is_file():
                raise FileNotFoundError(f"--config: file not found: {path}")
            fields = json.loads(path.read_text())
            fields.pop("kind", None)
            config = InternVideo2Config.from_dict(fields)
        summary = convert_internvideo2(args.src, args.dst, trust_pickle=args.trust_pickle, config=config)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    print(f"wrote {summary['output']}: {summary['tensors']} tensors, {summary['parameters'] / 1e6:.1f}M parameters "
          f"({summary['ignored']} training-only tensors dropped); set reward.backbone.checkpoint to it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
