"""A model's grid is part of its contract: the classes it was trained on are recorded, every
path that takes queries refuses the others per row with the factor and value named (never an
image drawn from an untrained class code), and bulk sets stay on the grid."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cvae import CausalModel
from cvae.causal.image import ImageSCM
from cvae.config import ConfigError, config_from_dict
from cvae.data.grid import FACTORS, OFF_GRID, ModelGrid, classes_to_index, index_to_classes
from cvae.model.checkpoint import load_meta, model_grid
from cvae.serve.engine import read_output, run_query_job
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import QUERY_SCHEMA, answer_queries
from jobs import make_queries as make_queries_job
from scm_fixtures import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STRIDES = {"orientation": 8, "pos_x": 2, "pos_y": 2}  # configs/local.yaml's grid
ON = int(classes_to_index(np.array([[0, 1, 8, 4, 6]]))[0])  # orientation 8, pos 4 / 6: on it
OFF = int(classes_to_index(np.array([[0, 1, 13, 4, 6]]))[0])  # orientation 13: off it


@pytest.fixture(scope="module")
def strided(tmp_path_factory):
    """A checkpoint trained on the strided grid, as one from before the declaration (its
    grid comes from the manifest's strides)."""
    return make_checkpoint(tmp_path_factory.mktemp("strided"), strides=STRIDES)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("whole"))


def rows(*dicts) -> pa.Table:
    return pa.Table.from_pylist([{n: d.get(n) for n in QUERY_SCHEMA.names} for d in dicts], schema=QUERY_SCHEMA)


ASKED = [
    {"query_id": "on", "kind": "counterfactual", "source_index": ON, "do_shape": 2},
    {"query_id": "off-source", "kind": "counterfactual", "source_index": OFF, "do_shape": 2},
    {"query_id": "off-do", "kind": "counterfactual", "source_index": ON, "do_orientation": 13},
    {"query_id": "off-intervene", "kind": "intervene", "do_pos_y": 5},
    {"query_id": "off-given", "kind": "condition", "given_pos_x": 3},
    {"query_id": "on-given", "kind": "condition", "given_pos_x": 4, "num_samples": 16},
]
EXPECTED_ERRORS = {
    "off-source": f"source_index {OFF}: orientation=13 {OFF_GRID} (trained on orientation 0, 8, 16, 24, 32",
    "off-do": f"do_orientation=13 {OFF_GRID} (trained on orientation 0, 8, 16, 24, 32 of 0..39: "
              "data.strides.orientation: 8); ask for one of those, or use a model of the whole grid",
    "off-intervene": f"do_pos_y=5 {OFF_GRID} (trained on pos_y 0, 2, 4, ..., 30 (every 2nd)",
    "off-given": f"given_pos_x=3 {OFF_GRID} (trained on pos_x 0, 2, 4, ..., 30 (every 2nd)",
}


def test_the_grid_comes_from_the_training_split():
    manifest = {"generator": "render", "grid": {"strides": STRIDES}, "holdout": []}
    grid = ModelGrid.of_manifest(manifest)
    assert grid.classes["orientation"].tolist() == [0, 8, 16, 24, 32]
    assert grid.classes["pos_x"].tolist() == list(range(0, 32, 2)) and grid.is_whole("shape")
    assert grid.size() == 23_040 and len(grid.indices()) == 23_040
    assert grid.contains_rows(index_to_classes(grid.indices(), with_color=False)).all()
    assert not grid.contains_rows(index_to_classes(np.array([OFF]), with_color=False))[0]
    # A held-out rule that removes a class entirely takes it off the grid; one that removes
    # only combinations (every class still trained on) does not.
    held = ModelGrid.of_manifest({**manifest, "holdout": [{"pos_x": [28, 30]}]})
    assert 28 not in held.classes["pos_x"] and held.why["pos_x"] == "data.strides.pos_x: 2 and data.holdout"
    combos = ModelGrid.of_manifest({**manifest, "holdout": [{"shape": [2], "scale": [5], "pos_x": [28]}]})
    assert combos == grid
    # The writer's count of the training split wins over what strides say.
    counted = {**manifest, "train_classes": {**{f: list(range(s)) for f, s in zip(FACTORS, (3, 6, 40, 32, 32))},
                                             "scale": [0, 1, 2]}}
    assert ModelGrid.of_manifest(counted).classes["scale"].tolist() == [0, 1, 2]
    assert ModelGrid.of_manifest({"generator": "render", "grid": {"strides": {}}}).is_whole()
    assert ModelGrid.from_dict(grid.to_dict()) == grid


def test_the_writer_records_the_training_classes(tmp_path):
    from cvae.data.shards import write_dataset

    config = config_from_dict({"data": {"strides": {"orientation": 20, "scale": 3, "pos_x": 16, "pos_y": 16},
                                        "num_shards": 2, "test_fraction": 0.2, "validation_fraction": 0.0,
                                        "holdout": [{"shape": [2], "pos_x": [16]}]}})
    manifest = write_dataset(config, tmp_path)
    assert manifest["train_classes"]["orientation"] == [0, 20]
    assert manifest["train_classes"]["scale"] == [0, 3]
    assert ModelGrid.of_manifest(manifest).why["orientation"] == "data.strides.orientation: 20"


def test_off_grid_rows_are_refused_with_the_factor_named(strided, whole):
    scm = ImageSCM.from_checkpoint(strided, device="cpu")
    results, errors = answer_queries(scm, rows(*ASKED))
    assert sorted(set(results.column("query_id").to_pylist())) == ["on", "on-given"]
    got = dict(zip(errors.column("query_id").to_pylist(), errors.column("error").to_pylist()))
    assert set(got) == set(EXPECTED_ERRORS)
    for qid, text in EXPECTED_ERRORS.items():
        assert text in got[qid], (qid, got[qid])
    # What it draws unasked (conditioning samples the other factors) stays on its grid too.
    drawn = np.stack([results.column(f).to_numpy() for f in FACTORS], axis=1)
    assert scm.grid.contains_rows(drawn).all()
    # The same rows to a model of the whole grid: every one answered.
    results, errors = answer_queries(ImageSCM.from_checkpoint(whole, device="cpu"), rows(*ASKED))
    assert errors.num_rows == 0 and set(results.column("query_id").to_pylist()) == {q["query_id"] for q in ASKED}


def test_a_declared_grid_is_what_counts(tmp_path):
    """A checkpoint's own declaration ("grid" in checkpoint.json) wins over its data's strides:
    that is how a model measured to answer more classes says so."""
    declared = ModelGrid.whole().to_dict()
    checkpoint = make_checkpoint(tmp_path / "declared", strides=STRIDES, grid=declared)
    assert model_grid(load_meta(checkpoint)).is_whole()
    results, errors = answer_queries(ImageSCM.from_checkpoint(checkpoint, device="cpu"), rows(*ASKED))
    assert errors.num_rows == 0
    narrower = make_checkpoint(tmp_path / "narrow", grid={"classes": {"shape": [0, 1]}, "why": {"shape": "measured"}})
    _, errors = answer_queries(ImageSCM.from_checkpoint(narrower, device="cpu"),
                               rows({"query_id": "h", "kind": "intervene", "do_shape": 2}))
    assert f"do_shape=2 {OFF_GRID} (trained on shape 0, 1 of 0..2: measured)" in errors.column("error")[0].as_py()


def test_a_grid_widened_by_coverage_widens_the_scm(tmp_path):
    """A model trained on a strided grid whose coverage declares the whole grid answers
    counterfactuals of every source on it. Its trainer used to save the factor SCM limited
    to the training grid, which gave the other classes no mass: the quickstart's model
    refused 3,984 of 4,096 sources drawn from the whole grid. Such a checkpoint's SCM is
    read back whole; an SCM the trainer did not make that way is kept, and names what it
    refuses."""
    from cvae.model.factors import FactorSCM

    old = make_checkpoint(tmp_path / "old", FactorSCM.uniform().on_grid(STRIDES), strides=STRIDES,
                          grid=ModelGrid.whole().to_dict())
    scm = ImageSCM.from_checkpoint(old, device="cpu")
    assert np.allclose(scm.factors.tables["orientation"], 1 / 40)
    results, errors = answer_queries(scm, rows(*ASKED))
    assert errors.num_rows == 0, errors.to_pylist()
    sampled = results.filter(pa.compute.equal(results.column("query_id"), "on-given"))
    assert (sampled.column("orientation").to_numpy() % 8 != 0).any()  # unseen classes drawn too
    # An SCM of its own (here: every 4th orientation) is the checkpoint's word: kept.
    own = make_checkpoint(tmp_path / "own", FactorSCM.uniform().on_grid({"orientation": 4}), strides=STRIDES,
                          grid=ModelGrid.whole().to_dict())
    _, errors = answer_queries(ImageSCM.from_checkpoint(own, device="cpu"), rows(ASKED[1]))
    assert errors.column("error")[0].as_py() == (
        "the factual factors have probability zero under the SCM: orientation=13 (the SCM gives orientation "
        "mass only on 0, 4, 8, ..., 36 (every 4th) of 0..39)")


def test_the_api_says_what_a_model_knows(strided):
    m = CausalModel.load(strided, say=lambda line: None)
    assert m.grid.classes["orientation"].tolist() == [0, 8, 16, 24, 32]
    assert "orientation 0, 8, 16, 24, 32" in repr(m.grid)
    factors = {"shape": "square", "scale": 1, "orientation": 8, "pos_x": 4, "pos_y": 6}
    assert m.source_index(factors) == ON and m.factors(ON) == {**factors, "shape": 0}
    assert ON in m.grid.indices() and OFF not in m.grid.indices()
    assert m.counterfactual(source_index=ON, do={"shape": "heart"}).shape == (64, 64)
    with pytest.raises(ValueError, match=rf"do_orientation=13 {OFF_GRID} \(trained on orientation 0, 8, 16"):
        m.intervene(do={"orientation": 13})
    with pytest.raises(ValueError, match=rf"source_index {OFF}: orientation=13 {OFF_GRID}"):
        m.counterfactual(source_index=OFF, do={"shape": 1})
    with pytest.raises(ValueError, match="missing pos_y"):
        m.source_index({"shape": 0, "scale": 1, "orientation": 8, "pos_x": 4})


def test_the_query_job_counts_rows_refused_off_the_grid(ray_session, strided, tmp_path):
    pq.write_table(rows(*ASKED), tmp_path / "q.parquet")
    summary = run_query_job(strided, tmp_path / "q.parquet", tmp_path / "out", actors=1, batch_size=8)
    assert summary["off_grid_rows"] == 4 and summary["error_rows"] == 4
    results, errors = read_output(tmp_path / "out")
    assert OFF_GRID in errors.column("error")[0].as_py()
    assert set(results.column("query_id").to_pylist()) == {"on", "on-given"}


def test_bulk_sets_stay_on_the_models_grid(strided, tmp_path):
    grid = model_grid(load_meta(strided))
    spec = {"sources": {"indices": [ON, OFF, 0]}, "interventions": [
        {"factor": "orientation", "values": "other"}, {"factor": "pos_x", "values": [3, 4]},
        {"do": {"shape": 1, "pos_y": 7}}, {"factor": "scale", "values": "random_other"}]}
    summary = make_queries(spec, tmp_path / "q", grid=grid)
    table = pads.dataset(str(tmp_path / "q"), format="parquet").to_table()
    assert summary["skipped_off_grid"] == {"sources": 1, "queries": 4}  # OFF; pos_x=3 and the joint do, twice
    assert sorted(set(table.column("source_index").to_pylist())) == sorted([ON, 0])
    do = np.stack([table[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)
    assert grid.contains_rows(np.maximum(do, 0)).all()
    assert sorted(set(do[:, 2][do[:, 2] >= 0].tolist())) == [0, 8, 16, 24, 32]
    # Every row is answered, none refused.
    _, errors = answer_queries(ImageSCM.from_checkpoint(strided, device="cpu"), table)
    assert errors.num_rows == 0
    # The job, given the checkpoint, says what it skipped.
    (tmp_path / "spec.yaml").write_text(
        "sources: {grid: true, sample: 50}\ninterventions: [{factor: orientation, values: random_other}]\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.make_queries", "--spec", str(tmp_path / "spec.yaml"),
                           "--checkpoint", strided, "--out", str(tmp_path / "job")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "on the model's grid" in proc.stdout and "skipped 714,240 sources" in proc.stdout
    assert make_queries_job.main(["--spec", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "all")]) == 0


def test_a_family_off_the_data_grid_is_a_config_error():
    with pytest.raises(ConfigError, match=r"families\[0\]\.value: orientation=3 is not on the data's grid"):
        config_from_dict({"data": {"strides": {"orientation": 4}},
                          "pipeline": {"families": [{"target": "shape", "factor": "orientation", "value": 3}]}})
