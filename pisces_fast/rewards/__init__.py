"""OT-aligned rewards: the neural OT map, the quality and semantic rewards, backbones, fusion."""
from .ablations import mismatched_indices, table8_variants, vtm_probabilities
from .backbones import (
    BlipVideoBackbone,
    InternVideo2,
    InternVideo2Backbone,
    InternVideo2Config,
    SoftmaxAttention,
    TextFeatures,
    VideoFeatures,
    VideoTextBackbone,
    load_official_checkpoint,
    tiny_blip_config,
)
from .build import BackboneSpec, PiscesRewardSpec, build_backbone, build_pisces_rewards
from .diagnostics import gradient_cosine, reward_diagnostics
from .fusion import FUSION_MODES, fuse_rewards, group_ids_from_prompts, group_normalize, grpo_advantages
from .patching import CrossAttentionPatch, POTConfig, patch_cross_attention
from .pisces_rewards import PiscesRewards
from .quality import collect_embeddings, quality_reward
from .semantic import semantic_reward
from .tokenizer import build_word_tokenizer

# The OT-map names are loaded on first use, not here: ``python -m pisces_fast.rewards.ot_map`` runs
# that module as __main__, and importing it from the package first would make runpy warn.
_OT_MAP_NAMES = ("OTMap", "OTMapConfig", "fit_ot_map", "gaussian_ot_map", "l2_uvp", "load_embeddings")


def __getattr__(name):
    if name in _OT_MAP_NAMES:
        from . import ot_map

        return getattr(ot_map, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BackboneSpec",
    "BlipVideoBackbone",
    "CrossAttentionPatch",
    "FUSION_MODES",
    "InternVideo2",
    "InternVideo2Backbone",
    "InternVideo2Config",
    "OTMap",
    "OTMapConfig",
    "POTConfig",
    "PiscesRewardSpec",
    "PiscesRewards",
    "SoftmaxAttention",
    "TextFeatures",
    "VideoFeatures",
    "VideoTextBackbone",
    "build_backbone",
    "build_pisces_rewards",
    "build_word_tokenizer",
    "collect_embeddings",
    "fit_ot_map",
    "fuse_rewards",
    "gaussian_ot_map",
    "gradient_cosine",
    "group_ids_from_prompts",
    "group_normalize",
    "grpo_advantages",
    "l2_uvp",
    "load_embeddings",
    "load_official_checkpoint",
    "mismatched_indices",
    "patch_cross_attention",
    "quality_reward",
    "reward_diagnostics",
    "semantic_reward",
    "table8_variants",
    "tiny_blip_config",
    "vtm_probabilities",
]
