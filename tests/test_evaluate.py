"""Evaluation against ground truth: right answers score 1, wrong ones do not, and the
numbers are the ones computed by hand from the same images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cvae.checkpoint import load_meta, save_checkpoint
from cvae.evaluate import EvaluationError, evaluate, iou, pixel_error, read_back
from cvae.grid import FACTORS, classes_to_index, index_to_classes
from cvae.groundtruth import GroundTruth
from cvae.images import decode_image, encode_pngs
from cvae.make_queries import make_queries
from cvae.queries import RESULT_SCHEMA, answer_queries
from cvae.scm import ImageSCM, seed_from_query_id
from jobs import evaluate as job
from scm_fixtures import make_checkpoint

TRUTH = GroundTruth("render")
HOLDOUT = [{"shape": [2], "scale": [5]}]


def _checkpoint(path: Path) -> Path:
    """A tiny random-weight checkpoint whose manifest has holdout rules."""
    make_checkpoint(path)
    meta = load_meta(path)
    meta["manifest"] = {**meta["manifest"], "holdout": HOLDOUT}
    from cvae.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    meta.pop("model")
    save_checkpoint(path, model, meta)
    return path


def _queries(out: Path) -> pa.Table:
    make_queries({"sources": {"indices": [1000, 250000, 600000, 737278]},
                  "interventions": [{"factor": "shape", "values": "all"},      # includes null dos
                                    {"factor": "scale", "values": "random_other"},
                                    {"factor": "pos_x", "values": "other"},
                                    {"do": {"shape": 2, "scale": 5}}]}, out)
    return pads.dataset(str(out), format="parquet").to_table()


def _results(queries: pa.Table, out: Path, image_of) -> pa.Table:
    """Engine-layout results whose counterfactual world is the factual one with the do
    applied; `image_of(factual, cf, do)` draws the answer images."""
    src = queries["source_index"].to_numpy()
    factual = index_to_classes(src, with_color=False)
    do = np.stack([queries[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)
    cf = np.where(do >= 0, do, factual)
    columns = {"query_id": queries["query_id"], "sample": pa.array(np.zeros(len(src), np.int64)),
               "kind": queries["kind"]}
    columns.update({f: pa.array(cf[:, j]) for j, f in enumerate(FACTORS)})
    columns.update({f"factual_{f}": pa.array(factual[:, j]) for j, f in enumerate(FACTORS)})
    columns["image"] = pa.array(encode_pngs(image_of(factual, cf, do)), pa.binary())
    table = pa.table(columns, schema=RESULT_SCHEMA)
    (out / "results").mkdir(parents=True)
    (out / "errors").mkdir()
    pq.write_table(table, out / "results" / "part-00000.parquet")
    (out / "_SUCCESS.json").write_text("{}")
    return table


def _truth(classes):
    return TRUTH.images(classes_to_index(classes))


def test_metrics_on_known_images():
    a = np.zeros((3, 64, 64), np.uint8)
    b = a.copy()
    a[0, :8, :8] = 1; b[0, :8, :8] = 1          # identical
    a[1, :8, :8] = 1; b[1, 8:16, 8:16] = 1      # disjoint
    a[2, :8, :8] = 1; b[2, :8, :4] = 1          # half overlap
    assert iou(a, b).tolist() == [1.0, 0.0, 0.5]
    assert pixel_error(a, b).tolist() == [0.0, 128 / 4096, 32 / 4096]
    empty = np.zeros((1, 64, 64), np.uint8)
    assert iou(empty, empty).tolist() == [1.0]


def test_read_back_finds_the_drawn_class():
    classes = np.array([[0, 3, 5, 10, 20], [2, 0, 0, 31, 0], [1, 5, 39, 0, 31]])
    images = _truth(classes)
    for j, f in enumerate(FACTORS):
        nearest = read_back(images, classes, f, TRUTH)
        assert nearest[np.arange(3), classes[:, j]].all(), f
    # an image drawn with another scale reads back as that scale, not the given one
    other = classes.copy()
    other[:, 1] = (classes[:, 1] + 3) % 6
    nearest = read_back(_truth(other), classes, "scale", TRUTH)
    assert nearest[np.arange(3), other[:, 1]].all()
    assert not nearest[np.arange(3), classes[:, 1]].any()


def test_right_answers_score_one_and_wrong_answers_do_not(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")
    n = queries.num_rows
    src = index_to_classes(queries["source_index"].to_numpy(), with_color=False)
    do = np.stack([queries[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)
    null = ((do < 0) | (do == src)).all(1)  # do(shape = its own shape), and one joint do
    assert null.sum() == 5

    _results(queries, tmp_path / "right", lambda factual, cf, do: _truth(cf))
    right = evaluate(tmp_path / "right", ckpt, tmp_path / "eval-right", queries=tmp_path / "q",
                     figures_per_factor=2, reversibility_samples=10)
    o = right["overall"]
    assert o["count"] == n
    assert o["iou"] == 1.0 and o["pixel_error"] == 0.0 and o["exact"] == 1.0
    assert o["effectiveness"] == 1.0
    assert set(o["effectiveness_by_factor"]) == {"shape", "scale", "pos_x"}
    assert set(right["by_factor"]) == {"shape", "scale", "pos_x", "shape+scale"}
    assert right["by_factor"]["pos_x"]["count"] == 4 * 31
    assert o["composition"] == {"count": 5, "exact": 1.0, "pixel_error": 0.0}
    # Reversibility: per group, the 10 real interventions with the smallest hash of
    # "reverse:<query_id>:<sample>", each observed (answer image and counterfactual factors)
    # and done back to the factual values by the checkpoint's SCM; recomputed here with
    # answer_queries directly.
    cf = np.where(do >= 0, do, src)
    ids = [f"reverse:{q}:0" for q in queries["query_id"].to_pylist()]
    group = np.array(["+".join(f for j, f in enumerate(FACTORS) if do[i, j] >= 0) for i in range(n)])
    first = []
    for name in sorted(set(group)):
        rows = [i for i in np.flatnonzero((group == name) & ~null)]
        first += sorted(rows, key=lambda i: seed_from_query_id(ids[i]))[:10]
    first = np.array(first)
    assert o["reversibility"]["count"] == len(first) == 10 + 8 + 4 + 3  # pos_x, shape, scale, joint
    back_do = np.where(do[first] >= 0, src[first], -1)
    reversal = pa.table({
        "query_id": [ids[i] for i in first],  # the same ids, so the same seeds
        "kind": ["counterfactual"] * len(first),
        "image": pa.array(encode_pngs(_truth(cf[first])), pa.binary()),
        **{f: pa.array(cf[first, j]) for j, f in enumerate(FACTORS)},
        **{f"do_{f}": pa.array(back_do[:, j], mask=back_do[:, j] < 0) for j, f in enumerate(FACTORS)},
    })
    answered, refused = answer_queries(ImageSCM.from_checkpoint(ckpt), reversal)
    assert refused.num_rows == 0
    order = {q: k for k, q in enumerate(answered["query_id"].to_pylist())}
    back = np.stack([decode_image(answered["image"][order[ids[i]]].as_py()) for i in first])
    want = _truth(src[first])
    assert o["reversibility"]["iou"] == pytest.approx(iou(back, want).mean(), abs=1e-6)
    exact = (back.reshape(len(first), -1) == want.reshape(len(first), -1)).all(1).mean()
    assert o["reversibility"]["exact"] == pytest.approx(exact, abs=1e-6)
    assert right["by_factor"]["shape"]["reversibility"]["count"] == 8
    assert right["reversal_queries_refused"]["count"] == 0

    # Wrong: every answer is the factual image (the intervention had no effect).
    _results(queries, tmp_path / "wrong", lambda factual, cf, do: _truth(factual))
    wrong = evaluate(tmp_path / "wrong", ckpt, tmp_path / "eval-wrong", queries=tmp_path / "q",
                     figures_per_factor=0, reversibility_samples=0)
    w = wrong["overall"]
    # only the null interventions are right; their share is the score
    assert w["exact"] == pytest.approx(round(null.mean(), 6))
    assert w["effectiveness"] == pytest.approx(round(null.mean(), 6))
    assert wrong["by_factor"]["pos_x"]["effectiveness"] == 0.0
    assert wrong["by_factor"]["pos_x"]["iou"] < 0.5
    assert w["composition"]["exact"] == 1.0  # a null intervention's answer is the factual image
    assert w["reversibility"]["count"] == 0

    # The mean IoU is the mean of per-row IoUs computed here from the same images.
    expected = iou(_truth(src), _truth(np.where(do >= 0, do, src))).mean()
    assert w["iou"] == pytest.approx(expected, abs=1e-6)


def test_wrong_scale_fails_scale_effectiveness_only(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")

    def answer(factual, cf, do):
        drawn = cf.copy()
        scale_only = (do[:, 1] >= 0) & (do[:, 0] < 0)
        drawn[scale_only, 1] = factual[scale_only, 1]  # the scale intervention is ignored
        return _truth(drawn)

    _results(queries, tmp_path / "res", answer)
    report = evaluate(tmp_path / "res", ckpt, tmp_path / "eval", queries=tmp_path / "q",
                      figures_per_factor=0, reversibility_samples=0)
    assert report["by_factor"]["scale"]["effectiveness"] == 0.0
    assert report["by_factor"]["shape"]["effectiveness"] == 1.0
    assert report["by_factor"]["pos_x"]["effectiveness"] == 1.0
    assert report["by_factor"]["shape+scale"]["effectiveness"] == 1.0


def test_holdout_split_and_outputs(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")
    table = _results(queries, tmp_path / "res", lambda factual, cf, do: _truth(cf))
    report = evaluate(tmp_path / "res", ckpt, tmp_path / "eval", queries=tmp_path / "q",
                      figures_per_factor=3, reversibility_samples=0)
    cf = np.stack([table[f].to_numpy() for f in FACTORS], 1)
    factual = np.stack([table[f"factual_{f}"].to_numpy() for f in FACTORS], 1)
    held = ((cf[:, 0] == 2) & (cf[:, 1] == 5)) | ((factual[:, 0] == 2) & (factual[:, 1] == 5))
    assert held.any() and (~held).any()
    assert report["holdout_rules"] == HOLDOUT
    assert report["holdout"]["holdout"]["overall"]["count"] == held.sum()
    assert report["holdout"]["seen"]["overall"]["count"] == (~held).sum()
    # the joint do(shape=2, scale=5) always lands in the held-out combination
    assert report["holdout"]["holdout"]["by_factor"]["shape+scale"]["count"] == 4
    assert "shape+scale" not in report["holdout"]["seen"]["by_factor"]

    out = tmp_path / "eval"
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| shape | " in md and "## Rows touching held-out combinations" in md
    assert sorted(report["figures"]) == sorted(
        f"figures/counterfactuals_{g}.png" for g in ("shape", "scale", "pos_x", "shape_scale"))
    for fig in report["figures"]:
        assert (out / fig).read_bytes().startswith(b"\x89PNG")


def test_bad_inputs_are_clear_errors(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")
    _results(queries, tmp_path / "res", lambda factual, cf, do: _truth(cf))
    (tmp_path / "res" / "_SUCCESS.json").unlink()
    with pytest.raises(EvaluationError, match=r"did not commit \(_SUCCESS\.json missing\)"):
        evaluate(tmp_path / "res", ckpt, tmp_path / "e1", queries=tmp_path / "q")
    (tmp_path / "res" / "_SUCCESS.json").write_text("{}")
    other = tmp_path / "other-q"
    make_queries({"sources": {"indices": [5]}, "interventions": [{"factor": "shape"}]}, other)
    with pytest.raises(EvaluationError, match="no result row matches a query_id"):
        evaluate(tmp_path / "res", ckpt, tmp_path / "e2", queries=other)
    assert job.main(["--results", str(tmp_path / "nothing"), "--queries", str(tmp_path / "q"),
                     "--checkpoint", str(ckpt), "--out", str(tmp_path / "e3")]) == 2


@pytest.mark.slow
def test_engine_answers_evaluated_through_uris(tmp_path, ray_session, capsys):
    """make_queries -> the Ray query engine -> jobs.evaluate, every path a file:// URI."""
    from cvae.engine import run_query_job

    ckpt = make_checkpoint(tmp_path / "ckpt")
    make_queries({"sources": {"grid": {"orientation": 10, "pos_x": 4, "pos_y": 4}, "sample": 30},
                  "seed": 3, "samples": 2,
                  "interventions": [{"factor": "shape", "values": "all"},
                                    {"factor": "pos_y", "values": "random_other"}]}, tmp_path / "q")
    summary = run_query_job(ckpt, tmp_path / "q", tmp_path / "answers", actors=1, batch_size=64)
    uri = lambda p: f"file://{tmp_path / p}"  # noqa: E731
    assert job.main(["--results", uri("answers"), "--queries", uri("q"), "--checkpoint", uri("ckpt"),
                     "--out", uri("eval"), "--figures-per-factor", "2",
                     "--reversibility-samples", "16"]) == 0
    assert "evaluate: 240 counterfactuals" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    results = pads.dataset(str(tmp_path / "answers" / "results"), format="parquet").to_table()
    assert report["overall"]["count"] == results.num_rows == 2 * 30 * 4
    # The SCM's abduction is exact, so a null intervention returns the factual image exactly
    # even with random weights (30 sources x 2 samples with do(shape) = their own shape).
    assert report["overall"]["composition"] == {"count": 60, "exact": 1.0, "pixel_error": 0.0}
    assert report["overall"]["reversibility"]["count"] == 16 + 16  # per group: shape, pos_y
    # The reported IoU is the IoU of the engine's images against the renderer's.
    cf = np.stack([results[f].to_numpy() for f in FACTORS], 1)
    images = np.stack([decode_image(b) for b in results["image"].to_pylist()])
    assert report["overall"]["iou"] == pytest.approx(iou(images, _truth(cf)).mean(), abs=1e-6)
    assert summary["queries"] == 30 * 4
