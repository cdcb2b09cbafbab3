"""Verified rows (jobs.query --verify / --keep verified) and the output folder's dataset card.

The readout is the real one over the whole 737,280-image grid (built once in this process,
about 12 s, and once in the job's one actor); the model is the shipped pretrained one.
"""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTORS, classes_to_index
from cvae.data.groundtruth import GroundTruth
from cvae.model.checkpoint import CheckpointError, pretrained_checkpoint
from cvae.serve.card import dataset_card, header, size_category
from cvae.serve.engine import SUCCESS, read_output, run_query_job
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import answer_queries
from cvae.serve.schema import RESULT_SCHEMA, VERIFIED_RESULT_SCHEMA
from cvae.serve.verify import Verifier, check_keep
from scm_fixtures import make_checkpoint

HEART = [2, 3, 13, 10, 20]  # shape, scale, orientation, pos_x, pos_y


@pytest.fixture(scope="module")
def verifier():
    from cvae.data.readout import Readout

    return Verifier(Readout.of(GroundTruth("render")))


def images_of(classes):
    return GroundTruth("render").images(classes_to_index(np.asarray(classes)))


def test_grid_images_verify_and_degenerate_answers_never_do(verifier):
    rows = np.array([HEART, HEART, HEART, [0, 1, 0, 5, 5]])
    square_twin = [0, 1, 39, 5, 5]  # orientation 39 is 2 pi: pixel-identical to orientation 0
    wrong = [1, 3, 13, 10, 20]  # an ellipse where the row says heart
    images = np.concatenate([images_of([HEART]), np.zeros((1, 64, 64), np.uint8), images_of([wrong, square_twin])])
    cols = verifier.columns(images, rows, np.full((4, 5), -1))
    assert cols["verified"].tolist() == [True, False, False, True]
    read = np.stack([cols[f"read_{f}"] for f in FACTORS], 1)
    assert read[0].tolist() == HEART and cols["read_iou"][0] == 1.0
    assert read[1].tolist() == [-1] * 5 and cols["read_iou"][1] == 0.0  # blank: reads back nothing
    assert read[2].tolist() == wrong  # the wrong image reads back as what it shows
    assert read[3].tolist() == [0, 1, 0, 5, 5]  # the twin reads back as the row's own class


def test_a_shifted_or_noisy_answer_is_verified_only_if_it_reads_back_right(verifier):
    heart = images_of([HEART])[0]
    shifted = np.roll(heart, 6, axis=1)[None]  # six pixels right: another pos_x
    noise = (np.random.default_rng(0).random((1, 64, 64)) < 0.5).astype(np.uint8)
    cols = verifier.columns(np.concatenate([shifted, noise]), np.array([HEART, HEART]), np.array([HEART, HEART]))
    assert not cols["verified"].any()
    assert cols["read_pos_x"][0] != HEART[3] and 0 < cols["read_iou"][0] < 1


def test_answer_queries_with_a_verifier_adds_the_columns(verifier):
    scm = ImageSCM.from_checkpoint(str(pretrained_checkpoint()), device="cpu")
    source = int(classes_to_index(np.array([HEART]))[0])
    table = pa.table({"query_id": ["a", "b"], "kind": ["counterfactual"] * 2, "source_index": [source] * 2,
                      "do_scale": [5, None], "do_pos_x": [None, 3]})
    plain, _ = answer_queries(scm, table)
    results, errors = answer_queries(scm, table, verifier=verifier)
    assert errors.num_rows == 0 and results.schema == VERIFIED_RESULT_SCHEMA and plain.schema == RESULT_SCHEMA
    assert results.select(RESULT_SCHEMA.names).equals(plain)  # verifying never changes an answer
    assert results.column("verified").to_pylist() == [True, True]
    assert results.column("read_scale").to_pylist() == [5, 3] and results.column("read_pos_x").to_pylist() == [10, 3]


def test_keep_is_checked():
    assert check_keep("verified", False) and not check_keep("all", False)
    with pytest.raises(ValueError, match="keep must be one of all, verified, got 'some'"):
        check_keep("some", True)


def test_card_header_and_size_category():
    assert size_category(999) == "n<1K" and size_category(1000) == "1K<n<10K"
    text = header({"verify": False, "result_rows": 5})
    assert "    - name: image\n      dtype: image\n" in text and "read_iou" not in text and "rejected" not in text
    card = dataset_card({"verify": True, "keep": "verified", "result_rows": 3, "rejected_rows": 1,
                         "verified_rows": 3, "verified_share": 0.75, "queries": 4}, None)
    assert "config_name: rejected" in card and "3 of 4 answered rows (75.0%)" in card and "| `verified` |" in card


def test_verified_job_writes_rejected_rows_and_a_loadable_card(ray_session, tmp_path):
    queries = tmp_path / "queries"
    make_queries({"seed": 0, "sources": {"grid": True, "sample": 40},
                  "interventions": [{"factor": "scale", "values": "random_other"},
                                    {"factor": "orientation", "values": "random_other"}]}, queries)
    out = tmp_path / "answers"
    summary = run_query_job("pretrained", queries, out, actors=1, keep="verified", command="python -m jobs.query ...")
    results, errors = read_output(out)
    rejected = pq.read_table(out / "rejected")
    assert summary["verify"] and summary["result_rows"] == summary["verified_rows"] == results.num_rows > 60
    assert summary["rejected_rows"] == rejected.num_rows and results.num_rows + rejected.num_rows == 80
    assert results.column("verified").to_pylist() == [True] * results.num_rows
    assert not any(rejected.column("verified").to_pylist()) and rejected.schema == VERIFIED_RESULT_SCHEMA
    marker = json.loads((out / SUCCESS).read_text())
    assert set(marker["committed"]) == {"results", "errors", "rejected"}
    assert marker["provenance"]["checkpoint_sha256"]["model.pt"] and marker["provenance"]["query_spec"]["seed"] == 0
    assert pq.read_table(out / "results").num_rows == results.num_rows  # the card breaks no Parquet reader
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "python -m jobs.query ..." in card and "MODEL_CARD.md" in card
    _load_with_datasets(out, results.num_rows)


def _load_with_datasets(folder, rows):
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset(str(folder), split="train", cache_dir=str(folder.parent / "hf-cache"))
    assert len(hf) == rows and hf[0]["image"].size == (64, 64)
    assert hf[0].get("verified", True) is True


def test_an_unverified_job_keeps_the_plain_schema_and_a_card(ray_session, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    pq.write_table(pa.table({"query_id": ["x"], "kind": ["intervene"], "do_shape": [1]}), tmp_path / "q.parquet")
    summary = run_query_job(checkpoint, tmp_path / "q.parquet", tmp_path / "out", actors=1)
    results, _ = read_output(tmp_path / "out")
    assert results.schema == RESULT_SCHEMA and not summary["verify"] and "rejected_rows" not in summary
    card = (tmp_path / "out" / "README.md").read_text()
    assert "verified: not checked" in card and "none (a training checkpoint" in card
    _load_with_datasets(tmp_path / "out", 1)


def test_verify_needs_ground_truth(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    del meta["manifest"]
    (tmp_path / "ckpt" / "checkpoint.json").write_text(json.dumps(meta))
    pq.write_table(pa.table({"query_id": ["x"], "kind": ["intervene"]}), tmp_path / "q.parquet")
    with pytest.raises(CheckpointError, match="--verify reads answers back against the ground truth"):
        run_query_job(checkpoint, tmp_path / "q.parquet", tmp_path / "out", verify=True)


def test_the_search_near_a_hint_finds_what_the_full_search_finds(verifier):
    """Readout._near (answers whose hint reaches IoU 0.9) against the batched search without hints."""
    rng = np.random.default_rng(3)
    classes = np.stack([rng.integers(0, n, 60) for n in (3, 6, 40, 32, 32)], 1)
    images = images_of(classes)
    noisy = images ^ (rng.random(images.shape) < 0.004).astype(np.uint8)  # near their own image
    shifted = np.roll(images, 1, axis=2)  # between two positions: ties are likely
    answers = np.concatenate([noisy, shifted])
    hints = np.tile(classes_to_index(classes), 2)[:, None]
    near, full = verifier.readout.read(answers, hints), verifier.readout.read(answers, None)
    assert np.array_equal(near.iou, full.iou) and np.array_equal(near.reads, full.reads)
    assert np.array_equal(near.images, full.images) and (near.iou[:60] >= 0.9).mean() > 0.5
