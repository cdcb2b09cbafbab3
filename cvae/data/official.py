"""The official dSprites files: `dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`
(`imgs`, `latents_values`, `latents_classes`, `metadata`) and its HDF5 twin (`imgs`,
`latents/classes`, `latents/values`).

A file is validated on load: the arrays the layout needs, their shapes and dtypes, classes
inside the grid, values that agree with the classes, unique rows. Rows are taken as the
file lists them, with their own classes: a file may hold any subset of the grid in any
order. The npz's `metadata` is a pickle in the official file; it is never loaded
(allow_pickle=False), so an npz cannot run code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cvae.data.grid import IMAGE_SIZE, LATENT_SIZES, LATENTS, classes_to_index, classes_to_values
from cvae.errors import DataError

OFFICIAL_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64"
NPZ_KEYS = ("imgs", "latents_classes", "latents_values")
HDF5_KEYS = ("imgs", "latents/classes", "latents/values")
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass
class OfficialData:
    """The rows of an official-layout file, in file order."""
    path: str
    imgs: np.ndarray  # (n, 64, 64) uint8 0/1
    classes: np.ndarray  # (n, 6) int64 latent classes (color first)
    values: np.ndarray  # (n, 6) float64 latent values

    @property
    def index(self) -> np.ndarray:
        """Official grid index of every row."""
        return classes_to_index(self.classes)


def file_kind(path: str | Path) -> str:
    """'npz' or 'hdf5', from the file's first bytes (the suffix may lie)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: official dSprites file not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head == _HDF5_MAGIC:
        return "hdf5"
    raise DataError(f"{path}: neither an .npz (zip) nor an HDF5 file")


def load_official(path: str | Path) -> OfficialData:
    """Read and validate an official-layout .npz or HDF5 file (all rows, into memory)."""
    path = Path(path)
    kind = file_kind(path)
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in NPZ_KEYS if k not in npz.files]
                if missing:
                    raise DataError(f"{path}: missing array(s) {missing}; an official dSprites "
                                    f".npz has {list(NPZ_KEYS) + ['metadata']}")
                imgs, classes, values = (npz[k] for k in NPZ_KEYS)
        else:
            with h5py.File(path, "r") as f:
                missing = [k for k in HDF5_KEYS if k not in f]
                if missing:
                    raise DataError(f"{path}: missing dataset(s) {missing}; an official dSprites "
                                    f"HDF5 file has {list(HDF5_KEYS)}")
                imgs, classes, values = (f[k][()] for k in HDF5_KEYS)
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # a damaged zip / HDF5, or a pickled array
        raise DataError(f"{path}: cannot read the official {kind} file: {exc}") from None
    return OfficialData(str(path), *_validate(path, imgs, classes, values))


def _validate(path: Path, imgs, classes, values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    name_c, name_v = ("latents_classes", "latents_values")
    if imgs.ndim != 3 or imgs.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: imgs must have shape (n, 64, 64), got {imgs.shape}")
    n = imgs.shape[0]
    if not (imgs.dtype == np.bool_ or np.issubdtype(imgs.dtype, np.integer)):
        raise DataError(f"{path}: imgs must be uint8 0/1, got dtype {imgs.dtype}")
    if n and (imgs.max() > 1 or imgs.min() < 0):
        raise DataError(f"{path}: imgs must be binary (0/1), found values outside {{0, 1}}")
    for name, arr in ((name_c, classes), (name_v, values)):
        if arr.shape != (n, len(LATENTS)):
            raise DataError(f"{path}: {name} must have shape ({n}, {len(LATENTS)}) "
                            f"(one row per image: {', '.join(LATENTS)}), got {arr.shape}")
    if not np.issubdtype(classes.dtype, np.integer):
        raise DataError(f"{path}: {name_c} must be integers, got dtype {classes.dtype}")
    classes = classes.astype(np.int64)
    for i, (latent, size) in enumerate(zip(LATENTS, LATENT_SIZES)):
        col = classes[:, i]
        if n and (col.min() < 0 or col.max() >= size):
            raise DataError(f"{path}: {name_c} column {i} ({latent}) must be in [0, {size}), "
                            f"got values in [{col.min()}, {col.max()}]")
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isclose(values, classes_to_values(classes), rtol=0, atol=1e-5)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{path}: {name_v} disagree with {name_c}: row {row}, {LATENTS[col]} "
                        f"has value {values[row, col]!r} but class {classes[row, col]}")
    index = classes_to_index(classes)
    if len(np.unique(index)) != n:
        raise DataError(f"{path}: the same latent classes appear on more than one row")
    return imgs.astype(np.uint8, copy=False), classes, values


def write_official(path: str | Path, imgs: np.ndarray, classes: np.ndarray) -> Path:
    """Write rows in the official layout: .npz (by suffix) or HDF5 (anything else).

    For tests and for users who want a file like the official one; the npz metadata is
    stored as a JSON string, not a pickle.
    """
    path = Path(path)
    classes = np.asarray(classes, dtype=np.int64)
    values = classes_to_values(classes)
    imgs = np.asarray(imgs, dtype=np.uint8)
    if path.suffix == ".npz":
        metadata = json.dumps({"latents_names": LATENTS, "latents_sizes": LATENT_SIZES,
                               "title": "dSprites (official layout, written by cvae)"})
        np.savez_compressed(path, imgs=imgs, latents_classes=classes, latents_values=values,
                            metadata=np.array(metadata))
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("imgs", data=imgs, compression="gzip")
            f.create_dataset("latents/classes", data=classes)
            f.create_dataset("latents/values", data=values)
    return path
