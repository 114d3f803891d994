"""Where the optimizer lives: plain torch on one process, or a DeepSpeed engine (ZeRO-2/3) under a launcher.

Both expose the same small surface to the loop: `forward` (callable running the denoiser), `backward(loss)`,
`micro_step(boundary)`, `save_state(dir)` / `load_state(dir)` (optimizer + LR scheduler), `gathered(params)`
(full tensors of ZeRO-3-partitioned parameters), `rank`, `world_size`, `barrier()`, `all_mean(x)`.
A torch optimizer is passed to `deepspeed.initialize`, which avoids building DeepSpeed's cpu_adam/fused_adam.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, read_checkpoint_file


def lr_lambda(optim_cfg, max_steps: int):
    warm, kind = optim_cfg.warmup_steps, optim_cfg.lr_scheduler

    def fn(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def make_optimizer(params: list, optim_cfg, max_steps: int):
    if not params:
        raise ValueError("no trainable parameters: LoRA injection produced nothing to train")
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                            weight_decay=optim_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim_cfg, max_steps))
    return opt, sched


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class TorchBackend:
    rank, world_size, zero_stage = 0, 1, 0

    def __init__(self, denoiser: torch.nn.Module, optim_cfg, max_steps: int):
        self.module = denoiser
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params, optim_cfg, max_steps)
        self.grad_accum = optim_cfg.grad_accum
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.grad_norm: Optional[float] = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def micro_step(self, boundary: bool) -> None:
        if not boundary:
            return
        if self.max_grad_norm > 0:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_state(self, directory: str) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(directory, "optimizer.pt"))

    def load_state(self, directory: str) -> None:
        path = os.path.join(directory, "optimizer.pt")
        if not os.path.isfile(path):
            if os.path.isdir(os.path.join(directory, "deepspeed")):
                raise CheckpointError(f"checkpoint {directory} was saved by a DeepSpeed run (deepspeed/, no optimizer.pt): "
                                      "resume it under the deepspeed launcher or with --deepspeed CONFIG")
        state = read_checkpoint_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))

        def restore(p):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

        read_checkpoint_file(path, restore)  # wrong structure (not this run's optimizer) is a corrupt file too

    def gathered(self, params, modifier_rank=None):
        return contextlib.nullcontext()

    def barrier(self) -> None:
        pass

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_min(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _resolve_ds_config(path: Optional[str], cfg) -> dict:
    if path is None:
        ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    else:
        with open(path) as fh:
            ds = json.load(fh)
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ValueError(f"deepspeed config {path}: remove the '{block}' block; the optimizer and LR schedule "
                             "come from the training config's `optim` section (a torch AdamW is passed to DeepSpeed)")
    auto = lambda k: ds.get(k, "auto") == "auto"  # noqa: E731
    if auto("train_micro_batch_size_per_gpu"):
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    else:
        cfg.data.batch_size = int(ds["train_micro_batch_size_per_gpu"])
    if auto("gradient_accumulation_steps"):
        ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    else:
        cfg.optim.grad_accum = int(ds["gradient_accumulation_steps"])
    if auto("gradient_clipping"):
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    if ds.get("train_batch_size", "auto") == "auto":
        ds.pop("train_batch_size", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO checkpoints hold (loss scaler, ZeRO stage, fragment addresses): plain
    data classes whose unpickling runs no code. Everything else is refused by torch's weights_only unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_checkpoints_without_pickle(engine) -> None:
    """DeepSpeed (0.19) reads its checkpoint files with `torch.load(weights_only=False)`, which runs any code a
    planted pickle carries. Route every read of this engine through torch's weights_only unpickler instead."""
    safe = deepspeed_safe_globals()

    def load(path: str, map_location=None):
        def read(p):
            try:
                with torch.serialization.safe_globals(safe):
                    return torch.load(p, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(
                    f"checkpoint file refused: {p}: it holds Python objects other than tensors and DeepSpeed's "
                    f"optimizer metadata, and loading it would run arbitrary code "
                    f"({str(exc).strip().splitlines()[0][:200]})") from exc
        return read_checkpoint_file(path, read)

    engine.checkpoint_engine.load = load


def init_distributed() -> None:
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29511")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedBackend:
    def __init__(self, denoiser: torch.nn.Module, cfg, ds_config_path: Optional[str]):
        import deepspeed

        init_distributed()
        self.ds_config = _resolve_ds_config(ds_config_path, cfg)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        params = [p for p in denoiser.parameters() if p.requires_grad]
        opt, sched = make_optimizer(params, cfg.optim, cfg.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=denoiser, optimizer=opt, lr_scheduler=sched, config=self.ds_config)
        load_deepspeed_checkpoints_without_pickle(self.engine)
        self.module = self.engine.module
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.grad_norm: Optional[float] = None

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config.get("bf16", {}).get("enabled", False))

    @property
    def fp16(self) -> bool:
        return bool(self.ds_config.get("fp16", {}).get("enabled", False))

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def micro_step(self, boundary: bool) -> None:
        self.engine.step()
        if boundary:
            gn = self.engine.get_global_grad_norm()
            self.grad_norm = float(gn) if gn is not None else None

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_state(self, directory: str) -> None:
        # Only the trainable (LoRA) weights: the frozen base is never copied into checkpoints.
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory: str) -> None:
        if not os.path.isdir(os.path.join(directory, "deepspeed")):
            hint = (" (saved by a plain torch run: resume it with `python train.py --deepspeed null`)"
                    if os.path.isfile(os.path.join(directory, "optimizer.pt")) else "")
            raise CheckpointError(f"checkpoint {directory} is incomplete: deepspeed/ (optimizer state) is missing{hint}")
        try:
            path, _ = self.engine.load_checkpoint(directory, tag="deepspeed", load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - DeepSpeed's own errors on damaged state: name the directory
            raise CheckpointError(f"checkpoint {os.path.join(directory, 'deepspeed')}: DeepSpeed could not restore the "
                                  f"optimizer state ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from exc
        if path is None:
            raise CheckpointError(f"checkpoint {os.path.join(directory, 'deepspeed')}: DeepSpeed found no state to load")

    def gathered(self, params, modifier_rank=None):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)

    def barrier(self) -> None:
        dist.barrier()

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone().float()
        dist.all_reduce(y)
        return y / self.world_size

    def all_min(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone().float()
        dist.all_reduce(y, op=dist.ReduceOp.MIN)
        return y
