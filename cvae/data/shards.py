"""dSprites as sharded HDF5: the writer, the manifest, and integrity checks.

Layout (docs/data.md is the record): `<data_dir>/manifest.json` plus
`shard-XXXXX-of-YYYYY.h5`, numbered globally across splits (train shards first, then
validation, test, holdout; YYYYY is the total). Each shard mirrors the official HDF5 names,
`imgs` uint8 (n,64,64), `latents/classes` int64 (n,6), `latents/values` float64 (n,6),
and adds `index` int64 (n,), the row's official index. Every dataset is chunked,
compressed and carries HDF5's fletcher32 checksum per chunk; the manifest holds a sha256
per shard. Shards are written to temp files and renamed, the manifest last, so a
manifest never names a partial shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from cvae.data.grid import (
    FACTORS,
    IMAGE_SIZE,
    LATENT_SIZES,
    LATENTS,
    classes_to_index,
    classes_to_values,
    factor_classes,
    rule_mask,
)
from cvae.data.official import load_official
from cvae.data.render import RENDERER_VERSION, check_classes, render
from cvae.errors import ConfigError, DataError

__all__ = ["DataError", "write_dataset", "read_manifest", "verify_dataset", "split_shards",
           "open_shard", "shard_name", "holdout_mask", "split_rows", "MANIFEST", "SPLITS"]

FORMAT = "cvae-dsprites-shards"
VERSION = 1
MANIFEST = "manifest.json"
# In global shard order. Validation chooses the best checkpoint; test and holdout are for
# queries and reported quality. A manifest whose counts lack a split has none of its rows.
SPLITS = ("train", "validation", "test", "holdout")
# Dataset name -> (shape of one row, dtype): the contract every shard must meet.
LAYOUT = {
    "imgs": ((IMAGE_SIZE, IMAGE_SIZE), np.uint8),
    "latents/classes": ((len(LATENTS),), np.int64),
    "latents/values": ((len(LATENTS),), np.float64),
    "index": ((), np.int64),
}
_SHARD_RE = re.compile(r"^shard-\d{5}-of-\d{5}\.h5$")


def shard_name(number: int, total: int) -> str:
    return f"shard-{number:05d}-of-{total:05d}.h5"


# --- the split -------------------------------------------------------------------------

def holdout_mask(classes: np.ndarray, rules: list[dict]) -> np.ndarray:
    """True for rows held out: for some rule, every factor it names has a listed class."""
    return rule_mask(classes, rules)


def split_rows(classes: np.ndarray, test_fraction: float, holdout: list[dict],
               seed: int, validation_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Row positions of each split, each in a seeded random order.

    Held-out combinations first; then of the rest, in one seeded random order, the first
    `round(test_fraction * rest)` rows are test, the next `round(validation_fraction * rest)`
    validation (disjoint from test), and the remainder train. The test rows do not depend
    on `validation_fraction`.

    Rows that repeat a factor combination (a dataset sampled from an SCM) stay in one split:
    the random order is then one of combinations, and each cut moves forward to the next
    combination, so a test image never also sits in the training set.
    """
    rng = np.random.default_rng([seed, 1])
    held = holdout_mask(classes, holdout)
    rest = rng.permutation(np.flatnonzero(~held))
    n_test = int(round(test_fraction * len(rest)))
    n_val = int(round(validation_fraction * len(rest)))
    _, combo = np.unique(np.asarray(classes)[rest], axis=0, return_inverse=True)
    combo = combo.reshape(-1)
    if combo.max(initial=-1) + 1 < len(rest):  # repeated combinations: cut between them
        order = np.argsort(rng.permutation(combo.max() + 1)[combo], kind="stable")
        rest, combo = rest[order], combo[order]
        n_test, n_val = _cut(combo, n_test), _cut(combo, n_test + n_val) - _cut(combo, n_test)
    return {"train": rest[n_test + n_val:], "validation": rest[n_test:n_test + n_val],
            "test": rest[:n_test], "holdout": rng.permutation(np.flatnonzero(held))}


def _cut(groups: np.ndarray, at: int) -> int:
    """The first position >= at where a new group starts (groups are contiguous)."""
    while 0 < at < len(groups) and groups[at] == groups[at - 1]:
        at += 1
    return at


def plan_shards(rows: dict[str, np.ndarray], num_train_shards: int) -> list[tuple[str, np.ndarray]]:
    """(split, row positions) per shard, in global shard order: train, validation, test,
    holdout.

    Validation, test and holdout get shards in proportion to their size (at least one when
    not empty).
    """
    n_train = len(rows["train"])
    if n_train == 0:
        raise DataError("the split leaves no training rows (check data.test_fraction, "
                        "data.validation_fraction and data.holdout)")
    plan = []
    for split in SPLITS:
        n = len(rows[split])
        if n == 0:
            continue
        k = num_train_shards if split == "train" else max(1, round(num_train_shards * n / n_train))
        plan += [(split, part) for part in np.array_split(rows[split], min(k, n))]
    return plan


# --- the generators --------------------------------------------------------------------

def _strided(classes: np.ndarray, strides: dict) -> np.ndarray:
    keep = np.ones(len(classes), dtype=bool)
    for name, stride in strides.items():
        keep &= classes[:, FACTORS.index(name)] % stride == 0
    return keep


def generate(config, factor_scm=None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(n, 5) factor classes of the dataset's rows, their images when they come from a
    file (None: rendered on the fly), and the manifest's record of where they came from.
    `config` is the run's cvae.config.Config (its `data`, `seed` and `scm`); `factor_scm`
    the FactorSCM that generator 'scm' samples from (cvae.model.factors.dataset_scm)."""
    data = config.data
    if data.generator == "render":
        return factor_classes(data.strides), None, {"official_path": None}
    if data.generator == "import":
        official = load_official(data.official_path)
        keep = _strided(official.classes[:, 1:], data.strides)
        imgs = official.imgs if keep.all() else official.imgs[keep]  # no 3 GB copy of the full file
        return (official.classes[keep, 1:], imgs,
                {"official_path": str(Path(data.official_path).resolve())})
    if data.generator == "scm":
        if data.scm_samples <= 0:
            raise ConfigError("config.data.scm_samples: must be > 0 when data.generator is 'scm'")
        if factor_scm is None:
            raise ConfigError("config.data.generator: 'scm' samples from a factor SCM: pass "
                              "factor_scm=cvae.model.factors.dataset_scm(config)")
        classes = factor_scm.sample(data.scm_samples, config.seed)
        return check_classes(classes), None, {"official_path": None,
                                              "scm": dataclasses.asdict(config.scm)}
    raise ConfigError(f"config.data.generator: unknown generator {data.generator!r}")


# --- writing ---------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: str | Path, classes: np.ndarray, imgs: np.ndarray | None = None,
                compression: str = "lzf", chunk_rows: int = 256, attrs: dict | None = None) -> dict:
    """Write one shard of (n, 5) factor classes, rendering the images unless given.

    Atomic: written to a temp file beside `path`, checksummed, then renamed.
    Returns the manifest entry {file, rows, sha256, bytes} (split added by the caller).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = len(classes)
    classes6 = np.concatenate([np.zeros((n, 1), np.int64), classes], axis=1)
    chunk = max(1, min(chunk_rows, n))
    opts = {"compression": compression, "fletcher32": True}
    try:
        with h5py.File(tmp, "w") as f:
            images = f.create_dataset("imgs", (n, IMAGE_SIZE, IMAGE_SIZE), np.uint8,
                                      chunks=(chunk, IMAGE_SIZE, IMAGE_SIZE), **opts)
            f.create_dataset("latents/classes", data=classes6, chunks=(chunk, 6), **opts)
            f.create_dataset("latents/values", data=classes_to_values(classes6), chunks=(chunk, 6), **opts)
            f.create_dataset("index", data=classes_to_index(classes6), chunks=(chunk,), **opts)
            step = chunk * max(1, 8192 // chunk)  # whole chunks, a few MB at a time
            for start in range(0, n, step):
                rows = slice(start, min(n, start + step))
                images[rows] = render(classes[rows]) if imgs is None else imgs[rows]
            f.attrs.update(attrs or {})
        entry = {"file": path.name, "rows": n, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return entry


def write_dataset(config, out_dir: str | Path, progress: Callable[[int, int, dict], None] | None = None,
                  factor_scm=None) -> dict:
    """Generate the dataset `config.data` describes into `out_dir` (`config`: a
    cvae.config.Config); returns the manifest. `factor_scm` is the FactorSCM that
    data.generator 'scm' samples from (cvae.model.factors.dataset_scm(config) builds it).

    `progress(done, total, entry)` is called after each shard.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = config.data
    classes, imgs, origin = generate(config, factor_scm)
    if len(classes) == 0:
        raise DataError(f"the {data.generator} generator produced no rows (check data.strides)")
    rows = split_rows(classes, data.test_fraction, data.holdout, config.seed,
                      data.validation_fraction)
    plan = plan_shards(rows, data.num_shards)
    total = len(plan)

    # An old manifest must not outlive the shards it names: drop it before any shard changes.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    # One process is enough: rendering is a gather from 720 sprites, and lzf plus
    # fletcher32 keep up (the full grid writes in seconds; python -m benchmarks.bench_data).
    entries: list[dict] = []
    for i, (split, pos) in enumerate(plan):
        entry = write_shard(out_dir / shard_name(i, total), classes[pos],
                            None if imgs is None else imgs[pos], data.compression, data.chunk_rows,
                            {"split": split, "shard": i, "num_shards": total})
        entries.append({**entry, "split": split})
        if progress:
            progress(len(entries), total, entries[-1])

    manifest = _manifest(config, classes, rows, origin, entries)
    tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync_replace(tmp, out_dir / MANIFEST)
    # Shards and temp files of an earlier or interrupted run are not part of this dataset.
    named = {e["file"] for e in entries}
    for path in out_dir.iterdir():
        if (_SHARD_RE.match(path.name) and path.name not in named) or (
                path.name.startswith(".shard-") and ".tmp-" in path.name):
            path.unlink(missing_ok=True)
    return manifest


# --- reading and checking --------------------------------------------------------------

def _manifest(config, classes: np.ndarray, rows: dict[str, np.ndarray], origin: dict, entries: list[dict]) -> dict:
    """The dataset's manifest (docs/contracts.md): where its rows came from, its grid and
    splits, the classes its training split holds, and every shard with its checksum."""
    data = config.data
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "generator": data.generator,
        **origin,
        **({} if data.generator == "import" else {"renderer": RENDERER_VERSION}),
        "grid": {"latents": list(LATENTS), "sizes": list(LATENT_SIZES),
                 "strides": {f: int(data.strides.get(f, 1)) for f in FACTORS},
                 "rows": int(len(classes))},
        "seed": config.seed,
        "test_fraction": data.test_fraction,
        "validation_fraction": data.validation_fraction,
        "holdout": data.holdout,
        "counts": {split: int(len(rows[split])) for split in SPLITS},
        # The classes each factor takes in the training split: the grid a model trained on
        # this dataset answers (cvae.data.grid.ModelGrid).
        "train_classes": {f: np.unique(classes[rows["train"], i]).tolist() for i, f in enumerate(FACTORS)},
        "compression": data.compression,
        "chunk_rows": data.chunk_rows,
        "num_shards": len(entries),
        "shards": entries,
    }
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest, checked for the fields readers rely on."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (not a dataset directory, or its writing "
                        f"did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('version')!r}, this code reads {VERSION}")
    for key in ("generator", "grid", "counts", "chunk_rows", "num_shards", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks '{key}'")
    shards = manifest["shards"]
    if not isinstance(shards, list) or len(shards) != manifest["num_shards"]:
        raise DataError(f"{path}: manifest lists {len(shards)} shards but num_shards is "
                        f"{manifest['num_shards']}")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or not {"file", "split", "rows", "sha256"} <= set(entry):
            raise DataError(f"{path}: shard entry {i} lacks file, split, rows or sha256")
        if entry["split"] not in SPLITS or Path(entry["file"]).name != entry["file"]:
            raise DataError(f"{path}: shard entry {i} has a bad split or file name")
    for split in SPLITS:
        listed = sum(e["rows"] for e in shards if e["split"] == split)
        if listed != manifest["counts"].get(split, 0):
            raise DataError(f"{path}: {split} shards hold {listed} rows but counts.{split} is "
                            f"{manifest['counts'].get(split)}")
    # Manifests written before the validation split lack it in counts: none of its rows.
    manifest["counts"] = {split: int(manifest["counts"].get(split, 0)) for split in SPLITS}
    return manifest


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest entries of one split, in global shard order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [e for e in manifest["shards"] if e["split"] == split]


def check_file(data_dir: str | Path, entry: dict) -> Path:
    """The shard's path, after checking it exists with the manifest's size and sha256."""
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise DataError(f"{path}: shard is {size} bytes, the manifest says {entry['bytes']} "
                        f"(truncated or replaced)")
    if sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: shard fails its sha256 checksum (damaged or replaced)")
    return path


def open_shard(path: str | Path, rows: int) -> h5py.File:
    """Open a shard read-only and check its datasets against the layout and `rows`."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 shard (truncated or damaged): {exc}") from None
    try:
        for name, (row_shape, dtype) in LAYOUT.items():
            if name not in f:
                raise DataError(f"{path}: shard lacks dataset '{name}'")
            ds = f[name]
            if ds.shape != (rows, *row_shape) or ds.dtype != dtype:
                raise DataError(f"{path}: '{name}' is {ds.dtype} {ds.shape}, the manifest and "
                                f"layout say {np.dtype(dtype)} {(rows, *row_shape)}")
    except BaseException:
        f.close()
        raise
    return f


def verify_dataset(data_dir: str | Path, read_rows: bool = False) -> dict:
    """Check every shard against the manifest (present, size, sha256, layout, rows);
    with `read_rows`, also read every row, which checks HDF5's per-chunk fletcher32."""
    manifest = read_manifest(data_dir)
    for entry in manifest["shards"]:
        path = check_file(data_dir, entry)
        with open_shard(path, entry["rows"]) as f:
            if read_rows:
                try:
                    for name in LAYOUT:
                        f[name][()]
                except OSError as exc:
                    raise DataError(f"{path}: cannot read '{name}': {exc}") from None
    return manifest
