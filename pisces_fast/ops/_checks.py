"""Argument checks shared by the public ops: the one place where inputs and :class:`OTConfig` are validated.

Every public op validates here before dispatching, so all backends see the same, already-checked
arguments and every bad input fails with a one-line message naming the argument and what was
expected. Two kinds of checks:

* **Structural** (type, then rank/shape, dtype, device — in that order): always, and free (no data
  is read).
* **Value** checks (NaN/Inf, magnitudes inside the valid domain of :mod:`.config`, all-padding
  masks): one fused ``aminmax`` pass per tensor plus one host read. They run when
  :func:`value_checks_enabled` says so (``check_inputs``: default on for CPU tensors, off for CUDA
  tensors, where reading the answer back would be a device-to-host sync) and never inside
  ``torch.compile`` (a data-dependent branch would break the graph).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import config as _cfg


# ---------------------------------------------------------------------------------------------
# Scalars and the config


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_in_range(name: str, value, lo: float, hi: float, *, allow_zero: bool = False) -> float:
    """A finite real in [lo, hi] (or exactly 0 with ``allow_zero``); the error states the valid domain."""
    value = check_positive(name, value, allow_zero=allow_zero)
    if (value == 0 and allow_zero) or lo <= value <= hi:
        return value
    domain = f"0 or [{lo:g}, {hi:g}]" if allow_zero and lo > 0 else f"[{lo:g}, {hi:g}]"
    raise ValueError(f"{name} must be in {domain} (the valid domain, see docs/numerics.md), got {value:g}")


def check_mass(mass) -> float:
    if isinstance(mass, bool) or not isinstance(mass, (int, float)):
        raise TypeError(f"mass must be a real number in (0, 1], got {type(mass).__name__}")
    mass = float(mass)
    if not (0.0 < mass <= 1.0):
        raise ValueError(f"mass must be in (0, 1] (the transported fraction m), got {mass}")
    return mass


def check_max_iter(max_iter) -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"max_iter must be an int >= 1, got {type(max_iter).__name__}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if max_iter > _cfg.MAX_ITER_LIMIT:
        raise ValueError(f"max_iter must be <= {_cfg.MAX_ITER_LIMIT} (the valid domain, see docs/numerics.md), got {max_iter}")
    return int(max_iter)


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_ot_config(config) -> dict:
    """Validate every field of an :class:`~pisces_fast.ops.OTConfig`; returns the normalized values.

    Called once, by ``OTConfig.__post_init__``; errors name the field as the public functions'
    keyword arguments do (``eps must be ...``).
    """
    if config.domain == "log" and config.kernel_dtype in ("bfloat16", "float16"):
        raise ValueError(
            f"kernel_dtype={config.kernel_dtype!r} applies to the scaling domain only; domain='log' has no kernel matrix"
        )
    check_inputs = config.check_inputs
    if check_inputs is not None and not isinstance(check_inputs, bool):
        raise TypeError(f"check_inputs must be None (auto), True or False, got {type(check_inputs).__name__}")
    eps_lo, eps_hi = _cfg.EPS_RANGE
    fe_lo, fe_hi = _cfg.FUSE_EPS_RANGE
    return dict(
        eps=check_in_range("eps", config.eps, eps_lo, eps_hi),
        mass=check_mass(config.mass),
        max_iter=check_max_iter(config.max_iter),
        tol=check_in_range("tol", config.tol, 0.0, _cfg.TOL_MAX, allow_zero=True),
        gamma=check_in_range("gamma", config.gamma, 0.0, _cfg.WEIGHT_MAX, allow_zero=True),
        eta=check_in_range("eta", config.eta, 0.0, _cfg.WEIGHT_MAX, allow_zero=True),
        fuse_eps=check_in_range("fuse_eps", config.fuse_eps, fe_lo, fe_hi),
        domain=_choice("domain", config.domain, _cfg.DOMAINS),
        kernel_dtype=_choice("kernel_dtype", config.kernel_dtype, _cfg.KERNEL_DTYPES),
        check_inputs=check_inputs,
    )


# ---------------------------------------------------------------------------------------------
# Tensors: structure


def check_tensor(
    name: str,
    x,
    *,
    min_rank: Optional[int] = None,
    rank: Optional[int] = None,
    floating: bool = True,
) -> torch.Tensor:
    """A (floating) tensor of the given rank, non-empty. Reads no data."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if min_rank is not None and x.dim() < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_device(name: str, x: torch.Tensor, device: torch.device, what: str = "the inputs") -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {what} are on {device}; all inputs must share a device")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The common device of already type-checked tensors (None entries skipped)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all inputs must share a device")
    return first


def check_mask(name: str, mask, shape: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    """A bool mask (True = real token) broadcastable to ``shape``; returns it expanded, or None.

    Checks type, then dtype, then device, then shape. Whether each problem keeps a real token is a
    value check (:func:`check_values`).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor (True = real token), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}; all inputs must share a device")
    try:
        return mask.expand(tuple(shape))
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, which does not broadcast to {tuple(shape)}"
        ) from None


def check_positions_structure(frame_idx, coords, m: int, device: torch.device) -> None:
    """Types, devices and shapes of the video-token positions ``frame_idx (M,)``, ``coords (M, 2)``."""
    for name, t in (("frame_idx", frame_idx), ("coords", coords)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be a real (floating or integer) tensor, got {t.dtype}")
        check_device(name, t, device)
    if frame_idx.shape != (m,):
        raise ValueError(
            f"frame_idx must have shape (M,) = ({m},) (one frame index per video token), got {tuple(frame_idx.shape)}"
        )
    if coords.shape != (m, 2):
        raise ValueError(
            f"coords must have shape (M, 2) = ({m}, 2) (one (row, col) per video token), got {tuple(coords.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Tensors: values (one fused reduction per tensor, one host read for all of them)


def value_checks_enabled(check_inputs: Optional[bool], device: torch.device) -> bool:
    """Whether to read tensor values: never while tracing for ``torch.compile``; by default on CPU only."""
    if check_inputs is False or torch.compiler.is_compiling():
        return False
    if check_inputs is None:
        return device.type == "cpu"
    return True


def check_values(
    named: Sequence[Tuple[str, torch.Tensor, Optional[float]]],
    masks: Sequence[Tuple[str, Optional[torch.Tensor]]] = (),
) -> list:
    """NaN/Inf and magnitude checks, and the all-padding check of ``masks``, with ONE host read.

    ``named`` holds ``(name, tensor, abs_bound or None)``; returns each tensor's max |x|. ``aminmax``
    is one fused pass per tensor (NaN propagates to both ends, ±Inf shows at an end), ~15x cheaper on
    CPU than materializing ``isfinite(x)`` and reducing it. A mask is checked un-broadcast (same
    answer, less work): each problem must keep >= 1 real token.
    """
    parts = []
    for _name, t, _bound in named:
        lo, hi = torch.aminmax(t.detach())
        parts += [lo.to(torch.float64), hi.to(torch.float64)]
    present = [(name, mask) for name, mask in masks if mask is not None]
    parts += [mask.any(dim=-1).all().to(torch.float64) for _name, mask in present]
    values = torch.stack(parts).tolist() if parts else []
    out = []
    for i, (name, _t, bound) in enumerate(named):
        lo, hi = values[2 * i], values[2 * i + 1]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or Inf values")
        amax = max(-lo, hi)
        if bound is not None and amax > bound:
            raise ValueError(
                f"{name} has entries of magnitude {amax:.3g} > {bound:g} (the valid domain, see docs/numerics.md)"
            )
        out.append(amax)
    for (name, _mask), ok in zip(present, values[2 * len(named):]):
        if not ok:
            raise ValueError(f"{name} marks every token of some problem as padding; each problem needs >= 1 real token")
    return out


def check_cost_scale(name: str, cost_absmax: float, eps: float) -> None:
    """max |C| / eps within :data:`~pisces_fast.ops.config.COST_OVER_EPS_MAX` (float32 plan stays representable)."""
    if cost_absmax > _cfg.COST_OVER_EPS_MAX * eps:
        raise ValueError(
            f"{name} has max |C| = {cost_absmax:.3g}, so |C|/eps = {cost_absmax / eps:.3g} exceeds "
            f"{_cfg.COST_OVER_EPS_MAX:g} (the valid domain, see docs/numerics.md): rescale the cost or raise eps"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32: the Sinkhorn's log-sum-exps need the range."""
    return torch.float64 if dtype == torch.float64 else torch.float32
