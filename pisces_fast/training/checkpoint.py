"""Atomic, resumable checkpoints.

Layout: OUTPUT_DIR/checkpoints/checkpoint-00000012/ with
  lora.safetensors (+ lora_ema.safetensors)   trainable adapter (and the EMA target), safetensors
  optimizer.pt  or  deepspeed/                 optimizer + LR scheduler: torch, or DeepSpeed's files; both are read
                                               with torch's weights_only unpickler (nothing in a checkpoint runs code)
  trainer_state.json                           step, data position, config snapshot
  rng/rank{r}.json + rank{r}.safetensors       python, numpy and torch (CPU, CUDA) RNG states of every rank
and OUTPUT_DIR/checkpoints/latest naming the newest complete checkpoint.

Atomicity: everything is written into `.tmp-checkpoint-N/`, fsynced, then renamed in one `os.replace`; `latest`
is replaced the same way. A crash leaves either the old or the new checkpoint, never half of one; stale tmp
directories are ignored and cleaned up.

Resuming never guesses: a missing, truncated or garbage file (or a `latest` naming no checkpoint) raises
`CheckpointError` naming the file, instead of silently resuming from another checkpoint or starting afresh.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable, Optional

import numpy as np
import torch

from ..fileio import atomic_write_text, fsync_dir

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file and says what is wrong."""


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def read_checkpoint_file(path: str, load: Callable[[str], object]):
    """`load(path)` with every failure turned into one `CheckpointError` naming the file (missing, truncated,
    not the expected format)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path} (the checkpoint is incomplete; resume from another "
                              "one with --resume DIR, or start afresh without --resume)")
    try:
        return load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file; the cause is kept
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file corrupt: {path}: {detail}") from exc


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def save_rng(directory: str, rank: int) -> None:
    from safetensors.torch import save_file

    meta, tensors = rng_state()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as fh:
        json.dump(meta, fh)
    save_file(tensors, os.path.join(directory, f"rank{rank}.safetensors"))


def load_rng(directory: str, rank: int) -> None:
    from safetensors.torch import load_file

    js, st = os.path.join(directory, f"rank{rank}.json"), os.path.join(directory, f"rank{rank}.safetensors")
    if not (os.path.isfile(js) or os.path.isfile(st)) and os.path.isdir(directory):
        raise CheckpointError(f"checkpoint: RNG state for rank {rank} not found in {directory} (was the run saved with "
                              "a different number of ranks?)")
    meta = read_checkpoint_file(js, _read_json)
    tensors = read_checkpoint_file(st, load_file)
    try:
        set_rng_state(meta, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint file corrupt: {js} / {st}: not an RNG state ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# finding checkpoints


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Published checkpoint directories (complete unless damaged afterwards), oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = CKPT_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_resume_checkpoint(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """`resume`: None (fresh start), "latest" (the checkpoint `checkpoints/latest` names; a fresh start when the run
    has none yet), or a checkpoint directory. A damaged `latest` or checkpoint is an error, never silently replaced
    by another checkpoint."""
    if resume is None:
        return None
    if resume != "latest":
        verify_checkpoint(resume)
        return resume
    root = checkpoint_root(output_dir)
    latest = os.path.join(root, "latest")
    if not os.path.isfile(latest):
        found = list_checkpoints(output_dir)
        if not found:
            return None  # nothing saved yet: "latest" is a fresh start
        # `latest` is written right after the first checkpoint is published: only a crash in between (or a user)
        # leaves checkpoints without it. Don't guess which one was meant.
        raise CheckpointError(f"--resume latest: {latest} is missing but {root} holds {len(found)} checkpoint(s); "
                              f"pass one explicitly, e.g. --resume {found[-1][1]}")
    with open(latest, "rb") as fh:
        raw = fh.read()
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not CKPT_RE.match(name):
        raise CheckpointError(f"checkpoint file corrupt: {latest}: expected the name of a checkpoint directory "
                              f"(checkpoint-NNNNNNNN), got {raw[:60]!r}")
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{latest} names {name}, which does not exist in {root}")
    verify_checkpoint(path)
    return path


def verify_checkpoint(path: str) -> None:
    """The files every checkpoint has (the optimizer state is checked by the backend that reads it)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: not a directory")
    for name in ("trainer_state.json", "lora.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing (resume from another checkpoint "
                                  "with --resume DIR, or start afresh without --resume)")


def read_trainer_state(path: str) -> dict:
    file = os.path.join(path, "trainer_state.json")
    state = read_checkpoint_file(file, _read_json)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("data"), dict):
        raise CheckpointError(f"checkpoint file corrupt: {file}: expected a JSON object with an integer `step` and a "
                              "`data` position")
    return state


def read_checkpoint_lora(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's LoRA weights (safetensors, finite)."""
    from .lora import read_lora

    return read_checkpoint_file(path, lambda p: read_lora(p)[0])


# ----------------------------------------------------------------------------------------------------------
# saving


class CheckpointWriter:
    """Collective save: every rank calls `save`; rank 0 publishes the directory atomically."""

    def __init__(self, output_dir: str, backend, keep: int):
        self.root = checkpoint_root(output_dir)
        self.backend, self.keep = backend, keep

    def save(self, step: int, lora_files: dict, trainer_state: dict) -> str:
        """`lora_files`: {filename: callable() -> (state_dict, meta)}; the callables are collective (ZeRO-3 gather)."""
        from .lora import save_lora

        be = self.backend
        tmp = os.path.join(self.root, f".tmp-checkpoint-{step:08d}")
        final = os.path.join(self.root, f"checkpoint-{step:08d}")
        if be.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):
                if name.startswith(".tmp-checkpoint-"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        be.barrier()
        be.save_state(tmp)
        for fname, getter in lora_files.items():
            state, meta = getter()
            if be.rank == 0:
                save_lora(os.path.join(tmp, fname), state, meta)
        save_rng(os.path.join(tmp, "rng"), be.rank)
        be.barrier()
        if be.rank == 0:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
                json.dump(trainer_state, fh, indent=1)
            _fsync_tree(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final))
            for _, old in list_checkpoints(os.path.dirname(self.root))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        be.barrier()
        return final
