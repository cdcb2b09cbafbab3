"""Sharded HDF5: exact round trip, the split, the reader across ranks, atomic writes,
and damaged data (flipped byte, truncated file, manifest mismatch) as clear errors."""
import json
import os
import re

import h5py
import numpy as np
import pytest

import cvae.data.shards as shards_module
from cvae.config import ConfigError, load_config
from cvae.data.grid import classes_to_index, classes_to_values, factor_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.reader import ShardReader, load_split
from cvae.data.render import render
from cvae.data.shards import (
    MANIFEST,
    SPLITS,
    holdout_mask,
    read_manifest,
    split_rows,
    split_shards,
    verify_dataset,
    write_dataset,
)
from cvae.errors import DataError
from cvae.model.factors import dataset_scm
from jobs.prepare_data import main as prepare_data

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def config():
    return load_config(TINY)


@pytest.fixture(scope="module")
def dataset(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "data"
    return out, write_dataset(config, out)


def copy_dataset(dataset, tmp_path):
    """A private copy to damage."""
    src, _ = dataset
    dst = tmp_path / "data"
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_manifest_and_shard_layout(config, dataset):
    out, manifest = dataset
    assert read_manifest(out) == manifest
    grid = factor_classes(config.data.strides)
    assert manifest["grid"]["rows"] == len(grid) == 4608
    assert sum(manifest["counts"].values()) == len(grid)
    total = manifest["num_shards"]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([MANIFEST] + [f"shard-{i:05d}-of-{total:05d}.h5" for i in range(total)])
    # Global numbering: train shards first (num_shards of them), then validation, test, holdout.
    splits = [e["split"] for e in manifest["shards"]]
    assert SPLITS == ("train", "validation", "test", "holdout")
    assert splits == sorted(splits, key=SPLITS.index)
    assert splits.count("train") == config.data.num_shards
    assert all(splits.count(s) >= 1 for s in ("validation", "test", "holdout"))
    assert list(manifest["counts"]) == list(SPLITS)
    assert manifest["validation_fraction"] == config.data.validation_fraction == 0.05
    assert [e["file"] for e in manifest["shards"]] == [f"shard-{i:05d}-of-{total:05d}.h5" for i in range(total)]
    for entry in manifest["shards"]:
        with h5py.File(out / entry["file"], "r") as f:
            n = entry["rows"]
            assert (f["imgs"].shape, f["imgs"].dtype) == ((n, 64, 64), np.uint8)
            assert (f["latents/classes"].shape, f["latents/classes"].dtype) == ((n, 6), np.int64)
            assert (f["latents/values"].shape, f["latents/values"].dtype) == ((n, 6), np.float64)
            assert (f["index"].shape, f["index"].dtype) == ((n,), np.int64)
            for name in ("imgs", "latents/classes", "latents/values", "index"):
                ds = f[name]
                assert ds.chunks[0] == min(config.data.chunk_rows, n)
                assert ds.compression == "lzf" and ds.fletcher32
            classes = f["latents/classes"][()]
            np.testing.assert_array_equal(f["index"][()], classes_to_index(classes))
            np.testing.assert_array_equal(f["latents/values"][()], classes_to_values(classes))
            np.testing.assert_array_equal(f["imgs"][()], render(classes[:, 1:]))
            assert f.attrs["split"] == entry["split"]


def test_every_row_once_and_the_split(config, dataset):
    out, manifest = dataset
    got = {s: load_split(out, s) for s in SPLITS}
    index = np.concatenate([g["index"] for g in got.values()])
    grid = classes_to_index(factor_classes(config.data.strides))
    assert len(index) == len(grid) and set(index) == set(grid)  # every row exactly once
    for split, g in got.items():
        assert len(g["index"]) == manifest["counts"][split]
        np.testing.assert_array_equal(classes_to_index(g["classes"]), g["index"])
    # Held out: exactly the rows the rule names (shape 2, scale 5, pos_x 28).
    held = got["holdout"]["classes"]
    assert (held[:, 0] == 2).all() and (held[:, 1] == 5).all() and (held[:, 3] == 28).all()
    all_classes = np.concatenate([g["classes"] for g in got.values()])
    assert holdout_mask(all_classes, config.data.holdout).sum() == len(held)
    rest = len(grid) - len(held)
    assert len(got["test"]["index"]) == round(config.data.test_fraction * rest)
    assert len(got["validation"]["index"]) == round(config.data.validation_fraction * rest)
    # A seeded random order: shard rows are not in grid order.
    assert not (np.diff(got["train"]["index"]) > 0).all()
    assert load_split(out, "train", limit=10)["imgs"].shape == (10, 64, 64)


def test_validation_is_seeded_disjoint_from_test_and_optional():
    classes = factor_classes({"orientation": 10, "pos_x": 4, "pos_y": 4})
    holdout = [{"shape": [2], "scale": [5]}]
    rows = split_rows(classes, 0.1, holdout, seed=0, validation_fraction=0.2)
    rest = len(classes) - holdout_mask(classes, holdout).sum()
    assert (len(rows["test"]), len(rows["validation"])) == (round(0.1 * rest), round(0.2 * rest))
    everything = np.concatenate([rows[s] for s in SPLITS])
    assert len(everything) == len(set(everything)) == len(classes)  # disjoint, every row once
    assert not holdout_mask(classes[rows["validation"]], holdout).any()
    # Seeded: the same seed draws the same rows, another seed others; the test rows do not
    # depend on the validation fraction, and 0 means no validation split.
    again = split_rows(classes, 0.1, holdout, seed=0, validation_fraction=0.2)
    assert all(np.array_equal(rows[s], again[s]) for s in SPLITS)
    other = split_rows(classes, 0.1, holdout, seed=1, validation_fraction=0.2)
    assert set(rows["validation"]) != set(other["validation"])
    none = split_rows(classes, 0.1, holdout, seed=0, validation_fraction=0.0)
    assert len(none["validation"]) == 0 and np.array_equal(none["test"], rows["test"])


def test_no_validation_split_and_old_manifests(config, tmp_path):
    from cvae.serve.make_queries import SpecError, split_indices

    config.data.validation_fraction = 0.0
    try:
        manifest = write_dataset(config, tmp_path / "none")
    finally:
        config.data.validation_fraction = 0.05
    assert manifest["counts"]["validation"] == 0
    assert "validation" not in {e["split"] for e in manifest["shards"]}
    assert split_shards(manifest, "validation") == []
    with pytest.raises(SpecError, match="no 'validation' rows"):
        split_indices(tmp_path / "none", "validation")
    # A manifest written before the validation split: no counts.validation, no such shards.
    edit_manifest(tmp_path / "none", lambda m: (m["counts"].pop("validation"),
                                                m.pop("validation_fraction")))
    old = verify_dataset(tmp_path / "none")
    assert old["counts"] == {**manifest["counts"], "validation": 0}
    assert len(load_split(tmp_path / "none", "validation")["index"]) == 0


def test_holdout_rules_are_or_of_ands():
    classes = np.array([[2, 5, 0, 28, 0], [2, 4, 0, 28, 0], [0, 0, 3, 0, 0], [1, 0, 3, 0, 0]])
    rules = [{"shape": [2], "scale": [5], "pos_x": [28]}, {"orientation": [3], "shape": [0, 2]}]
    np.testing.assert_array_equal(holdout_mask(classes, rules), [True, False, True, False])


def test_same_seed_same_files_other_seed_other_split(config, dataset, tmp_path):
    out, manifest = dataset
    # Same rows in the same shards in the same order. (Not always the same bytes: the
    # lzf filter's output may differ between runs, as it does not clear its hash table.)
    again = write_dataset(config, tmp_path / "again")
    assert [(e["file"], e["split"], e["rows"]) for e in again["shards"]] == \
        [(e["file"], e["split"], e["rows"]) for e in manifest["shards"]]
    for entry in manifest["shards"]:
        with h5py.File(out / entry["file"], "r") as a, h5py.File(tmp_path / "again" / entry["file"], "r") as b:
            np.testing.assert_array_equal(a["index"][()], b["index"][()])
            np.testing.assert_array_equal(a["imgs"][()], b["imgs"][()])
    config.seed = 1
    try:
        write_dataset(config, tmp_path / "other")
    finally:
        config.seed = 0
    a = load_split(out, "test")["index"]
    b = load_split(tmp_path / "other", "test")["index"]
    assert set(a) != set(b)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_reader_covers_every_row_once_per_epoch_across_ranks(dataset, world_size):
    out, manifest = dataset
    readers = [ShardReader(out, "train", rank, world_size, batch_size=64, seed=3, shuffle_buffer=500)
               for rank in range(world_size)]
    assert len({r.num_batches for r in readers}) == 1
    assert sum(r.num_rows for r in readers) == manifest["counts"]["train"]
    train = load_split(out, "train")["index"]
    orders = []
    for epoch in range(2):
        seen = []
        for r in readers:
            batches = list(r.epoch(epoch))
            assert len(batches) == r.num_batches == len(r)  # every rank steps together
            sizes = [len(b) for b in batches]
            assert max(sizes) <= 64 and max(sizes) - min(sizes) <= 1 and sum(sizes) == r.num_rows
            for b in batches:
                assert b.images.dtype.is_floating_point is False and b.images.shape[1:] == (64, 64)
                assert b.classes.shape[1] == 5 and str(b.classes.dtype) == "torch.int64"
                np.testing.assert_array_equal(classes_to_index(b.classes.numpy()), b.index.numpy())
            # Images match their rows.
            np.testing.assert_array_equal(batches[0].images.numpy(), render(batches[0].classes.numpy()))
            seen.append(np.concatenate([b.index.numpy() for b in batches]))
        everything = np.concatenate(seen)
        assert len(everything) == len(train) and set(everything) == set(train)
        orders.append(everything)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    # The same (seed, epoch, rank) gives the same stream.
    first = [b.index.numpy() for b in readers[0].epoch(1)]
    np.testing.assert_array_equal(np.concatenate(first), orders[1][:readers[0].num_rows])


def test_reader_shuffles_across_chunks_and_shards(dataset):
    out, manifest = dataset
    reader = ShardReader(out, batch_size=256, shuffle_buffer=2048)
    first = next(iter(reader.epoch(0))).index.numpy()
    shard_of = {}
    for s, entry in enumerate(split_shards(manifest, "train")):
        with h5py.File(out / entry["file"], "r") as f:
            for i in f["index"][()]:
                shard_of[i] = s
    assert len({shard_of[i] for i in first}) > 1


def test_reader_rank_and_shard_count_errors(dataset):
    out, manifest = dataset
    with pytest.raises(DataError, match="fewer than world_size 5"):
        ShardReader(out, "train", 0, 5)
    # Evaluation splits may leave a rank without shards: it yields nothing.
    test_shards = len(split_shards(manifest, "test"))
    idle = ShardReader(out, "test", rank=test_shards, world_size=test_shards + 1)
    assert idle.num_rows == 0 and list(idle.epoch(0)) == []
    with pytest.raises(ValueError, match="rank"):
        ShardReader(out, "train", 2, 2)


def test_ground_truth_from_manifest(dataset):
    out, manifest = dataset
    truth = GroundTruth.from_manifest(manifest)
    test = load_split(out, "test", limit=50)
    np.testing.assert_array_equal(truth.images(test["index"]), test["imgs"])


# --- atomic writes -----------------------------------------------------------------------

def test_interrupted_write_leaves_no_manifest_and_no_partial_shard(config, dataset, tmp_path, monkeypatch):
    out = copy_dataset(dataset, tmp_path)
    (out / ".shard-00000-of-00006.h5.tmp-12345").write_bytes(b"left by a killed run")
    real_render = shards_module.render
    calls = {"n": 0}

    def failing_render(classes):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of the third shard
            raise KeyboardInterrupt("interrupted")
        return real_render(classes)

    monkeypatch.setattr(shards_module, "render", failing_render)
    config.data.chunk_rows = 16  # several render calls per shard
    try:
        with pytest.raises(KeyboardInterrupt):
            write_dataset(config, out)
    finally:
        config.data.chunk_rows = 256
    assert not (out / MANIFEST).exists()  # the old manifest went before any shard changed
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(out)
    names = [p.name for p in out.iterdir()]
    assert not any(re.search(rf"\.tmp-{os.getpid()}$", n) for n in names)  # our temp file removed
    # A complete rerun gives a valid dataset and removes what the killed run left.
    monkeypatch.setattr(shards_module, "render", real_render)
    write_dataset(config, out)
    verify_dataset(out, read_rows=True)
    assert not any(".tmp-" in p.name for p in out.iterdir())


def test_rewrite_with_fewer_shards_removes_stale_shards(config, dataset, tmp_path):
    out = copy_dataset(dataset, tmp_path)
    config.data.num_shards = 2
    try:
        manifest = write_dataset(config, out)
    finally:
        config.data.num_shards = 4
    files = sorted(p.name for p in out.glob("shard-*.h5"))
    assert files == sorted(e["file"] for e in manifest["shards"])
    verify_dataset(out)


# --- damaged data ------------------------------------------------------------------------

def first_train_shard(out):
    return out / split_shards(read_manifest(out), "train")[0]["file"]


def flip_byte_in_first_image_chunk(path):
    with h5py.File(path, "r") as f:
        info = f["imgs"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_byte_is_caught_by_sha256_and_by_fletcher32(dataset, tmp_path):
    out = copy_dataset(dataset, tmp_path)
    shard = first_train_shard(out)
    flip_byte_in_first_image_chunk(shard)
    for check in (lambda: verify_dataset(out), lambda: ShardReader(out, verify=True),
                  lambda: load_split(out, "train")):
        with pytest.raises(DataError, match=re.escape(str(shard)) + ".*sha256"):
            check()
    # Without the sha256 pass, HDF5's per-chunk fletcher32 catches it on read.
    reader = ShardReader(out, verify=False)
    with pytest.raises(DataError, match=re.escape(str(shard)) + ".*cannot read rows"):
        for _ in reader.epoch(0):
            pass
    with pytest.raises(DataError, match=re.escape(str(shard))):
        load_split(out, "train", verify=False)


def test_truncated_shard(dataset, tmp_path):
    out = copy_dataset(dataset, tmp_path)
    shard = first_train_shard(out)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(str(shard)) + ".*truncated"):
        verify_dataset(out)
    with pytest.raises(DataError, match=re.escape(str(shard))):
        ShardReader(out, verify=False)  # not even a readable HDF5 file now


def edit_manifest(out, change):
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_that_disagrees_with_its_shards(dataset, tmp_path):
    out = copy_dataset(dataset, tmp_path)
    shard = first_train_shard(out)

    def more_rows(m):  # a row count the shard does not have (counts kept consistent)
        m["shards"][0]["rows"] += 1
        m["counts"]["train"] += 1

    edit_manifest(out, more_rows)
    with pytest.raises(DataError, match=re.escape(str(shard)) + ".*manifest"):
        verify_dataset(out)
    with pytest.raises(DataError, match=re.escape(str(shard))):
        ShardReader(out)

    out2 = copy_dataset(dataset, tmp_path / "b")
    edit_manifest(out2, lambda m: m["shards"][0].update(sha256="0" * 64))
    with pytest.raises(DataError, match=re.escape(str(first_train_shard(out2))) + ".*sha256"):
        verify_dataset(out2)

    out3 = copy_dataset(dataset, tmp_path / "c")
    missing = first_train_shard(out3)
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*missing"):
        verify_dataset(out3)
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*missing"):
        ShardReader(out3)

    out4 = copy_dataset(dataset, tmp_path / "d")
    edit_manifest(out4, lambda m: m["counts"].update(train=1))
    with pytest.raises(DataError, match=re.escape(str(out4 / MANIFEST)) + ".*counts.train"):
        read_manifest(out4)
    (out4 / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match=re.escape(str(out4 / MANIFEST))):
        read_manifest(out4)


# --- configs and the job -----------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ({"data.test_fraction": 1.5}, "config.data.test_fraction"),
    ({"data.validation_fraction": 1.0}, "config.data.validation_fraction"),
    ({"data.test_fraction": 0.6, "data.validation_fraction": 0.4}, "config.data.validation_fraction"),
    ({"data.compression": "zstd"}, "config.data.compression"),
    ({"data.num_shards": 0}, "config.data.num_shards"),
    ({"data.strides": {"colour": 2}}, "config.data.strides.colour"),
    ({"data.holdout": [{"shape": [3]}]}, "config.data.holdout[0].shape"),
    ({"data.shards": 3}, "config.data.shards"),
    ({"data.chunk_rows": "big"}, "config.data.chunk_rows"),
    ({"data.generator": "import"}, "config.data.official_path"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(TINY, override)


def test_prepare_data_job(tmp_path, capsys):
    assert prepare_data(["--config", TINY, "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "4608 rows" in out and "train" in out
    verify_dataset(tmp_path / "d")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  test_fraction: 1.5\n")
    assert prepare_data(["--config", str(bad), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "config.data.test_fraction" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_scm_generator_needs_samples(config, tmp_path):
    config.data.generator = "scm"
    try:
        with pytest.raises(ConfigError, match="config.data.scm_samples"):
            write_dataset(config, tmp_path / "scm")
    finally:
        config.data.generator = "render"


def test_scm_generator_samples_the_causal_factors(tmp_path):
    from scm_fixtures import CAUSAL_EDGES, causal_tables

    config = load_config(TINY, {
        "data.generator": "scm", "data.scm_samples": 3000, "data.holdout": [],
        "scm.edges": [list(e) for e in CAUSAL_EDGES], "scm.tables": "given",
        "scm.given": {f: t.tolist() for f, t in causal_tables().items()}})
    manifest = write_dataset(config, tmp_path / "scm", factor_scm=dataset_scm(config))
    assert manifest["generator"] == "scm" and manifest["scm"]["tables"] == "given"
    assert sum(manifest["counts"].values()) == 3000
    rows = {s: load_split(tmp_path / "scm", s) for s in ("train", "test")}
    classes = np.concatenate([r["classes"] for r in rows.values()])
    # shape -> scale: hearts (2) are mostly large, squares (0) mostly small.
    assert classes[classes[:, 0] == 2, 1].mean() > 3.5 > 1.5 > classes[classes[:, 0] == 0, 1].mean()
    np.testing.assert_array_equal(rows["test"]["imgs"], render(rows["test"]["classes"]))
    truth = GroundTruth.from_manifest(manifest)
    np.testing.assert_array_equal(truth.images(rows["test"]["index"]), rows["test"]["imgs"])
    config.scm.tables, config.scm.given = "fit", {}
    with pytest.raises(ConfigError, match="config.scm"):  # tables counted from data it has not drawn yet
        write_dataset(config, tmp_path / "fit", factor_scm=dataset_scm(config))


def test_datasets_of_an_older_renderer_are_refused_by_name(tmp_path):
    """A manifest records the renderer version; ground truth (evaluation, and checkpoints
    that carry their manifest) refuses data drawn by another version, naming both."""
    from cvae.data.groundtruth import GroundTruth
    from cvae.data.render import RENDERER_VERSION

    manifest = write_dataset(load_config(TINY, {"data.strides": {"orientation": 40, "pos_x": 8, "pos_y": 8}}),
                             tmp_path / "data")
    assert manifest["renderer"] == RENDERER_VERSION
    GroundTruth.from_manifest(manifest)  # the current version is accepted
    old = {k: v for k, v in manifest.items() if k != "renderer"}  # as version 1 wrote it
    with pytest.raises(DataError, match=f"renderer version 1, this cvae draws version {RENDERER_VERSION}"):
        GroundTruth.from_manifest(old)
