"""The notebook API (cvae.serve.api): the same answers as answer_queries on the same rows, factor
values by class, name or official value, clear errors, output shapes, and run folders."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from cvae import CausalModel, Value
from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTORS, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import decode_image
from cvae.serve.queries import QUERY_SCHEMA, answer_queries
from scm_fixtures import causal_scm, make_checkpoint

SOURCE = 1234
CLASSES = dict(zip(FACTORS, index_to_classes(np.array([SOURCE]), with_color=False)[0].tolist()))
IMAGE = GroundTruth("render").images(np.array([SOURCE]))[0]


def _checkpoint(folder, seed: int, validation_loss: float) -> str:
    make_checkpoint(folder, causal_scm(), seed=seed)
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["metrics"] = {"validation_loss": validation_loss}
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train/local/ with two epochs of different weights: epoch 1 has the lower validation
    loss, so it is the best although epoch 2 is the latest."""
    local = tmp_path_factory.mktemp("train") / "local"
    best = _checkpoint(local / "checkpoint_epoch_00001", seed=0, validation_loss=1.0)
    _checkpoint(local / "checkpoint_epoch_00002", seed=1, validation_loss=2.0)
    return local, best


@pytest.fixture(scope="module")
def model(run):
    local, _ = run
    return CausalModel.load(local.parent, device="cpu", say=lambda line: None)


@pytest.fixture(scope="module")
def scm(run):
    return ImageSCM.from_checkpoint(run[1], device="cpu")


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{n: r.get(n) for n in QUERY_SCHEMA.names} for r in rows], schema=QUERY_SCHEMA)


def _by_query(results: pa.Table) -> dict:
    """query_id -> ((n, 64, 64) bool images in sample order, (n, 5) classes)."""
    out = {}
    rows = sorted(results.to_pylist(), key=lambda r: (r["query_id"], r["sample"]))
    for qid in dict.fromkeys(r["query_id"] for r in rows):
        mine = [r for r in rows if r["query_id"] == qid]
        out[qid] = (np.stack([decode_image(r["image"]) for r in mine]).astype(bool),
                    np.array([[r[f] for f in FACTORS] for r in mine]))
    return out


def test_load_takes_the_best_checkpoint_of_a_run_folder(run, model, tmp_path):
    local, best = run
    said = []
    assert model.checkpoint == best
    assert CausalModel.load(local, device="cpu", say=said.append).checkpoint == best
    assert said and said[0].startswith(f"checkpoint: {best} (") and "validation loss" in said[0]
    assert CausalModel.load(best, device="cpu", say=said.append).checkpoint == best
    assert len(said) == 1  # a checkpoint folder is taken as given, without a word
    with pytest.raises(ValueError, match="no checkpoint.json and no checkpoint_epoch_"):
        CausalModel.load(tmp_path)
    # the best checkpoint, not the latest: the two answer differently
    latest = CausalModel.load(local / "checkpoint_epoch_00002", device="cpu")
    assert not np.array_equal(latest.intervene(do={"shape": 0}, num_samples=2, seed=0),
                              model.intervene(do={"shape": 0}, num_samples=2, seed=0))


def test_answers_equal_answer_queries_on_the_same_rows(model, scm):
    image_hash = hashlib.blake2b(IMAGE.astype(np.uint8).tobytes(), digest_size=8).hexdigest()
    cf_image_id = (f"counterfactual image={image_hash} shape={CLASSES['shape']} scale={CLASSES['scale']} "
                   f"orientation={CLASSES['orientation']} pos_x={CLASSES['pos_x']} pos_y={CLASSES['pos_y']} "
                   "do_scale=5")
    table = _table([
        # seed null: derived from the canonical query_id, as the job derives it
        {"query_id": "counterfactual source_index=1234 do_shape=2", "kind": "counterfactual",
         "source_index": SOURCE, "do_shape": 2},
        {"query_id": "a", "kind": "counterfactual", "image": IMAGE.astype(np.uint8).tobytes(), **CLASSES,
         "do_scale": 5, "num_samples": 4, "seed": 0},
        {"query_id": cf_image_id, "kind": "counterfactual", "image": IMAGE.astype(np.uint8).tobytes(), **CLASSES,
         "do_scale": 5, "num_samples": 2},
        {"query_id": "intervene do_scale=5", "kind": "intervene", "do_scale": 5, "num_samples": 8},
        {"query_id": "b", "kind": "intervene", "do_scale": 1, "given_pos_y": 3, "num_samples": 3, "seed": 11},
        {"query_id": "c", "kind": "condition", "given_shape": 0, "num_samples": 8, "seed": 3},
    ])
    results, errors = answer_queries(scm, table)
    assert errors.num_rows == 0
    want = _by_query(results)
    named = {"shape": "square", **{f: CLASSES[f] for f in FACTORS if f != "shape"}}
    got = {
        "counterfactual source_index=1234 do_shape=2":
            model.counterfactual(source_index=SOURCE, do={"shape": "heart"}, return_classes=True),
        "a": model.counterfactual(image=IMAGE, factors=named, do={"scale": 5}, num_samples=4, seed=0,
                                  return_classes=True),
        cf_image_id: model.counterfactual(image=IMAGE, factors=CLASSES, do={"scale": 5}, num_samples=2,
                                          return_classes=True),
        "intervene do_scale=5": model.intervene(do={"scale": 5}, num_samples=8, return_classes=True),
        "b": model.intervene(do={"scale": 1}, given={"pos_y": 3}, num_samples=3, seed=11, return_classes=True),
        "c": model.condition(given={"shape": "square"}, num_samples=8, seed=3, return_classes=True),
    }
    assert set(got) == set(want)
    for qid, (images, classes) in got.items():
        want_images, want_classes = want[qid]
        images = images.reshape(-1, 64, 64)
        assert np.array_equal(images, want_images), qid
        got_classes = np.array([np.atleast_1d(classes[f]) for f in FACTORS]).T
        assert np.array_equal(got_classes, want_classes), qid
    # Not vacuous: the samples of a query differ, and a query's own seed matters.
    assert len({x.tobytes() for x in want["c"][0]}) > 1
    assert not np.array_equal(model.condition(given={"shape": 0}, num_samples=8, seed=4), want["c"][0])


def test_names_class_numbers_and_official_values_give_the_same_answer(model):
    by_class = model.intervene(do={"shape": 2, "scale": 5, "orientation": 10, "pos_x": 31}, num_samples=2, seed=1)
    for do in ({"shape": "heart", "scale": np.int64(5), "orientation": 10, "pos_x": 31},
               {"shape": " Heart", "scale": Value(1.0), "orientation": Value(10 * 2 * np.pi / 39),
                "pos_x": Value(0.99)},
               {"shape": Value(3.0), "scale": Value(0.97), "orientation": 10, "pos_x": Value(1.0)}):
        assert np.array_equal(model.intervene(do=do, num_samples=2, seed=1), by_class), do
    # and a different class gives a different answer
    assert not np.array_equal(model.intervene(do={"shape": 2, "scale": 4, "orientation": 10, "pos_x": 31},
                                              num_samples=2, seed=1), by_class)


@pytest.mark.parametrize("call, pattern", [
    (lambda m: m.intervene(do={"colour": 0}), "do: unknown factor 'colour'"),
    (lambda m: m.intervene(do={"scale": 6}), r"do: scale=6 is out of range: classes are 0..5"),
    (lambda m: m.intervene(do={"pos_x": -1}), r"pos_x=-1 is out of range"),
    (lambda m: m.condition(given={"shape": "triangle"}), "unknown shape name 'triangle'"),
    (lambda m: m.condition(given={"scale": "big"}), "scale='big': only shape takes a name"),
    (lambda m: m.intervene(do={"scale": 0.75}), r"scale=0.75 is a float.*Value\(0.75\)"),
    (lambda m: m.intervene(do={"scale": True}), "scale=True is a bool"),
    (lambda m: m.intervene(do={"scale": Value(1.2)}), r"scale=Value\(1.2\) is off the grid"),
    (lambda m: m.counterfactual(image=IMAGE, factors={"shape": 0}), "missing: scale, orientation, pos_x, pos_y"),
    (lambda m: m.counterfactual(source_index=737280), r"source_index=737280 is out of range"),
    (lambda m: m.counterfactual(do={"shape": 1}), "needs a factual observation"),
    (lambda m: m.counterfactual(image=np.full((64, 64), 2), factors=CLASSES), "image: not binary"),
    (lambda m: m.counterfactual(source_index=SOURCE, factors={"shape": 2}), "disagree with source_index"),
    (lambda m: m.intervene(do={"scale": 1}, num_samples=0), "num_samples must be >= 1"),
])
def test_bad_factors_and_rows_raise_value_error_naming_the_problem(model, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(model)


def test_output_shapes_and_the_samples_nest(model):
    one = model.counterfactual(source_index=SOURCE, do={"scale": 0}, seed=5)
    assert one.shape == (64, 64) and one.dtype == bool
    four = model.counterfactual(source_index=SOURCE, do={"scale": 0}, seed=5, num_samples=4)
    assert four.shape == (4, 64, 64) and four.dtype == bool
    assert np.array_equal(four[0], one)  # sample i depends on (seed, i) only
    images, classes = model.condition(given={"shape": 1}, return_classes=True)
    assert images.shape == (64, 64) and set(classes) == set(FACTORS) and classes["shape"] == 1
    assert isinstance(classes["scale"], int)
    images, classes = model.intervene(do={"pos_y": 7}, num_samples=3, return_classes=True)
    assert images.shape == (3, 64, 64) and classes["pos_y"].tolist() == [7, 7, 7]


def test_import_cvae_stays_cheap_until_the_api_is_used():
    import subprocess
    import sys

    code = ("import sys, cvae; assert 'torch' not in sys.modules, 'torch imported'; "
            "from cvae import CausalModel; assert 'torch' in sys.modules; "
            "import cvae.serve.api; assert CausalModel is cvae.serve.api.CausalModel")
    subprocess.run([sys.executable, "-c", code], check=True)
