"""Swap a backbone's fusion cross-attention core for the partial-OT attention, and restore it.

PISCES §3.2 / Appendix C: in every fusion layer and every head, ``softmax(q kᵀ)·v`` becomes
``Ã·v`` with ``Ã ∝ (A + ε)(P* + ε)``, ``P*`` the partial-OT plan of the spatio-temporal cost.
:func:`pisces_fast.ops.ot_attention` computes exactly that; this module installs it.

    with patch_cross_attention(backbone, POTConfig(mass=0.9)):
        prob = backbone.match_probability(text, video)     # OT-fused attention
    # here the backbone is back to its own attention cores (the very same objects)

``POTConfig(enabled=False)`` installs plain softmax attention with the same masking (the
"PISCES w/o OT" ablation and a check that patching itself changes nothing).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional

from torch import nn

from ..ops import DEFAULT_MAX_ITER, DEFAULT_TOL, OTAttention


@dataclass(frozen=True)
class POTConfig:
    """Hyper-parameters of the token-level partial OT (paper defaults: γ = η = 0.2, ε = 0.05, m = 0.9).

    Attributes:
        enabled: False installs vanilla softmax attention instead (ablation).
        gamma, eta: weights of the temporal and spatial cost terms (0 disables a term).
        eps: entropic temperature of the Sinkhorn solver. mass: transported fraction m ∈ (0, 1]
            (m ≥ 0.999 is balanced, "full" OT).
        max_iter, tol: Sinkhorn stopping rule. fuse_eps: the ε of the log-space fusion (Eq. 3).
        backend: "auto" | "reference" | "cpp" | "triton" (see :mod:`pisces_fast.ops`).
    """

    enabled: bool = True
    gamma: float = 0.2
    eta: float = 0.2
    eps: float = 0.05
    mass: float = 0.9
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    fuse_eps: float = 1e-8
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise TypeError(f"POTConfig.enabled must be a bool, got {type(self.enabled).__name__}")
        for name in ("gamma", "eta", "eps", "mass", "tol", "fuse_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"POTConfig.{name} must be a finite number, got {value!r}")
        if self.gamma < 0 or self.eta < 0 or self.tol < 0:
            raise ValueError("POTConfig.gamma, eta and tol must be >= 0")
        if self.eps <= 0 or self.fuse_eps <= 0:
            raise ValueError("POTConfig.eps and fuse_eps must be > 0")
        if not (0 < self.mass <= 1):
            raise ValueError(f"POTConfig.mass must be in (0, 1], got {self.mass}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"POTConfig.max_iter must be an int >= 1, got {self.max_iter!r}")
        if not isinstance(self.backend, str):
            raise TypeError("POTConfig.backend must be a str")

    def make_core(self) -> OTAttention:
        kwargs = asdict(self)
        return OTAttention(**kwargs)


class CrossAttentionPatch:
    """Installs one OT core per fusion cross-attention module; :meth:`restore` puts the old ones back.

    Usable once as a context manager (``with patch_cross_attention(...)``) or manually
    (``patch = patch_cross_attention(...); ...; patch.restore()``). Patches nest; they must be
    restored in reverse order (restoring out of order raises instead of corrupting the model).
    """

    def __init__(self, backbone, config: Optional[POTConfig] = None):
        if config is None:
            config = POTConfig()
        if not isinstance(config, POTConfig):
            raise TypeError(f"config must be a POTConfig, got {type(config).__name__}")
        get_sites = getattr(backbone, "fusion_cross_attentions", None)
        if get_sites is None:
            raise TypeError(f"{type(backbone).__name__} has no fusion_cross_attentions(); it is not a VideoTextBackbone")
        sites = list(get_sites())
        if not sites:
            raise ValueError(f"{type(backbone).__name__} reports no fusion cross-attention modules to patch")
        for i, site in enumerate(sites):
            if not isinstance(getattr(site, "core", None), nn.Module):
                raise TypeError(f"fusion cross-attention {i} ({type(site).__name__}) has no swappable `core` module")
        self.backbone = backbone
        self.config = config
        self.sites: List[nn.Module] = sites
        self._saved: Optional[List[nn.Module]] = None
        self._installed: Optional[List[nn.Module]] = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def apply(self) -> "CrossAttentionPatch":
        if self.active:
            raise RuntimeError("this patch is already applied")
        self._saved = [site.core for site in self.sites]
        # One core per site (per layer): they hold no parameters, so this costs nothing, and a
        # site's core can later be inspected or changed on its own.
        self._installed = []
        for site, old in zip(self.sites, self._saved):
            core = self.config.make_core()
            core.train(old.training)
            site.core = core
            self._installed.append(core)
        return self

    def restore(self) -> None:
        if not self.active:
            raise RuntimeError("this patch is not applied (already restored?)")
        for i, (site, mine) in enumerate(zip(self.sites, self._installed)):
            if site.core is not mine:
                raise RuntimeError(
                    f"fusion cross-attention {i} was re-patched after this patch was applied; restore the later patch first"
                )
        for site, old in zip(self.sites, self._saved):
            site.core = old
        self._saved = self._installed = None

    def __enter__(self) -> "CrossAttentionPatch":
        if not self.active:
            self.apply()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.restore()


def patch_cross_attention(backbone, config: Optional[POTConfig] = None, **overrides) -> CrossAttentionPatch:
    """Patch ``backbone``'s fusion cross-attention with partial-OT attention; returns the applied patch.

    ``overrides`` are :class:`POTConfig` fields (``patch_cross_attention(bb, mass=1.0)``).
    Use as a context manager, or call ``.restore()``.
    """
    if overrides:
        base = asdict(config) if config is not None else {}
        base.update(overrides)
        config = POTConfig(**base)
    return CrossAttentionPatch(backbone, config).apply()
