"""Data: video-text datasets and the procedural shapes world (a leaf package)."""

from .shapes import (  # noqa: E402  (the procedural shapes world)
    VOCAB,
    ObjectSpec,
    RelationSpec,
    SceneSpec,
    ShapesDataset,
    WorldConfig,
    caption_of,
    hard_negatives,
    make_clips,
    parse_prompt,
    sample_specs,
)
