"""Atomic, resumable checkpoints.

Layout: OUTPUT_DIR/checkpoints/checkpoint-00000012/ with
  lora.safetensors (+ lora_ema.safetensors)   trainable adapter (and the EMA target), safetensors
  optimizer.pt  or  deepspeed/                 optimizer + LR scheduler (torch, loaded weights_only) / DeepSpeed's
  trainer_state.json                           step, data position, config snapshot
  rng/rank{r}.json + rank{r}.safetensors       python, numpy and torch (CPU, CUDA) RNG states of every rank
and OUTPUT_DIR/checkpoints/latest naming the newest complete checkpoint.

Atomicity: everything is written into `.tmp-checkpoint-N/`, fsynced, then renamed in one `os.replace`; `latest`
is replaced the same way. A crash leaves either the old or the new checkpoint, never half of one; stale tmp
directories are ignored and cleaned up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


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
    if not (os.path.isfile(js) and os.path.isfile(st)):
        raise FileNotFoundError(f"checkpoint: RNG state for rank {rank} not found in {directory} (was the run saved "
                                "with a different number of ranks?)")
    with open(js) as fh:
        meta = json.load(fh)
    set_rng_state(meta, load_file(st))


# ----------------------------------------------------------------------------------------------------------
# finding checkpoints


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_resume_checkpoint(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """`resume`: None (fresh start), "latest" (newest complete checkpoint, or fresh if none), or a directory."""
    if resume is None:
        return None
    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no trainer_state.json)")
        return resume
    latest = os.path.join(checkpoint_root(output_dir), "latest")
    if os.path.isfile(latest):
        with open(latest) as fh:
            path = os.path.join(checkpoint_root(output_dir), fh.read().strip())
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as fh:
        return json.load(fh)


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
            _fsync_dir(self.root)
            atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final))
            for _, old in list_checkpoints(os.path.dirname(self.root))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        be.barrier()
        return final
