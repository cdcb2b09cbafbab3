"""The main job end to end on the tiny config, with every path a file:// URI."""
import json
from pathlib import Path

import pyarrow.parquet as pq

from cvae.config import load_config
from cvae.engine import read_output
from cvae.pipeline import run_pipeline
from cvae.reader import load_split

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_through_uris_writes_every_stage_and_composition_is_exact(ray_session, tmp_path):
    config = load_config(REPO / "configs" / "tiny.yaml",
                         {"train.epochs": 1, "pipeline.num_queries": 60})
    out = tmp_path / "run"
    summary = run_pipeline(config, out.as_uri())

    for name in ("data/manifest.json", "train/metrics.json", "train/loss_curve.png",
                 "train/reconstructions.png", "queries/_summary.json", "answers/_SUCCESS.json",
                 "eval/report.json", "eval/report.md", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["files"]["report"] == f"{out.as_uri()}/eval/report.json"

    results, errors = read_output(out / "answers")
    queries = json.loads((out / "queries" / "_summary.json").read_text())
    assert errors.num_rows == 0 and results.num_rows == queries["num_queries"]
    assert summary["answers"]["result_rows"] == results.num_rows and summary["answers"]["error_rows"] == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["rows"] == results.num_rows
    assert report["overall"]["count"] + report["null"]["overall"]["count"] == results.num_rows
    # the null interventions the pipeline adds return the factual image exactly
    composition = report["composition"]["null_intervention"]
    assert composition["count"] > 0 and composition["exact"] == 1.0
    assert set(report["composition"]["model"]["iou"]) == {"1", "5", "10"}
    # the summary carries the evaluation's headline and its controls
    assert summary["overall"] == report["overall"] and summary["composition"] == report["composition"]
    assert summary["controls"]["blank"]["effectiveness"] <= 0.05 and summary["headline"]
    # The best checkpoint was chosen on validation; the queries come from the test split only.
    assert summary["best epoch"]["best_by"] == "validation_loss"
    assert summary["best epoch"]["validation_loss"] is not None
    sources = set(pq.read_table(out / "queries").column("source_index").to_pylist())
    assert sources <= set(load_split(out / "data", "test")["index"].tolist())

    # A rerun reuses the dataset and the finished training.
    again = run_pipeline(config, out.as_uri())
    assert again["stage_seconds"]["1/5 data"] < 5
