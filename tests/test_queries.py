"""Query validation and the pure answer function: schema errors, bad rows, and a fuzz test."""
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTORS, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import encode_png
from cvae.model.factors import FactorSCM
from cvae.serve.queries import QUERY_SCHEMA, QuerySchemaError, answer_queries
from scm_fixtures import tiny_vae

SOURCE = 123456
CLASSES = dict(zip(FACTORS, index_to_classes(np.array([SOURCE]), with_color=False)[0].tolist()))
IMAGE = GroundTruth("render").images(np.array([SOURCE]))[0]


@pytest.fixture(scope="module")
def scm():
    return ImageSCM(tiny_vae(), FactorSCM.uniform(), ground_truth=GroundTruth("render"), device="cpu")


def table(rows: list[dict]) -> pa.Table:
    full = [{name: row.get(name) for name in QUERY_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(full, schema=QUERY_SCHEMA)


VALID = {
    "condition": {"kind": "condition", "given_shape": 1, "num_samples": 2},
    "intervene": {"kind": "intervene", "do_scale": 3, "given_pos_x": 5},
    "counterfactual_index": {"kind": "counterfactual", "source_index": SOURCE, "do_pos_y": 0, "seed": -7},
    "counterfactual_png": {"kind": "counterfactual", "image": encode_png(IMAGE), **CLASSES, "do_shape": 2},
    "counterfactual_raw": {"kind": "counterfactual", "image": IMAGE.astype(np.uint8).tobytes(), **CLASSES},
}

# Each breaker turns a valid row into a bad one; the pattern must appear in its error.
BAD = {
    "null id": (lambda r: {**r, "query_id": None}, "query_id is null"),
    "empty id": (lambda r: {**r, "query_id": ""}, "query_id is empty"),
    "null kind": (lambda r: {**r, "kind": None}, "kind is null"),
    "unknown kind": (lambda r: {**r, "kind": "explain"}, "unknown kind"),
    "negative samples": (lambda r: {**r, "num_samples": -3}, "num_samples must be >= 1"),
    "zero samples": (lambda r: {**r, "num_samples": 0}, "num_samples must be >= 1"),
    "enormous samples": (lambda r: {**r, "num_samples": 10**15}, "exceeds the limit of 8"),
    "do out of range": (lambda r: {**r, "do_orientation": 40}, "do_orientation=40 is out of range"),
    "negative do": (lambda r: {**r, "do_shape": -1}, "do_shape=-1 is out of range"),
    "given out of range": (lambda r: {**r, "kind": "condition", "given_pos_y": 99, "do_scale": None,
                                      "do_pos_y": None, "do_shape": None, "image": None,
                                      "source_index": None, **{f: None for f in FACTORS}},
                           "given_pos_y=99 is out of range"),
    "source out of range": (lambda r: {**r, "kind": "counterfactual", "source_index": 737280, "image": None,
                                       **{f"given_{f}": None for f in FACTORS}}, "source_index=737280 is out of range"),
    "not png": (lambda r: {**r, "kind": "counterfactual", "source_index": None, "image": b"GIF89a" + bytes(10),
                           **CLASSES, **{f"given_{f}": None for f in FACTORS}}, "image: image is neither PNG"),
    "png wrong size": (lambda r: {**r, "kind": "counterfactual", "source_index": None,
                                  "image": encode_png(np.zeros((32, 64))), **CLASSES,
                                  **{f"given_{f}": None for f in FACTORS}}, "expected 64x64"),
    "png not binary": (lambda r: {**r, "kind": "counterfactual", "source_index": None,
                                  "image": _grey_png(), **CLASSES, **{f"given_{f}": None for f in FACTORS}},
                       "not binary"),
    "raw wrong length": (lambda r: {**r, "kind": "counterfactual", "source_index": None, "image": bytes(4095),
                                    **CLASSES, **{f"given_{f}": None for f in FACTORS}}, "4096 raw bytes"),
    "raw not binary": (lambda r: {**r, "kind": "counterfactual", "source_index": None, "image": bytes([2]) * 4096,
                                  **CLASSES, **{f"given_{f}": None for f in FACTORS}}, "not binary"),
    "image and source": (lambda r: {**r, "kind": "counterfactual", "source_index": SOURCE,
                                    "image": encode_png(IMAGE), **CLASSES,
                                    **{f"given_{f}": None for f in FACTORS}}, "not both"),
    "neither": (lambda r: {**r, "kind": "counterfactual", "source_index": None, "image": None,
                           **{f"given_{f}": None for f in FACTORS}}, "needs a factual observation"),
    "factors missing beside image": (lambda r: {**r, "kind": "counterfactual", "source_index": None,
                                                "image": encode_png(IMAGE), **CLASSES, "scale": None,
                                                "pos_x": None, **{f"given_{f}": None for f in FACTORS}},
                                     "missing: scale, pos_x"),
    "observation on condition": (lambda r: {**r, "kind": "condition", "source_index": SOURCE,
                                            **{f"do_{f}": None for f in FACTORS}}, "takes no factual observation"),
    "given on counterfactual": (lambda r: {**r, "kind": "counterfactual", "source_index": SOURCE, "image": None,
                                           **{f: None for f in FACTORS}, "given_scale": 1},
                                "given_* columns are for condition"),
    "do on condition": (lambda r: {**r, "kind": "condition", "image": None, "source_index": None,
                                   **{f: None for f in FACTORS}, "do_shape": 1}, "do_* columns need kind"),
    "clashing evidence": (lambda r: {**r, "kind": "intervene", "image": None, "source_index": None,
                                     **{f: None for f in FACTORS}, "do_scale": 2, "given_scale": 3},
                          "probability zero"),
    "factors disagree with source": (lambda r: {**r, "kind": "counterfactual", "source_index": SOURCE, "image": None,
                                                **{f"given_{f}": None for f in FACTORS},
                                                "shape": (CLASSES["shape"] + 1) % 3}, "disagree with source_index"),
}


def _grey_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_valid_rows_of_every_kind_are_answered(scm):
    rows = [{"query_id": name, **row} for name, row in VALID.items()]
    results, errors = answer_queries(scm, table(rows), max_samples=8)
    assert errors.num_rows == 0, errors.to_pylist()
    counts = {qid: results.column("query_id").to_pylist().count(qid) for qid in VALID}
    assert counts == {"condition": 2, "intervene": 1, "counterfactual_index": 1,
                      "counterfactual_png": 1, "counterfactual_raw": 1}
    by_id = {r["query_id"]: r for r in results.to_pylist()}
    assert by_id["condition"]["shape"] == 1 and by_id["condition"]["factual_shape"] is None
    assert by_id["intervene"]["scale"] == 3 and by_id["intervene"]["pos_x"] == 5
    assert by_id["counterfactual_png"]["shape"] == 2
    assert by_id["counterfactual_png"]["factual_shape"] == CLASSES["shape"]
    assert by_id["counterfactual_index"]["pos_y"] == 0
    # the raw-image row has no intervention: its world is the factual one, its image the factual image
    assert by_id["counterfactual_raw"]["image"] == encode_png(IMAGE)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_row_gets_a_clear_error_and_the_rest_are_answered(scm, name):
    breaker, pattern = BAD[name]
    rows = [{"query_id": "good", **VALID["counterfactual_index"]},
            breaker({"query_id": "bad", **VALID["counterfactual_png"]})]
    results, errors = answer_queries(scm, table(rows), max_samples=8)
    assert results.column("query_id").to_pylist() == ["good"]
    assert errors.num_rows == 1 and pattern in errors.column("error")[0].as_py(), errors.to_pylist()


def test_duplicate_ids_are_all_errors_within_a_batch_and_across_batches(scm):
    rows = [{"query_id": "twice", **VALID["condition"]}, {"query_id": "twice", **VALID["intervene"]},
            {"query_id": "once", **VALID["intervene"]}]
    results, errors = answer_queries(scm, table(rows), max_samples=8)
    assert set(results.column("query_id").to_pylist()) == {"once"}
    assert errors.column("query_id").to_pylist() == ["twice", "twice"]
    # A duplicate in another block is passed in by the engine:
    results, errors = answer_queries(scm, table(rows[2:]), max_samples=8, duplicate_ids={"once"})
    assert results.num_rows == 0 and "more than once" in errors.column("error")[0].as_py()


def test_whole_file_problems_are_schema_errors(scm):
    with pytest.raises(QuerySchemaError, match="missing required column 'kind'"):
        answer_queries(scm, pa.table({"query_id": ["a"]}))
    with pytest.raises(QuerySchemaError, match="'do_shape' must be an integer type, got double"):
        answer_queries(scm, pa.table({"query_id": ["a"], "kind": ["intervene"], "do_shape": [1.0]}))
    with pytest.raises(QuerySchemaError, match="'query_id' must be a string"):
        answer_queries(scm, pa.table({"query_id": [1], "kind": ["condition"]}))
    with pytest.raises(QuerySchemaError, match="'image' must be binary"):
        answer_queries(scm, pa.table({"query_id": ["a"], "kind": ["condition"], "image": ["x"]}))
    with pytest.raises(QuerySchemaError, match="unknown column 'do_shap'"):
        answer_queries(scm, pa.table({"query_id": ["a"], "kind": ["intervene"], "do_shap": [1]}))
    # Narrower integer types and a missing optional column are fine.
    results, errors = answer_queries(scm, pa.table({"query_id": ["a"], "kind": ["intervene"],
                                                    "do_shape": pa.array([1], pa.int8())}))
    assert results.num_rows == 1 and errors.num_rows == 0


# ---------------------------------------------------------------- fuzz

row_strategy = st.tuples(st.sampled_from(sorted(VALID)), st.none() | st.sampled_from(sorted(BAD)),
                         st.integers(1, 3), st.integers(-2**63, 2**63 - 1) | st.none())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(row_strategy, min_size=1, max_size=8), st.lists(st.integers(0, 7), max_size=2))
def test_fuzz_every_row_is_answered_or_reported_exactly_once(scm, specs, duplicated):
    rows, expected_valid = [], {}
    for i, (kind, bad, samples, seed) in enumerate(specs):
        row = {"query_id": f"q{i}", **VALID[kind], "num_samples": samples, "seed": seed}
        if bad is not None:
            row = BAD[bad][0](row)
        rows.append(row)
    for j in duplicated:  # copy an id onto another row
        if j < len(rows) and len(rows) > 1 and rows[j]["query_id"] is not None:
            rows[(j + 1) % len(rows)]["query_id"] = rows[j]["query_id"]
    ids = [r["query_id"] for r in rows]
    for spec, row in zip(specs, rows):
        if spec[1] is None and ids.count(row["query_id"]) == 1:
            expected_valid[row["query_id"]] = row["num_samples"]
    results, errors = answer_queries(scm, table(rows), max_samples=8)
    answered = results.column("query_id").to_pylist()
    assert {q: answered.count(q) for q in set(answered)} == expected_valid
    assert errors.num_rows == len(rows) - len(expected_valid)
    assert all(e and len(e) > 10 for e in errors.column("error").to_pylist())
    assert not set(errors.column("query_id").to_pylist()) & set(expected_valid)
    for sample_ids in ({r["query_id"]: r["sample"] for r in results.to_pylist()},):
        assert all(s >= 0 for s in sample_ids.values())


def test_png_writer_is_exact_and_a_plain_1_bit_png():
    """encode_pngs writes PNGs directly (packbits + zlib): every reader gets the pixels back."""
    import io

    from PIL import Image

    from cvae.data.images import decode_image, encode_pngs

    rng = np.random.default_rng(0)
    sprites = GroundTruth("render").images(rng.integers(0, 737280, 20))
    noise = rng.integers(0, 2, (20, 64, 64)).astype(np.uint8)
    images = np.concatenate([sprites, noise, np.zeros((1, 64, 64), np.uint8), np.ones((1, 64, 64), np.uint8)])
    pngs = encode_pngs(images)
    for png, image in zip(pngs, images):
        assert np.array_equal(decode_image(png), image)
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "1" and im.size == (64, 64)
            assert np.array_equal(np.asarray(im).astype(np.uint8), image)
    assert encode_png(images[0]) == pngs[0]
    assert max(len(p) for p in pngs[:20]) < 300  # sprites compress to a few hundred bytes at most
