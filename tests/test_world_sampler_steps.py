"""benchmarks/world_sampler_steps.py, reduced: the shipped teacher over two sampler rows, with subject consistency
split into the analyzer's diagnostics (per clip, its raw value = objects found x similarity where found)."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

world_sampler_steps = pytest.importorskip("world_sampler_steps")


def test_sweep_writes_scores_and_subject_diagnostics(tmp_path):
    results = world_sampler_steps.main(["--steps", "1", "4", "--ddim", "--prompts", "3", "--seeds", "0",
                                        "--threads", "1", "--out", str(tmp_path)])
    assert [r["label"] for r in results] == ["consistency 1 steps, CFG 1", "consistency 4 steps, CFG 1"]
    for r in results:
        d = r["diagnostics"]
        assert set(d) == {"subject_consistency_raw", "subject_presence", "subject_similarity"}
        assert 0.0 <= d["subject_presence"] <= 1.0 and 0.0 <= d["subject_similarity"] <= 1.0
        # raw = the mean over clips of presence x similarity (0 for a clip with no tracked object), so at most either
        assert d["subject_consistency_raw"] <= min(d["subject_presence"], d["subject_similarity"]) + 1e-9
    saved = json.loads((tmp_path / "world_sampler_steps.json").read_text())
    assert saved["rows"][1]["diagnostics"] == results[1]["diagnostics"]
    table = (tmp_path / "world_sampler_steps.md").read_text()
    assert "objects found (presence)" in table and "consistency 4 steps, CFG 1" in table
