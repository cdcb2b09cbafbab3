"""The main job end to end on the tiny config, with every path a file:// URI."""
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from cvae.config import load_config
from cvae.data.reader import load_split
from cvae.pipeline import STAGES, run_pipeline
from cvae.serve.engine import read_output

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_through_uris_writes_every_stage_and_composition_is_exact(ray_session, tmp_path, caplog):
    config = load_config(REPO / "configs" / "tiny.yaml",
                         {"train.epochs": 1, "pipeline.num_queries": 60})
    out = tmp_path / "run"
    summary = run_pipeline(config, out.as_uri())

    for name in ("data/manifest.json", "train/metrics.json", "train/loss_curve.png",
                 "train/reconstructions.png", "queries/_summary.json", "answers/_SUCCESS.json",
                 "eval/report.json", "eval/report.md", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["files"]["report"] == f"{out.as_uri()}/eval/report.json"
    figures = summary["files"]["report figures"]  # every figure the evaluation wrote, and only those
    assert figures and figures == json.loads((out / "summary.json").read_text())["files"]["report figures"]
    assert sorted(figures) == sorted(p.as_uri() for p in (out / "eval" / "figures").glob("*.png"))

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

    # A rerun reuses every finished stage whose inputs did not change, saying so, and
    # starts no training.
    caplog.set_level(logging.INFO, logger="cvae")
    caplog.clear()
    first_epochs = json.loads((out / "train" / "metrics.json").read_text())
    again = run_pipeline(config, out.as_uri())
    said, _ = caplog.text, caplog.clear()
    for stage in STAGES:
        assert f"reusing {stage} in " in said, stage
    assert again["stage_seconds"]["2/5 train"] < 5 and sum(again["stage_seconds"].values()) < 20
    assert again["overall"] == summary["overall"] and again["files"] == summary["files"]

    # --force redoes one stage; the answers come out the same, so evaluation is reused.
    answered = (out / "answers" / "_SUCCESS.json").stat().st_mtime
    run_pipeline(config, out.as_uri(), force=["answers"])
    said, _ = caplog.text, caplog.clear()
    assert "redoing answers (--force answers)" in said and "reusing evaluate in " in said
    assert (out / "answers" / "_SUCCESS.json").stat().st_mtime > answered

    # A changed input redoes what depends on it: more queries -> queries, answers and
    # evaluation again; one more epoch continues the finished training (epoch 1 is kept).
    more = load_config(REPO / "configs" / "tiny.yaml", {"train.epochs": 2, "pipeline.num_queries": 72})
    longer = run_pipeline(more, out.as_uri())
    said = caplog.text
    assert "reusing data in " in said and "training from scratch" not in said
    assert not any(f"reusing {stage} in " in said for stage in ("train", "queries", "answers", "evaluate"))
    epochs = json.loads((out / "train" / "metrics.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[0] == first_epochs[0]  # continued, not redone
    assert longer["answers"]["result_rows"] > summary["answers"]["result_rows"]


def test_force_rejects_unknown_stages():
    import pytest

    with pytest.raises(ValueError, match="unknown stage"):
        run_pipeline(load_config(REPO / "configs" / "tiny.yaml"), "/tmp/never-written", force=["trian"])
