"""Bulk query sets: the spec is checked strictly, the rows are what the spec says, streamed
into bounded Parquet files, and the engine's own validation accepts every row."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

import cvae.serve.make_queries as mq
from cvae.data.grid import FACTOR_SIZES, FACTORS, grid_indices, index_to_classes
from cvae.serve.make_queries import SpecError, make_queries, validate_spec
from jobs import make_queries as job
from scm_fixtures import make_checkpoint

TINY_GRID = {"orientation": 10, "pos_x": 4, "pos_y": 4}  # 3*6*4*8*8 = 4,608 sources


def _read(out) -> pa.Table:
    return pads.dataset(str(out), format="parquet").to_table()


def _do(table: pa.Table) -> np.ndarray:
    return np.stack([table[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)


@pytest.mark.parametrize(("spec", "message"), [
    ("not a mapping", r"spec: must be a mapping"),
    ({"sources": {"grid": True}}, r"spec\.interventions: required"),
    ({"interventions": []}, r"spec\.interventions: must be a non-empty list"),
    ({"interventions": [{"factor": "shape"}], "colour": 1}, r"spec\.colour: unknown key"),
    ({"interventions": [{"factor": "size"}]}, r"spec\.interventions\[0\]\.factor: unknown factor 'size'"),
    ({"interventions": [{"factor": "shape", "value": 1}]}, r"spec\.interventions\[0\]\.value: unknown key"),
    ({"interventions": [{"factor": "shape", "values": "every"}]},
     r"spec\.interventions\[0\]\.values: must be one of all, other, random_other"),
    ({"interventions": [{"factor": "shape", "values": [3]}]},
     r"spec\.interventions\[0\]\.values: must be \[0, 2\], got 3"),
    ({"interventions": [{"factor": "shape", "values": True}]}, r"spec\.interventions\[0\]\.values: must be all"),
    ({"interventions": [{"do": {"shape": 1, "scale": 6}}]},
     r"spec\.interventions\[0\]\.do\.scale: must be \[0, 5\], got 6"),
    ({"interventions": [{"do": {}}]}, r"spec\.interventions\[0\]\.do: must be a mapping"),
    ({"interventions": [{"factor": "shape"}], "samples": 0}, r"spec\.samples: must be \[1, "),
    ({"interventions": [{"factor": "shape"}], "samples": True}, r"spec\.samples: must be an integer, got True"),
    ({"interventions": [{"factor": "shape"}], "seed": -3}, r"spec\.seed: must be >= 0"),
    ({"interventions": [{"factor": "shape"}], "rows_per_file": 0}, r"spec\.rows_per_file: must be >= 1"),
    ({"sources": {"grid": True, "split": "test"}, "interventions": [{"factor": "shape"}]},
     r"spec\.sources: give one of grid, split, indices, not grid and split"),
    ({"sources": {"split": "valid"}, "interventions": [{"factor": "shape"}]},
     r"spec\.sources\.split: must be one of train, validation, test, holdout"),
    ({"sources": {"grid": {"angle": 2}}, "interventions": [{"factor": "shape"}]},
     r"spec\.sources\.grid\.angle: unknown factor"),
    ({"sources": {"filter": {"shape": [5]}}, "interventions": [{"factor": "shape"}]},
     r"spec\.sources\.filter\.shape: must be \[0, 2\]"),
    ({"sources": {"indices": [1, 1]}, "interventions": [{"factor": "shape"}]},
     r"spec\.sources\.indices: holds duplicates"),
    ({"sources": {"indices": [737280]}, "interventions": [{"factor": "shape"}]},
     r"spec\.sources\.indices\[0\]: must be \[0, 737279\]"),
    ({"sources": {"sample": 0}, "interventions": [{"factor": "shape"}]}, r"spec\.sources\.sample: must be >= 1"),
    ({"sources": {"sampel": 5}, "interventions": [{"factor": "shape"}]}, r"spec\.sources\.sampel: unknown key"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(SpecError, match=message):
        validate_spec(spec)


def test_every_other_shape_over_a_grid(tmp_path):
    summary = make_queries({"sources": {"grid": TINY_GRID},
                            "interventions": [{"factor": "shape", "values": "other"}]}, tmp_path)
    table = _read(tmp_path)
    sources = grid_indices(TINY_GRID)
    assert summary["num_queries"] == table.num_rows == 2 * len(sources)
    assert summary["num_sources"] == len(sources)
    src = table["source_index"].to_numpy()
    shape = index_to_classes(src, with_color=False)[:, 0]
    do = _do(table)
    assert (do[:, 0] != shape).all() and (do[:, 0] >= 0).all() and (do[:, 1:] == -1).all()
    # each source gets both other shapes exactly once
    pairs = set(zip(src.tolist(), do[:, 0].tolist()))
    assert len(pairs) == table.num_rows
    assert set(np.unique(src)) == set(sources.tolist())
    ids = table["query_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert ids[0] == f"{src[0]}-do_shape={do[0, 0]}"
    assert set(table["kind"].to_pylist()) == {"counterfactual"}
    assert (table["num_samples"].to_numpy() == 1).all()


def test_values_all_fixed_joint_and_random_other(tmp_path):
    spec = {"sources": {"indices": [0, 5000, 400000]}, "seed": 7, "samples": 3, "id_prefix": "t/",
            "interventions": [{"factor": "scale", "values": "all"},
                              {"factor": "orientation", "values": [0, 39]},
                              {"factor": "pos_x", "values": "random_other"},
                              {"do": {"shape": 2, "pos_y": 31}}]}
    summary = make_queries(spec, tmp_path)
    table = _read(tmp_path)
    do = _do(table)
    src = table["source_index"].to_numpy()
    factual = index_to_classes(src, with_color=False)
    assert table.num_rows == 3 * (6 + 2 + 1 + 1)
    assert summary["queries_by_factor"] == {"scale": 18, "orientation": 6, "pos_x": 3, "shape+pos_y": 3}
    # values: all includes the factual value (a null intervention)
    scale_rows = do[:, 1] >= 0
    assert ((do[scale_rows, 1] == factual[scale_rows, 1]).sum()) == 3
    # random_other: another value, in range, reproducible from the seed
    px = do[:, 3] >= 0
    assert (do[px, 3] != factual[px, 3]).all() and (do[px, 3] < 32).all()
    again = make_queries(spec, tmp_path / "again")
    assert _read(tmp_path / "again").equals(table) and again["num_queries"] == summary["num_queries"]
    other_seed = make_queries({**spec, "seed": 8}, tmp_path / "seed8")
    assert other_seed["num_queries"] == summary["num_queries"]
    assert not _read(tmp_path / "seed8")["seed"].equals(table["seed"])
    # joint interventions name every factor, in factor order
    joint = table.filter(pa.array((do[:, 0] >= 0) & (do[:, 4] >= 0)))
    assert joint["query_id"][0].as_py() == "t/0-do_shape=2-do_pos_y=31"
    assert (table["num_samples"].to_numpy() == 3).all()
    assert len(set(table["seed"].to_pylist())) == table.num_rows


def test_overlapping_entries_give_each_query_once(tmp_path):
    make_queries({"sources": {"indices": [10, 20]},
                  "interventions": [{"factor": "shape", "values": "all"},
                                    {"factor": "shape", "values": "other"},
                                    {"factor": "shape", "values": 2}]}, tmp_path)
    table = _read(tmp_path)
    assert table.num_rows == 2 * 3
    assert len(set(table["query_id"].to_pylist())) == 6


def test_filter_and_seeded_sample(tmp_path):
    spec = {"sources": {"grid": TINY_GRID, "filter": {"shape": [2], "scale": [5]}, "sample": 10},
            "seed": 1, "interventions": [{"factor": "shape", "values": 0}]}
    make_queries(spec, tmp_path / "a")
    make_queries(spec, tmp_path / "b")
    make_queries({**spec, "seed": 2}, tmp_path / "c")
    a, b, c = (_read(tmp_path / k)["source_index"].to_numpy() for k in "abc")
    assert len(a) == 10 and len(np.unique(a)) == 10
    assert (a == b).all() and set(a) != set(c)
    classes = index_to_classes(a, with_color=False)
    assert (classes[:, 0] == 2).all() and (classes[:, 1] == 5).all()
    pool = grid_indices(TINY_GRID)
    assert set(a) <= set(pool.tolist())


def test_rows_do_not_depend_on_chunking(tmp_path, monkeypatch):
    spec = {"sources": {"grid": TINY_GRID, "sample": 300}, "seed": 4,
            "interventions": [{"factor": "orientation", "values": "random_other"},
                              {"factor": "shape", "values": "other"}]}
    make_queries(spec, tmp_path / "big")
    monkeypatch.setattr(mq, "CHUNK_ROWS", 7)  # many tiny chunks
    make_queries(spec, tmp_path / "small")
    assert _read(tmp_path / "big").equals(_read(tmp_path / "small"))


def test_files_are_bounded_and_a_rerun_replaces_them(tmp_path, monkeypatch):
    monkeypatch.setattr(mq, "CHUNK_ROWS", 50)
    spec = {"sources": {"grid": TINY_GRID, "sample": 100},
            "interventions": [{"factor": "scale", "values": "all"}], "rows_per_file": 128}
    summary = make_queries(spec, tmp_path)
    files = sorted(tmp_path.glob("part-*.parquet"))
    assert [f.name for f in files] == summary["files"]
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sum(sizes) == 600 and max(sizes) == 128 and len(files) == 5
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    assert json.loads((tmp_path / "_summary.json").read_text())["num_queries"] == 600
    # a smaller set written to the same folder leaves no stale part behind
    make_queries({**spec, "sources": {"indices": [1, 2]}}, tmp_path)
    assert _read(tmp_path).num_rows == 12
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1


def test_sources_from_a_data_split(tmp_path):
    from cvae.config import load_config
    from cvae.data.reader import load_split
    from cvae.data.shards import write_dataset

    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                         {"data.num_shards": 2, "train.num_workers": 1})
    write_dataset(config, tmp_path / "data")
    for split in ("validation", "test", "holdout"):
        out = tmp_path / f"q-{split}"
        make_queries({"sources": {"split": split},
                      "interventions": [{"factor": "shape", "values": "other"}]},
                     f"file://{out}", data_dir=f"file://{tmp_path / 'data'}")
        table = _read(out)
        expected = np.sort(load_split(tmp_path / "data", split)["index"])
        assert np.array_equal(np.unique(table["source_index"].to_numpy()), expected)
        assert table.num_rows == 2 * len(expected)
    with pytest.raises(SpecError, match=r"spec\.sources\.split: needs the data directory"):
        make_queries({"sources": {"split": "test"}, "interventions": [{"factor": "shape"}]}, tmp_path / "x")


def test_values_range_over_the_sources_grid(tmp_path):
    """all / other / random_other stay on the classes of the sources' grid: a split's
    dataset grid, a grid source's strides; indices sources reach every class."""
    from cvae.config import load_config
    from cvae.data.shards import write_dataset

    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                         {"data.num_shards": 2, "train.num_workers": 1})
    strides = config.data.strides
    assert strides.get("orientation", 1) > 1  # the test needs a reduced orientation axis
    write_dataset(config, tmp_path / "data")
    every = [{"factor": f, "values": mode} for f in FACTORS for mode in ("all", "other", "random_other")]
    summary = make_queries({"sources": {"split": "test"}, "interventions": every},
                           tmp_path / "split", data_dir=tmp_path / "data")
    grid_summary = make_queries({"sources": {"grid": strides, "sample": 300}, "interventions": every},
                                tmp_path / "grid")
    for out, s in ((tmp_path / "split", summary), (tmp_path / "grid", grid_summary)):
        table = _read(out)
        do = _do(table)
        factual = index_to_classes(table["source_index"].to_numpy(), with_color=False)
        for i, f in enumerate(FACTORS):
            classes = np.arange(0, FACTOR_SIZES[f], strides.get(f, 1))
            rows = do[:, i] >= 0
            assert set(np.unique(do[rows, i])) == set(classes), f
            assert np.isin(factual[:, i], classes).all()
        assert s["value_classes"] == {f: np.arange(0, FACTOR_SIZES[f], k).tolist()
                                      for f, k in strides.items() if k > 1}
    # The full range for indices, and none of it for a single-class axis.
    make_queries({"sources": {"indices": [0, 1]}, "interventions": [{"factor": "orientation"}]},
                 tmp_path / "idx")
    assert len(np.unique(_do(_read(tmp_path / "idx"))[:, 2])) == 40
    with pytest.raises(SpecError, match=r"interventions\[0\]\.values: the sources' grid has a single shape"):
        make_queries({"sources": {"grid": {"shape": 3}}, "interventions": [{"factor": "shape", "values": "other"}]},
                     tmp_path / "one")


def test_the_engine_accepts_every_row(tmp_path):
    """The query module's own checks pass on generated rows: no error rows at all."""
    from cvae.causal.image import ImageSCM
    from cvae.serve.queries import answer_queries, check_schema

    make_queries({"sources": {"indices": [3, 77777, 500000]}, "samples": 2,
                  "interventions": [{"factor": "shape", "values": "other"},
                                    {"factor": "pos_y", "values": "random_other"},
                                    {"do": {"scale": 0, "orientation": 20}}]}, tmp_path / "q")
    table = _read(tmp_path / "q")
    check_schema(table.schema)
    scm = ImageSCM.from_checkpoint(make_checkpoint(tmp_path / "ckpt"))
    results, errors = answer_queries(scm, table)
    assert errors.num_rows == 0
    assert results.num_rows == 2 * table.num_rows
    # the counterfactual world holds the do values
    by_id = dict(zip(table["query_id"].to_pylist(), _do(table).tolist()))
    for qid, *world in zip(results["query_id"].to_pylist(), *(results[f].to_pylist() for f in FACTORS)):
        for j, v in enumerate(by_id[qid]):
            if v >= 0:
                assert world[j] == v


def test_cli(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"sources": {"indices": [1, 2, 3]},
                                    "interventions": [{"factor": "shape", "values": "other"}]}))
    assert job.main(["--spec", str(spec), "--out", str(tmp_path / "q")]) == 0
    assert "wrote 6 queries from 3 sources" in capsys.readouterr().out
    spec.write_text(yaml.safe_dump({"interventions": [{"factor": "hue"}]}))
    assert job.main(["--spec", str(spec), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and "spec.interventions[0].factor: unknown factor 'hue'" in err
    assert not (tmp_path / "bad").exists()
    assert job.main(["--spec", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "m")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_factor_sizes_cover_all_values(tmp_path):
    """values: all over every factor gives exactly size rows per source."""
    summary = make_queries({"sources": {"indices": [12345]},
                            "interventions": [{"factor": f, "values": "all"} for f in FACTORS]}, tmp_path)
    assert summary["num_queries"] == sum(FACTOR_SIZES.values())


def test_values_factual_is_the_null_intervention(tmp_path):
    spec = {"sources": {"indices": [0, 5000, 400000]},
            "interventions": [{"factor": "scale", "values": "factual"},
                              {"factor": "shape", "values": "random_other"}]}
    make_queries(spec, tmp_path)
    table = _read(tmp_path)
    do = _do(table)
    factual = index_to_classes(table["source_index"].to_numpy(), with_color=False)
    null = do[:, 1] >= 0
    assert null.sum() == 3 and (do[null, 1] == factual[null, 1]).all()
    assert (do[~null, 0] != factual[~null, 0]).all()
