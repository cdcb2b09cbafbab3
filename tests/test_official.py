"""Import of files in the official dSprites layout (.npz and HDF5), on small files."""
import h5py
import numpy as np
import pytest

from cvae.config import load_config
from cvae.data.grid import NUM_IMAGES, classes_to_index, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.official import load_official, write_official
from cvae.data.reader import load_split
from cvae.data.shards import read_manifest, write_dataset
from cvae.errors import DataError

N = 300


@pytest.fixture(scope="module")
def rows():
    """A subset of the grid in a scrambled order, with images that are NOT the renderer's
    (random bits), so a test can tell the file's images from rendered ones."""
    rng = np.random.default_rng(7)
    index = rng.choice(NUM_IMAGES, N, replace=False)
    imgs = (rng.random((N, 64, 64)) < 0.3).astype(np.uint8)
    return index, index_to_classes(index), imgs


@pytest.fixture(params=["npz", "hdf5"])
def official_file(request, rows, tmp_path):
    index, classes, imgs = rows
    return write_official(tmp_path / f"dsprites.{request.param}", imgs, classes)


def test_load_keeps_the_files_rows_and_classes(official_file, rows):
    index, classes, imgs = rows
    data = load_official(official_file)
    np.testing.assert_array_equal(data.classes, classes)
    np.testing.assert_array_equal(data.index, index)
    np.testing.assert_array_equal(data.imgs, imgs)
    assert data.imgs.dtype == np.uint8 and data.values.dtype == np.float64


def test_import_generator_writes_the_files_images(official_file, rows, tmp_path):
    index, _, imgs = rows
    config = load_config("configs/tiny.yaml", {
        "data.generator": "import", "data.official_path": str(official_file),
        "data.strides": {}, "data.holdout": [], "data.num_shards": 3})
    out = tmp_path / "data"
    manifest = write_dataset(config, out)
    assert manifest["generator"] == "import" and manifest["grid"]["rows"] == N
    got = {s: load_split(out, s) for s in ("train", "validation", "test")}
    all_index = np.concatenate([g["index"] for g in got.values()])
    assert sorted(all_index) == sorted(index)  # every row of the file, once
    by_index = dict(zip(index, imgs))
    for g in got.values():
        for i, img, c in zip(g["index"], g["imgs"], g["classes"]):
            np.testing.assert_array_equal(img, by_index[i])
            assert classes_to_index(c[None])[0] == i
    # Ground truth for an imported dataset is the file's image of each index.
    truth = GroundTruth.from_manifest(read_manifest(out))
    np.testing.assert_array_equal(truth.images(index[::-1]), imgs[::-1])
    missing = np.setdiff1d(np.arange(N + 1), index)[:1]
    with pytest.raises(DataError, match="no row for official index"):
        truth.images(missing)


def test_strides_filter_imported_rows(official_file, rows, tmp_path):
    index, classes, _ = rows
    config = load_config("configs/tiny.yaml", {
        "data.generator": "import", "data.official_path": str(official_file),
        "data.strides": {"pos_x": 2}, "data.holdout": [], "data.test_fraction": 0.0,
        "data.validation_fraction": 0.0})
    manifest = write_dataset(config, tmp_path / "data")
    assert manifest["counts"]["train"] == int((classes[:, 4] % 2 == 0).sum())


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_layout_errors_are_clear(rows, tmp_path):
    index, classes, imgs = rows
    values = load_official(write_official(tmp_path / "ok.npz", imgs, classes)).values
    good = dict(imgs=imgs, latents_classes=classes, latents_values=values)
    cases = [
        (dict(imgs=imgs, latents_classes=classes), "missing array.*latents_values"),
        ({**good, "imgs": imgs[:, :32]}, r"imgs must have shape \(n, 64, 64\)"),
        ({**good, "imgs": imgs * 255}, "binary"),
        ({**good, "imgs": imgs.astype(np.float32)}, "uint8"),
        ({**good, "latents_classes": classes[:, 1:]}, r"latents_classes must have shape \(300, 6\)"),
        ({**good, "latents_classes": classes + np.array([0, 3, 0, 0, 0, 0])}, r"column 1 \(shape\)"),
        ({**good, "latents_values": values + 0.5}, "latents_values disagree"),
        ({**good, "latents_classes": np.repeat(classes[:1], N, 0),
          "latents_values": np.repeat(values[:1], N, 0)}, "more than one row"),
        ({**good, "metadata": np.array([{"pickled": True}], dtype=object)}, None),
    ]
    for i, (arrays, message) in enumerate(cases):
        path = _npz(tmp_path / f"bad{i}.npz", **arrays)
        if message is None:  # an extra pickled array is never loaded: the file is fine
            assert len(load_official(path).imgs) == N
            continue
        with pytest.raises(DataError, match=message) as err:
            load_official(path)
        assert str(path) in str(err.value)


def test_pickled_arrays_are_refused(rows, tmp_path):
    _, classes, imgs = rows
    path = _npz(tmp_path / "pickled.npz", imgs=imgs, latents_classes=classes.astype(object),
                latents_values=np.zeros((N, 6)))
    with pytest.raises(DataError, match="pickled.npz"):
        load_official(path)


def test_hdf5_and_file_kind_errors(rows, tmp_path):
    _, classes, imgs = rows
    path = tmp_path / "partial.hdf5"
    with h5py.File(path, "w") as f:
        f["imgs"] = imgs
        f["latents/classes"] = classes
    with pytest.raises(DataError, match="missing dataset.*latents/values"):
        load_official(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a dataset at all")
    with pytest.raises(DataError, match="neither an .npz"):
        load_official(junk)
    with pytest.raises(DataError, match="not found"):
        load_official(tmp_path / "absent.npz")
    truncated = tmp_path / "truncated.hdf5"
    good = write_official(tmp_path / "good.hdf5", imgs, classes).read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated.hdf5"):
        load_official(truncated)


def test_a_rendered_grid_imported_in_the_official_layout_is_the_rendered_dataset(tmp_path):
    """The faithful renderer's grid written as an official-layout npz and imported gives
    the very dataset that `generator: render` writes (same rows, splits, images), so a
    config trains on it exactly as on rendered data."""
    from cvae.data.grid import factor_classes
    from cvae.data.render import render

    strides = {"orientation": 10, "pos_x": 4, "pos_y": 4}
    classes = factor_classes(strides)
    with_color = np.column_stack([np.zeros(len(classes), np.int64), classes])
    official = write_official(tmp_path / "dsprites.npz", render(classes), with_color)
    rendered = write_dataset(load_config("configs/tiny.yaml"), tmp_path / "rendered")
    imported = write_dataset(load_config("configs/tiny.yaml", {
        "data.generator": "import", "data.official_path": str(official)}), tmp_path / "imported")
    assert rendered["counts"] == imported["counts"]
    for split in ("train", "validation", "test", "holdout"):
        a, b = load_split(tmp_path / "rendered", split), load_split(tmp_path / "imported", split)
        order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
        np.testing.assert_array_equal(a["index"][order_a], b["index"][order_b])
        np.testing.assert_array_equal(a["imgs"][order_a], b["imgs"][order_b])
