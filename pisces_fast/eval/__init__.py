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

from .alignment import (  # noqa: E402  (alignment metrics and the Table-5 baseline maps)
    MAPPING_METHODS,
    alignment_rows,
    fit_alignment_map,
    mutual_knn,
    spearman_structure,
    synthetic_paired_embeddings,
    vtm_accuracy,
)
