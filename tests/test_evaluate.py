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

from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTORS, classes_to_index, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import decode_image, encode_pngs, iou, pixel_error
from cvae.evaluate.metrics import descendants
from cvae.evaluate.report import STRATA, stratified
from cvae.evaluate.scores import EvaluationError, _figure_label, evaluate
from cvae.model.checkpoint import load_meta, save_checkpoint
from cvae.rng import seed_from_query_id
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import RESULT_SCHEMA, answer_queries
from jobs import evaluate as job
from scm_fixtures import CAUSAL_EDGES, causal_scm, make_checkpoint

TRUTH = GroundTruth("render")
HOLDOUT = [{"shape": [2], "scale": [5]}]


def _checkpoint(path: Path, factors=None) -> Path:
    """A tiny random-weight checkpoint whose manifest has holdout rules."""
    make_checkpoint(path, factors)
    meta = load_meta(path)
    meta["manifest"] = {**meta["manifest"], "holdout": HOLDOUT}
    from cvae.model.checkpoint import load_checkpoint

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


def test_descendants_follow_the_dag():
    reach = descendants(CAUSAL_EDGES)  # shape -> scale -> pos_y
    named = {FACTORS[j]: {FACTORS[k] for k in np.flatnonzero(reach[j])} for j in range(5)}
    assert named == {"shape": {"scale", "pos_y"}, "scale": {"pos_y"}, "orientation": set(),
                     "pos_x": set(), "pos_y": set()}
    assert not descendants([]).any()


def test_figure_columns_are_stratified_and_titled_with_names():
    # the first six strata cover every shape and every scale
    assert {s for s, _ in STRATA[:6]} == {0, 1, 2} and {c for _, c in STRATA[:6]} == set(range(6))
    assert len(set(STRATA)) == 18
    strata = {(shape, scale): [f"{shape}{scale}{k}" for k in range(3)] for shape in range(3) for scale in range(6)}
    first = stratified(strata, 8)
    assert len(first) == 8 and all(item.endswith("0") for item in first)
    assert stratified({(0, 0): ["a", "b"], (2, 5): ["c"]}, 8) == ["a", "c", "b"]
    assert _figure_label(np.array([1, 0, 0, 0, 0]), np.array([2, -1, -1, -1, -1])) == "ellipse→heart"
    assert _figure_label(np.array([0, 2, 0, 0, 0]), np.array([1, 5, -1, -1, -1])) == "square→ellipse\nscale 2→5"


def test_right_answers_score_one_and_wrong_answers_do_not(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")
    n = queries.num_rows
    src = index_to_classes(queries["source_index"].to_numpy(), with_color=False)
    do = np.stack([queries[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)
    null = ((do < 0) | (do == src)).all(1)  # do(shape = its own shape), and one joint do
    assert null.sum() == 5

    # Right: the true counterfactual images themselves.
    _results(queries, tmp_path / "right", lambda factual, cf, do: _truth(cf))
    right = evaluate(tmp_path / "right", ckpt, tmp_path / "eval-right", queries=tmp_path / "q",
                     figures_per_factor=2, reversibility_samples=10, composition_samples=6)
    o = right["overall"]
    assert right["rows"] == n and o["count"] == n - 5  # null interventions are rows of their own
    assert o["iou"] == 1.0 and o["pixel_error"] == 0.0 and o["exact"] == 1.0
    assert o["effectiveness"] == 1.0 and o["preservation"] == 1.0 and o["read_nothing"] == 0.0
    assert o["effectiveness_by_factor"] == {"shape": 1.0, "scale": 1.0, "pos_x": 1.0}
    assert o["preservation_by_factor"] == {f: 1.0 for f in FACTORS}
    assert set(right["by_factor"]) == {"shape", "scale", "pos_x", "shape+scale"}
    assert right["by_factor"]["pos_x"]["count"] == 4 * 31
    assert right["by_factor"]["shape"]["count"] == 4 * 2
    # the pos_x row scores pos_x for effectiveness and the other four for preservation
    assert set(right["by_factor"]["pos_x"]["preservation_by_factor"]) == {"shape", "scale", "orientation", "pos_y"}
    assert right["null"]["overall"]["count"] == 5
    assert right["null"]["by_factor"]["shape"]["count"] == 4
    assert right["null"]["by_factor"]["shape+scale"]["count"] == 1
    assert right["composition"]["null_intervention"] == {"count": 5, "exact": 1.0, "pixel_error": 0.0}
    # the model's own composition: random weights, so the numbers only have to be there
    model = right["composition"]["model"]
    assert model["count"] == 4 and set(model["iou"]) == {"1", "5", "10"}
    assert all(0.0 <= v <= 1.0 for v in model["iou"].values())
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

    # The controls are in every report, built from the same rows, and score near chance.
    controls = right["controls"]
    assert set(controls) == {"factual", "blank", "random"}
    blank, unchanged, random = (controls[k]["overall"] for k in ("blank", "factual", "random"))
    assert blank["count"] == unchanged["count"] == random["count"] == n - 5
    assert blank["effectiveness"] <= 0.05 and blank["preservation"] == 0.0 and blank["read_nothing"] == 1.0
    assert unchanged["effectiveness"] <= 0.05 and unchanged["preservation"] == 1.0
    assert random["effectiveness"] < 0.3 and random["preservation"] < 0.3
    assert controls["factual"]["null"]["overall"]["effectiveness"] == 1.0  # right where nothing changes

    # Wrong: every answer is the factual image (the intervention had no effect): the same
    # scores as the unchanged-factual control.
    _results(queries, tmp_path / "wrong", lambda factual, cf, do: _truth(factual))
    wrong = evaluate(tmp_path / "wrong", ckpt, tmp_path / "eval-wrong", queries=tmp_path / "q",
                     figures_per_factor=0, reversibility_samples=0, composition_samples=0)
    w = wrong["overall"]
    assert w["exact"] == 0.0 and w["effectiveness"] == 0.0 and w["preservation"] == 1.0
    assert w == {**unchanged, "reversibility": w["reversibility"]}
    assert wrong["by_factor"]["pos_x"]["iou"] < 0.5
    assert wrong["null"]["overall"]["exact"] == 1.0
    assert wrong["composition"]["null_intervention"]["exact"] == 1.0
    assert w["reversibility"]["count"] == 0 and wrong["composition"]["model"]["count"] == 0

    # The mean IoU is the mean of per-row IoUs computed here from the same images.
    expected = iou(_truth(src[~null]), _truth(cf[~null])).mean()
    assert w["iou"] == pytest.approx(expected, abs=1e-6)


def test_blank_answers_read_back_nothing(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")
    _results(queries, tmp_path / "res", lambda factual, cf, do: np.zeros((len(cf), 64, 64), np.uint8))
    report = evaluate(tmp_path / "res", ckpt, tmp_path / "eval", queries=tmp_path / "q",
                      figures_per_factor=0, reversibility_samples=0, composition_samples=0)
    o = report["overall"]
    assert o["effectiveness"] <= 0.05 and o["effectiveness"] == 0.0
    assert o["preservation"] == 0.0 and o["read_nothing"] == 1.0
    assert report["null"]["overall"]["effectiveness"] == 0.0  # even where nothing was asked to change
    assert o == {**report["controls"]["blank"]["overall"], "reversibility": o["reversibility"]}


def test_preservation_leaves_out_descendants(tmp_path):
    from test_causal import causal_manifest, with_manifest

    # data drawn from shape -> scale -> pos_y: the data's DAG decides what is preserved
    ckpt = with_manifest(_checkpoint(tmp_path / "ckpt", factors=causal_scm()), causal_manifest())
    queries = _queries(tmp_path / "q")
    _results(queries, tmp_path / "res", lambda factual, cf, do: _truth(cf))
    report = evaluate(tmp_path / "res", ckpt, tmp_path / "eval", queries=tmp_path / "q",
                      figures_per_factor=0, reversibility_samples=0, composition_samples=0)
    by = report["by_factor"]
    assert set(by["shape"]["preservation_by_factor"]) == {"orientation", "pos_x"}
    assert set(by["scale"]["preservation_by_factor"]) == {"shape", "orientation", "pos_x"}
    assert set(by["pos_x"]["preservation_by_factor"]) == {"shape", "scale", "orientation", "pos_y"}
    assert report["overall"]["preservation"] == 1.0


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
    assert report["by_factor"]["scale"]["preservation"] == 1.0
    assert report["by_factor"]["shape"]["effectiveness"] == 1.0
    assert report["by_factor"]["pos_x"]["effectiveness"] == 1.0
    assert report["by_factor"]["shape+scale"]["effectiveness"] == 1.0
    assert report["overall"]["effectiveness_by_factor"]["scale"] == pytest.approx(3 / 7, abs=1e-6)


def test_holdout_split_and_outputs(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    queries = _queries(tmp_path / "q")
    table = _results(queries, tmp_path / "res", lambda factual, cf, do: _truth(cf))
    report = evaluate(tmp_path / "res", ckpt, tmp_path / "eval", queries=tmp_path / "q",
                      figures_per_factor=3, reversibility_samples=0)
    cf = np.stack([table[f].to_numpy() for f in FACTORS], 1)
    factual = np.stack([table[f"factual_{f}"].to_numpy() for f in FACTORS], 1)
    do = np.stack([queries[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)
    null = ((do < 0) | (do == factual)).all(1)
    held = ((cf[:, 0] == 2) & (cf[:, 1] == 5)) | ((factual[:, 0] == 2) & (factual[:, 1] == 5))
    assert held.any() and (~held).any()
    assert report["holdout_rules"] == HOLDOUT
    assert report["holdout"]["holdout"]["overall"]["count"] == (held & ~null).sum()
    assert report["holdout"]["holdout"]["null"]["overall"]["count"] == (held & null).sum()
    assert report["holdout"]["seen"]["overall"]["count"] == (~held & ~null).sum()
    # the joint do(shape=2, scale=5) always lands in the held-out combination (and is null
    # for the source that already is a big heart)
    assert report["holdout"]["holdout"]["by_factor"]["shape+scale"]["count"] == 3
    assert report["holdout"]["holdout"]["null"]["by_factor"]["shape+scale"]["count"] == 1
    assert "shape+scale" not in report["holdout"]["seen"]["by_factor"]

    out = tmp_path / "eval"
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| shape | " in md and "| null: do(shape) = factual | 4 |" in md
    for section in ("## Read back per factor", "## Composition", "## Controls",
                    "## Rows touching held-out combinations"):
        assert section in md
    assert "| random grid image | " in md and "| blank image | " in md
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
    from cvae.serve.engine import run_query_job

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
    printed = capsys.readouterr().out
    assert "evaluate: 240 counterfactuals" in printed and "controls (effectiveness / preservation)" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    results = pads.dataset(str(tmp_path / "answers" / "results"), format="parquet").to_table()
    assert report["rows"] == results.num_rows == 2 * 30 * 4
    assert report["overall"]["count"] + report["null"]["overall"]["count"] == results.num_rows
    # The SCM's abduction is exact, so a null intervention returns the factual image exactly
    # even with random weights (30 sources x 2 samples with do(shape) = their own shape).
    assert report["composition"]["null_intervention"] == {"count": 60, "exact": 1.0, "pixel_error": 0.0}
    assert report["overall"]["reversibility"]["count"] == 16 + 16  # per group: shape, pos_y
    # The reported IoU is the IoU of the engine's images against the renderer's.
    cf = np.stack([results[f].to_numpy() for f in FACTORS], 1)
    factual = np.stack([results[f"factual_{f}"].to_numpy() for f in FACTORS], 1)
    intervened = (cf != factual).any(1)  # every non-null do here changes its factor
    images = np.stack([decode_image(b) for b in results["image"].to_pylist()])
    assert report["overall"]["iou"] == pytest.approx(
        iou(images[intervened], _truth(cf[intervened])).mean(), abs=1e-6)
    assert summary["queries"] == 30 * 4
