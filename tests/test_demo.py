"""`make demo`'s summary table: results only, counts as integers, the run's settings left out."""

import json

from medsight.demo import metrics_table


def test_metrics_table_lists_results_not_settings(tmp_path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "metrics.json").write_text(json.dumps({"val/dice": 0.84781, "wall_time_s": 70.9}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({
        "run": {"export": "x", "seed": 0, "batch_size": 8, "wall_time_s": 12.5},
        "diagseg": {"diagnosis_recall": 0.9167, "n": 72, "per_modality": {"CT": {"n": 18}}},
    }))
    rows = metrics_table(tmp_path).splitlines()
    assert "| stage1 | val/dice | 0.848 |" in rows
    assert "| eval | run/wall_time_s | 12.500 |" in rows
    assert "| eval | diagseg/diagnosis_recall | 0.917 |" in rows
    assert "| eval | diagseg/n | 72 |" in rows
    assert not any("run/seed" in r or "run/batch_size" in r for r in rows)
