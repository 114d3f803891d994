"""Reward backbones: video-text models with fusion cross-attention and a matching head."""
from .base import SoftmaxAttention, TextFeatures, VideoFeatures, VideoTextBackbone
from .blip import BlipVideoBackbone, tiny_blip_config
from .internvideo2 import InternVideo2, InternVideo2Backbone, InternVideo2Config
from .internvideo2_checkpoint import convert_official_state_dict, load_official_checkpoint, read_checkpoint

__all__ = [
    "BlipVideoBackbone",
    "InternVideo2",
    "InternVideo2Backbone",
    "InternVideo2Config",
    "SoftmaxAttention",
    "TextFeatures",
    "VideoFeatures",
    "VideoTextBackbone",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "read_checkpoint",
    "tiny_blip_config",
]
