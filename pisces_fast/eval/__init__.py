"""Evaluation: alignment metrics and the rule-based video analyzer (a leaf package)."""

from .analyzer import (  # noqa: E402  (the shapes-world analyzer: a small rule-based VBench)
    DIMENSIONS,
    QUALITY_DIMENSIONS,
    SEMANTIC_DIMENSIONS,
    AnalyzerConfig,
    Detections,
    ShapesAnalyzer,
    analyze,
    combine_scores,
)
