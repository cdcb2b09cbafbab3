"""The pretrained whole-grid model that ships in the package: its files match their
checksums and load weights-only, an altered file is refused, and counterfactuals of images
anywhere on the grid (off every reduced training grid too) read back right."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import cvae.model.checkpoint as ckpt
from cvae import CausalModel
from cvae.data.grid import FACTOR_SIZES, FACTORS, classes_to_index, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.readout import Readout
from cvae.export import MAX_BYTES
from cvae.model.checkpoint import CheckpointError, load_meta, model_grid, pretrained_checkpoint
from cvae.serve.engine import read_output, run_query_job
from cvae.serve.queries import QUERY_SCHEMA

# Sources spread over the whole grid, most of them off configs/local.yaml's and
# configs/bench.yaml's reduced grids (odd orientations and positions), each asked one
# intervention per factor.
SOURCES = np.array([[0, 0, 13, 3, 29], [1, 5, 39, 31, 0], [2, 2, 7, 17, 9], [0, 4, 21, 0, 14],
                    [1, 1, 1, 25, 31], [2, 3, 33, 11, 5]])
DO = [("shape", 1), ("scale", 3), ("orientation", 17), ("pos_x", 9), ("pos_y", 22), ("scale", 0)]


def test_the_files_match_their_checksums_and_load_weights_only():
    folder = pretrained_checkpoint()
    weights = folder / ckpt.WEIGHTS
    assert weights.stat().st_size <= MAX_BYTES
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = load_meta(folder)
    assert model_grid(meta).is_whole()
    assert meta["manifest"]["counts"]["train"] > 600_000  # the whole grid's training split
    assert {"command", "seed", "commit", "data", "hardware", "training_seconds"} <= set(meta["provenance"])
    assert (folder / "MODEL_CARD.md").read_text().startswith("# cvae pretrained")


def test_an_altered_or_missing_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "pretrained"
    shutil.copytree(pretrained_checkpoint(), copy)
    monkeypatch.setattr(ckpt, "PRETRAINED_DIR", copy)
    assert ckpt.resolve_checkpoint("pretrained", say=lambda line: None) == str(copy)
    data = bytearray((copy / ckpt.WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / ckpt.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt does not match its checksum"):
        CausalModel.load("pretrained")
    (copy / ckpt.CHECKSUMS).unlink()
    with pytest.raises(CheckpointError, match="no pretrained model in this installation"):
        ckpt.resolve_checkpoint("pretrained")


def _neighbourhood_readout(classes: np.ndarray) -> Readout:
    """Ground-truth candidates: each wanted image and every image one class away from it in
    one factor (all its near misses), read back by the evaluation's readout."""
    rows = [classes]
    for j, f in enumerate(FACTORS):
        for c in range(FACTOR_SIZES[f]):
            moved = classes.copy()
            moved[:, j] = c
            rows.append(moved)
    indices = np.unique(classes_to_index(np.concatenate(rows)))
    return Readout(indices, GroundTruth("render").images)


def test_whole_grid_counterfactuals_read_back_right():
    model = CausalModel.load("pretrained", say=lambda line: None)
    answers, wanted = [], []
    for source in SOURCES:
        index = int(classes_to_index(source[None])[0])
        for factor, value in DO:
            target = source.copy()
            target[FACTORS.index(factor)] = value
            answers.append(model.counterfactual(source_index=index, do={factor: value}, seed=1))
            wanted.append(target)
    wanted = np.array(wanted)
    back = _neighbourhood_readout(wanted).read(np.stack(answers))
    right = back.hits(wanted).all(axis=1)
    assert right.mean() >= 0.9, [(w.tolist(), c.tolist()) for w, c, r in zip(wanted, back.classes(), right) if not r]


def test_the_query_job_answers_source_indices_with_no_dataset(ray_session, tmp_path):
    indices = classes_to_index(SOURCES)
    rows = [{**{n: None for n in QUERY_SCHEMA.names}, "query_id": f"q{i}", "kind": "counterfactual",
             "source_index": int(index), "do_orientation": 5} for i, index in enumerate(indices)]
    pq.write_table(pa.Table.from_pylist(rows, schema=QUERY_SCHEMA), tmp_path / "q.parquet")
    summary = run_query_job("pretrained", tmp_path / "q.parquet", tmp_path / "out", actors=1, batch_size=8)
    assert summary["error_rows"] == 0 and summary["result_rows"] == len(indices)
    results, _ = read_output(tmp_path / "out")
    assert (results.column("orientation").to_numpy() == 5).all()
    factual = np.stack([results.column(f"factual_{f}").to_numpy() for f in FACTORS], axis=1)
    assert sorted(classes_to_index(factual).tolist()) == sorted(indices.tolist())
    assert (index_to_classes(indices, with_color=False)[:, 2] != 5).all()


def test_counterfactuals_of_official_frames_match_the_official_targets():
    """The model card's official-frame figures reproduce, and beat the unchanged source frame
    (a degenerate answer) by a wide margin."""
    from cvae.data.fidelity import load_reference
    from cvae.data.images import iou
    from cvae.evaluate.official import one_factor_pairs, score_official

    frames, labels = load_reference()
    scores = score_official(CausalModel.load("pretrained", say=lambda line: None).scm, frames, labels)
    recorded = load_meta(pretrained_checkpoint())["official_frames"]
    assert scores["pairs"] == recorded["pairs"] == 698 and scores["refused"] == 0
    assert scores["overall"]["mean_iou"] == pytest.approx(recorded["overall"]["mean_iou"], abs=0.005)
    pairs = np.array(one_factor_pairs(labels))
    unchanged = iou(frames[pairs[:, 0]], frames[pairs[:, 1]]).mean()
    assert scores["overall"]["mean_iou"] >= 0.95 and unchanged < 0.6, (scores["overall"], unchanged)
