"""Neural OT map between text and real-video embeddings (PISCES §3.1, Appendix B, Algorithm 2).

Algorithm 2 is Neural Optimal Transport (NOT, Korotin et al., 2023) with the quadratic cost
``c(y, x) = ‖y − x‖²``: a transport map ``T_ψ: Y → X`` and a potential ``f_ω: X → R`` solve the
saddle point ``sup_f inf_T E_ν f(x) + E_μ [c(y, T(y)) − f(T(y))]``, alternating ``K_T`` map steps
(minimise ``c(y, T(y)) − f(T(y))``) with one potential step (minimise ``E f(T(y)) − E f(x)``).
Both networks are 3-layer MLPs with LayerNorm and ReLU, as in the paper.

Two choices the paper leaves open, made here for robustness and documented in the docstrings:

* **Residual map.** ``T(y) = y + MLP(y)`` with the last layer zero-initialised, so training starts
  from the identity (a text embedding is its own best first guess) instead of a random map.
* **Standardised coordinates.** The networks see ``(y − mean_Y)/s`` and ``(x − mean_X)/s`` with one
  common scale ``s``. For the quadratic cost the optimal map is equivariant under separate
  translations of the two spaces and a common rescaling, so this changes nothing in the
  solution; it only makes the learning rate independent of the embedding scale (VLM embeddings
  are unit-norm, ~0.04 per coordinate at d = 512). With the residual map, the initial map is then
  the mean-matching translation ``y − mean_Y + mean_X``.

``fit_ot_map`` shows a tqdm bar, holds out a validation split and logs its transport cost
``E‖y − T(y)‖²``, dual objective and mean gap; ``OTMap.save``/``OTMap.load`` use safetensors plus a
small JSON config (nothing is unpickled). The command line fits a map from two tensor files::

    python -m pisces_fast.rewards.ot_map fit --source text.safetensors --target video.safetensors --out ot_map/

Tensor files (see :func:`load_embeddings`): ``.safetensors`` (one tensor, or ``--source-key``),
``.pt``/``.pth``/``.bin`` read with ``torch.load(weights_only=True)`` (a tensor or a dict of
tensors), and ``.npy`` read with ``numpy.load(allow_pickle=False)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..fileio import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "ot_map.safetensors"
FORMAT_VERSION = 1
_CHECKPOINT_NAME = "fit_state.pt"

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The paper's 3-layer MLP: Linear → LayerNorm → ReLU, twice, then a Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_dim),
    )


@dataclass
class OTMapConfig:
    """Architecture of an :class:`OTMap` (what ``config.json`` stores besides the fit summary)."""

    dim: int
    hidden: int = 512
    residual: bool = True

    def __post_init__(self):
        for name in ("dim", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OTMapConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"OTMapConfig.residual must be a bool, got {type(self.residual).__name__}")


class OTMap(nn.Module):
    """The learned transport map ``T: R^d → R^d`` applied to ``(n, d)`` (or ``(..., d)``) inputs.

    ``T(y) = mean_X + s · g((y − mean_Y)/s)`` with ``g(z) = z + MLP(z)`` (residual) or
    ``g(z) = MLP(z)``. The centring/scale buffers are set by :func:`fit_ot_map` and saved with
    the weights.
    """

    def __init__(self, config: OTMapConfig):
        super().__init__()
        self.config = config
        self.net = mlp(config.dim, config.hidden, config.dim)
        if config.residual:
            # Start at the identity (in standardised coordinates): the map only learns a correction.
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("source_mean", torch.zeros(config.dim))
        self.register_buffer("target_mean", torch.zeros(config.dim))
        self.register_buffer("scale", torch.ones(()))
        self.fit_summary: Dict[str, object] = {}

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward_standardized(self, z: torch.Tensor) -> torch.Tensor:
        """The map in standardised coordinates (what the NOT objective trains)."""
        out = self.net(z)
        return z + out if self.config.residual else out

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"OTMap input must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() < 1 or y.shape[-1] != self.dim:
            raise ValueError(f"OTMap input must have shape (..., {self.dim}), got {tuple(y.shape)}")
        if not y.is_floating_point():
            raise TypeError(f"OTMap input must be floating point, got {y.dtype}")
        dtype = y.dtype
        work = y.to(self.source_mean.dtype)
        z = (work - self.source_mean) / self.scale
        out = self.target_mean + self.scale * self.forward_standardized(z)
        return out.to(dtype)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: PathLike) -> Path:
        """Write ``ot_map.safetensors`` and ``config.json`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if bad:
            raise ValueError(f"OTMap.save: refusing to write {directory}: {', '.join(bad)} hold NaN or Inf "
                             "(the fit diverged or the embeddings overflow)")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
        meta = {"format_version": FORMAT_VERSION, "kind": "pisces_fast.OTMap", **asdict(self.config),
                "fit_summary": self.fit_summary}
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> "OTMap":
        """Load a map saved by :meth:`save` (safetensors + JSON; nothing is unpickled)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"OTMap.load: {path} not found (expected a directory written by OTMap.save)")
        try:
            meta = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"OTMap.load: {config_path} is not valid JSON ({exc})") from None
        if meta.get("kind") != "pisces_fast.OTMap":
            raise ValueError(f"OTMap.load: {config_path} does not describe an OTMap (kind={meta.get('kind')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"OTMap.load: unsupported format_version {meta.get('format_version')!r} (this version reads {FORMAT_VERSION})"
            )
        config = OTMapConfig(dim=meta["dim"], hidden=meta["hidden"], residual=meta["residual"])
        model = cls(config)
        state = load_file(str(weights_path), device=str(map_location))
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or resized:
            raise ValueError(
                f"OTMap.load: {weights_path} does not match config.json "
                f"(missing={missing}, unexpected={unexpected}, wrong shape={resized})"
            )
        model.load_state_dict(state)
        model.fit_summary = meta.get("fit_summary", {})
        return model.to(map_location)


class Potential(nn.Module):
    """The critic ``f_ω: X → R`` of Algorithm 2 (in standardised target coordinates)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = mlp(dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------
def _check_embeddings(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 samples of dimension >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or Inf values ({bad} of {x.shape[0]} rows)")
    return x


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _split(x: torch.Tensor, val_fraction: float, generator: torch.Generator):
    n = x.shape[0]
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training samples out of {n}")
    perm = torch.randperm(n, generator=generator)
    return x[perm[n_val:]], x[perm[:n_val]]


def _batch(x: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
    return x[idx.to(x.device)]


@torch.no_grad()
def _evaluate(ot_map: OTMap, potential: Potential, ys: torch.Tensor, xs: torch.Tensor) -> Dict[str, float]:
    """Held-out metrics, in embedding units.

    The networks work in standardised coordinates ``y = m_Y + s·z``, ``x = m_X + s·u``. There
    ``c(y, T(y)) = ‖Δm + s(z − g(z))‖²`` with ``Δm = m_Y − m_X``; at the optimum ``E g(z) = E u = 0``,
    so ``W2² = ‖Δm‖² + s²·W2²(standardised)``, which is how the dual estimate is reported.
    """
    gz = ot_map.forward_standardized(ys)
    s = float(ot_map.scale)
    delta = ot_map.source_mean - ot_map.target_mean
    # Embedding units in float64: squared distances of ~1e19-scale embeddings overflow float32.
    cost = ((delta.double() + s * (ys - gz).double()) ** 2).sum(-1)  # ‖y − T(y)‖² exactly
    dual_std = potential(xs).mean().double() + (((ys - gz) ** 2).sum(-1) - potential(gz)).mean().double()
    return {
        "val_cost": float(cost.mean()),  # transport cost of the map on held-out text embeddings
        "val_dual": float(delta.double().pow(2).sum() + s * s * dual_std),  # ≈ W2² once f is optimal (≈ val_cost)
        "val_mean_gap": float((gz.mean(0) - xs.mean(0)).norm()) * s,  # ‖mean T(Y) − mean X‖ (held-out)
    }


def fit_ot_map(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    steps: int = 10_000,
    batch_size: int = 256,
    inner_steps: int = 10,
    lr: float = 1e-4,
    hidden: int = 512,
    seed: int = 0,
    progress: bool = True,
    residual: bool = True,
    val_fraction: float = 0.1,
    log_every: int = 100,
    weight_decay: float = 0.0,
    device: Optional[Union[str, torch.device]] = None,
    checkpoint_dir: Optional[PathLike] = None,
    checkpoint_every: int = 1000,
) -> OTMap:
    """Fit a NOT map ``T: source → target`` (Algorithm 2) and return it in eval mode.

    Args:
        source: ``(n, d)`` samples of μ (text [CLS] embeddings). target: ``(m, d)`` samples of ν
            (real-video [CLS] embeddings). The sets are unpaired; n and m may differ.
        steps: outer iterations (one potential step each). inner_steps: K_T map steps per outer step.
        batch_size: samples per batch (drawn with replacement from the training split).
        lr: Adam learning rate for both networks (betas (0, 0.9), as in NOT's reference code,
            which keeps the adversarial game from oscillating).
        hidden: width of both 3-layer MLPs. residual: ``T(y) = y + MLP(y)`` (see module docstring).
        seed: seeds initialisation, the split and batch sampling (a fit is reproducible on CPU);
            the global torch RNG is left untouched.
        progress: show a tqdm bar with the held-out transport cost.
        val_fraction: fraction of each set held out for validation (0 disables it).
        log_every: evaluate the held-out split every this many outer steps; the history is in
            ``ot_map.fit_summary["history"]``.
        checkpoint_dir / checkpoint_every: if given, the full fit state (both networks, both
            optimizers, RNG, history) is written atomically every ``checkpoint_every`` steps and
            a fit with the same directory resumes from it.

    Returns:
        An :class:`OTMap` on ``device`` (default: the device of ``source``), in eval mode.
    """
    source = _check_embeddings("source", source)
    target = _check_embeddings("target", target)
    if source.shape[1] != target.shape[1]:
        raise ValueError(
            f"source and target must have the same embedding dim, got source {tuple(source.shape)} and target {tuple(target.shape)}"
        )
    steps = _check_int("steps", steps, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    inner_steps = _check_int("inner_steps", inner_steps, 1)
    hidden = _check_int("hidden", hidden, 1)
    log_every = _check_int("log_every", log_every, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(val_fraction, (int, float)) or not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    device = torch.device(device) if device is not None else source.device

    gen = torch.Generator().manual_seed(seed)
    work = torch.float64 if source.dtype == torch.float64 else torch.float32
    src = source.detach().to(device=device, dtype=work)
    tgt = target.detach().to(device=device, dtype=work)
    src_train, src_val = _split(src, val_fraction, gen)
    tgt_train, tgt_val = _split(tgt, val_fraction, gen)

    d = src.shape[1]
    # Seeded initialisation without touching the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ot_map = OTMap(OTMapConfig(dim=d, hidden=hidden, residual=residual))
        potential = Potential(d, hidden)
    ot_map = ot_map.to(device=device, dtype=work)
    potential = potential.to(device=device, dtype=work)
    with torch.no_grad():
        # One common scale for both spaces (see module docstring): the RMS distance to the mean.
        # In float64: the variance of embeddings of magnitude ~1e19 overflows float32 although the scale does not.
        var = 0.5 * (src_train.double().var(0, unbiased=False).sum() + tgt_train.double().var(0, unbiased=False).sum())
        ot_map.source_mean.copy_(src_train.double().mean(0))
        ot_map.target_mean.copy_(tgt_train.double().mean(0))
        ot_map.scale.copy_(var.clamp_min(1e-12).sqrt() / math.sqrt(d))
        if not all(bool(torch.isfinite(b).all()) for b in (ot_map.source_mean, ot_map.target_mean, ot_map.scale)):
            raise ValueError(f"source/target embeddings are too large for {str(work).replace('torch.', '')}: their mean or "
                             f"spread overflows (scale = {float(ot_map.scale):.3g}); rescale them (e.g. L2-normalise)")
    s = ot_map.scale
    ys_train = (src_train - ot_map.source_mean) / s
    xs_train = (tgt_train - ot_map.target_mean) / s
    ys_val = (src_val - ot_map.source_mean) / s if src_val.numel() else None
    xs_val = (tgt_val - ot_map.target_mean) / s if tgt_val.numel() else None

    opt_t = torch.optim.Adam(ot_map.net.parameters(), lr=lr, betas=(0.0, 0.9), weight_decay=weight_decay)
    opt_f = torch.optim.Adam(potential.parameters(), lr=lr, betas=(0.0, 0.9), weight_decay=weight_decay)
    history: List[Dict[str, float]] = []
    start_step = 0

    ckpt_path = Path(checkpoint_dir) / _CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("dim") != d or state.get("hidden") != hidden or state.get("residual") != residual:
            raise ValueError(f"{ckpt_path} was written for a different map (dim/hidden/residual); use another checkpoint_dir")
        ot_map.load_state_dict(state["map"])
        potential.load_state_dict(state["potential"])
        opt_t.load_state_dict(state["opt_t"])
        opt_f.load_state_dict(state["opt_f"])
        gen.set_state(state["generator"])
        history = [dict(zip(state["history_keys"], row.tolist())) for row in state["history"]]
        start_step = int(state["step"])

    def save_checkpoint(step: int) -> None:
        keys = ["step", "val_cost", "val_dual", "val_mean_gap", "train_loss_t", "train_loss_f"]
        rows = torch.tensor([[h.get(k, float("nan")) for k in keys] for h in history], dtype=torch.float64)
        state = {
            "dim": d, "hidden": hidden, "residual": residual, "step": step,
            "map": ot_map.state_dict(), "potential": potential.state_dict(),
            "opt_t": opt_t.state_dict(), "opt_f": opt_f.state_dict(),
            "generator": gen.get_state(),
            "history_keys": keys, "history": rows.reshape(-1, len(keys)),
        }
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(ckpt_path, lambda p: torch.save(state, p))

    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, steps), total=steps, initial=start_step, disable=not progress,
               desc="fit OT map", dynamic_ncols=True)
    t0 = time.perf_counter()
    loss_t = loss_f = torch.zeros((), device=device)
    ot_map.train()
    potential.train()
    for step in bar:
        # --- T optimisation: K_T steps on L_T = E[c(y, T(y)) − f(T(y))], f frozen -----------
        potential.requires_grad_(False)
        for _ in range(inner_steps):
            y = _batch(ys_train, batch_size, gen)
            ty = ot_map.forward_standardized(y)
            loss_t = (((ty - y) ** 2).sum(-1) - potential(ty)).mean()
            opt_t.zero_grad(set_to_none=True)
            loss_t.backward()
            opt_t.step()
        potential.requires_grad_(True)
        # --- f optimisation: L_f = E f(T(y)) − E f(x), T frozen --------------------------------
        y = _batch(ys_train, batch_size, gen)
        x = _batch(xs_train, batch_size, gen)
        with torch.no_grad():
            ty = ot_map.forward_standardized(y)
        loss_f = potential(ty).mean() - potential(x).mean()
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        opt_f.step()

        done = step + 1
        if done % log_every == 0 or done == steps:
            if not (torch.isfinite(loss_t) and torch.isfinite(loss_f)):
                raise FloatingPointError(
                    f"fit_ot_map diverged at step {done} (loss_T={float(loss_t)}, loss_f={float(loss_f)}); lower lr"
                )
            row = {"step": float(done), "train_loss_t": float(loss_t.detach()), "train_loss_f": float(loss_f.detach())}
            if ys_val is not None and xs_val is not None:
                ot_map.eval()
                potential.eval()
                row.update(_evaluate(ot_map, potential, ys_val, xs_val))
                ot_map.train()
                potential.train()
            history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("val_")})
        if ckpt_path is not None and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(done)
    bar.close()

    ot_map.eval()
    ot_map.fit_summary = {
        "steps": steps, "batch_size": batch_size, "inner_steps": inner_steps, "lr": lr, "seed": seed,
        "val_fraction": val_fraction, "n_source": int(source.shape[0]), "n_target": int(target.shape[0]),
        "seconds": round(time.perf_counter() - t0, 3), "history": history,
    }
    return ot_map.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Gaussian ground truth (for tests and the benchmark)
# ----------------------------------------------------------------------------------------------
def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def gaussian_ot_map(mean_s: torch.Tensor, cov_s: torch.Tensor, mean_t: torch.Tensor, cov_t: torch.Tensor):
    """The closed-form OT map between N(m_s, Σ_s) and N(m_t, Σ_t) for the quadratic cost.

    ``T*(y) = m_t + A (y − m_s)`` with ``A = Σ_s^{-1/2} (Σ_s^{1/2} Σ_t Σ_s^{1/2})^{1/2} Σ_s^{-1/2}``.
    Returns ``A`` and a callable applying ``T*``.
    """
    s_half = _sqrtm_psd(cov_s)
    s_half_inv = torch.linalg.inv(s_half)
    a = s_half_inv @ _sqrtm_psd(s_half @ cov_t @ s_half) @ s_half_inv

    def apply(y: torch.Tensor) -> torch.Tensor:
        return mean_t + (y - mean_s) @ a.T

    return a, apply


def l2_uvp(mapped: torch.Tensor, true_mapped: torch.Tensor, target_variance: float) -> float:
    """L2 unexplained variance percentage (Korotin et al., 2021): ``100·E‖T̂(y) − T*(y)‖² / Var(ν)``.

    ``target_variance`` is the total variance ``tr Σ_ν`` of the target distribution.
    """
    if mapped.shape != true_mapped.shape:
        raise ValueError(f"mapped and true_mapped must have the same shape, got {tuple(mapped.shape)} and {tuple(true_mapped.shape)}")
    if not target_variance > 0:
        raise ValueError(f"target_variance must be > 0, got {target_variance}")
    return 100.0 * float(((mapped - true_mapped) ** 2).sum(-1).mean()) / float(target_variance)


# ----------------------------------------------------------------------------------------------
# Tensor files and the command line
# ----------------------------------------------------------------------------------------------
def load_embeddings(path: PathLike, key: Optional[str] = None) -> torch.Tensor:
    """Read an ``(n, d)`` embedding tensor from ``.safetensors``, ``.pt``/``.pth``/``.bin`` or ``.npy``.

    ``.safetensors`` and ``.pt`` files may hold several tensors: pass ``key``, or the file must
    hold exactly one. ``.pt`` files are read with ``torch.load(weights_only=True)`` (no arbitrary
    unpickling); ``.npy`` with ``allow_pickle=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} not found")
    suffix = path.suffix.lower()
    def unreadable(exc: Exception) -> ValueError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ValueError(f"embedding file {path}: not a readable {suffix} file ({detail})")

    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - truncated / not safetensors
            raise unreadable(exc) from exc
    elif suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated / not a torch file / holds pickled objects
            raise unreadable(exc) from exc
        if isinstance(obj, torch.Tensor):
            tensors = {"": obj}
        elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            tensors = dict(obj)
        else:
            raise ValueError(f"{path} must contain a tensor or a dict of tensors, got {type(obj).__name__}")
    elif suffix == ".npy":
        import numpy as np

        try:
            tensors = {"": torch.from_numpy(np.load(path, allow_pickle=False))}
        except Exception as exc:  # noqa: BLE001 - truncated / object arrays / not .npy
            raise unreadable(exc) from exc
    else:
        raise ValueError(f"unsupported embedding file type {suffix!r} for {path}: use .safetensors, .pt/.pth/.bin or .npy")
    if key is not None:
        if key not in tensors:
            raise KeyError(f"{path} has no tensor {key!r}; it holds {sorted(tensors)}")
        tensor = tensors[key]
    elif len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path} holds several tensors {sorted(tensors)}; choose one with a key")
    return _check_embeddings(f"embeddings in {path}", tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor)


def add_fit_arguments(group, steps_flag: str = "--steps", batch_flag: str = "--batch-size") -> None:
    """The fit hyper-parameters of `fit_ot_map` as flags (dests: the keyword names of `fit_hyperparameters`), shared
    by this CLI and `pisces_fast.rewards.prepare` (which renames the two flags that clash with its own)."""
    group.add_argument(steps_flag, dest="fit_steps", type=int, default=10_000, help="optimisation steps (Algorithm 2)")
    group.add_argument(batch_flag, dest="fit_batch_size", type=int, default=256, help="pairs per step")
    group.add_argument("--inner-steps", type=int, default=10, help="map (inner) updates per potential update")
    group.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of map and potential")
    group.add_argument("--hidden", type=int, default=512, help="hidden width of the map's and the potential's MLPs")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and the validation split")
    group.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out to report the fit")
    group.add_argument("--log-every", type=int, default=100, help="steps between validation rows in the history")
    group.add_argument("--checkpoint-every", type=int, default=1000,
                       help="write a resumable fit state every N steps (a rerun resumes)")


def fit_hyperparameters(args: argparse.Namespace) -> dict:
    """`fit_ot_map` keyword arguments from flags added by `add_fit_arguments`."""
    return dict(steps=args.fit_steps, batch_size=args.fit_batch_size, inner_steps=args.inner_steps, lr=args.lr,
                hidden=args.hidden, seed=args.seed, val_fraction=args.val_fraction, log_every=args.log_every,
                checkpoint_every=args.checkpoint_every)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pisces_fast.rewards.ot_map", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a NOT map from source (text) to target (video) embeddings")
    fit.add_argument("--source", required=True, help="(n, d) text embeddings: .safetensors, .pt/.pth/.bin or .npy")
    fit.add_argument("--target", required=True, help="(m, d) real-video embeddings, same formats")
    fit.add_argument("--source-key", default=None, help="tensor name inside --source if it holds several")
    fit.add_argument("--target-key", default=None, help="tensor name inside --target if it holds several")
    fit.add_argument("--out", required=True, help="output directory (ot_map.safetensors + config.json)")
    add_fit_arguments(fit)
    fit.add_argument("--no-residual", action="store_true", help="plain MLP map instead of y + MLP(y)")
    fit.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    fit.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        source = load_embeddings(args.source, args.source_key)
        target = load_embeddings(args.target, args.target_key)
        if source.shape[1] != target.shape[1]:
            raise ValueError(f"--source has {source.shape[1]}-d embeddings but --target has {target.shape[1]}-d")
        ot_map = fit_ot_map(
            source, target, **fit_hyperparameters(args), progress=not args.no_progress,
            residual=not args.no_residual, device=args.device, checkpoint_dir=args.out,
        )
        out = ot_map.save(args.out)
    except (FileNotFoundError, ValueError, KeyError, FloatingPointError) as exc:
        # One line naming the file or flag (fit_ot_map's argument names are the flags with '_' for '-').
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        parser.exit(2, f"{parser.prog} {args.command}: error: {' '.join(message.split())}\n")
    last = ot_map.fit_summary["history"][-1] if ot_map.fit_summary["history"] else {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
    print(f"saved OT map ({source.shape[0]} → {target.shape[0]} samples, d={source.shape[1]}) to {out}; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
