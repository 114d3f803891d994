"""pisces_fast: kernel-accelerated OT-aligned rewards for text-to-video post-training (PISCES).

The top level re-exports the op family and `load_lora` (a trained LoRA into a stock diffusers pipeline; it imports
peft/diffusers only when called); rewards, training, eval and data are imported from their subpackages (they pull
in transformers/diffusers, which a kernel user should not have to load).
"""
from .ops import (
    OTAttention,
    OTConfig,
    available_backends,
    backend_report,
    fuse_attention,
    ot_attention,
    sinkhorn_unbalanced,
    spatiotemporal_cost,
    video_token_positions,
)

from .training.lora import load_lora  # LoRA (+ a student's w projection) into a stock diffusers pipeline

__version__ = "0.1.0"

__all__ = [
    "OTAttention",
    "OTConfig",
    "available_backends",
    "backend_report",
    "fuse_attention",
    "load_lora",
    "ot_attention",
    "sinkhorn_unbalanced",
    "spatiotemporal_cost",
    "video_token_positions",
]
