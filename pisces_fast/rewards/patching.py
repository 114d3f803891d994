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

from dataclasses import dataclass, replace
from typing import List, Optional

from torch import nn

from ..ops import OTAttention, OTConfig
from ..ops.backends import BACKENDS


@dataclass(frozen=True)
class POTConfig(OTConfig):
    """:class:`pisces_fast.ops.OTConfig` (the OT hyper-parameters, declared and validated there) plus
    the two switches of the patch itself.

    Attributes:
        enabled: False installs vanilla softmax attention instead (ablation).
        backend: "auto" | "reference" | "cpp" | "triton" (see :mod:`pisces_fast.ops`).
        (inherited) eps, mass, max_iter, tol, gamma, eta, fuse_eps, domain, kernel_dtype,
        check_inputs: see :class:`~pisces_fast.ops.OTConfig` (paper defaults γ = η = 0.2, ε = 0.05,
        m = 0.9).
    """

    enabled: bool = True
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.enabled, bool):
            raise TypeError(f"POTConfig.enabled must be a bool, got {type(self.enabled).__name__}")
        if not isinstance(self.backend, str) or self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"POTConfig.backend must be one of {('auto',) + BACKENDS}, got {self.backend!r}")

    def make_core(self) -> OTAttention:
        return OTAttention(self, backend=self.backend, enabled=self.enabled)


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
        config = replace(config if config is not None else POTConfig(), **overrides)
    return CrossAttentionPatch(backbone, config).apply()
