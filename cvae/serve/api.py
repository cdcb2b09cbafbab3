"""The Python API for notebooks: load a checkpoint, ask the three query kinds, get numpy images.

    from cvae import CausalModel
    m = CausalModel.load("runs/local/train")     # a run folder (its best checkpoint) or one checkpoint
    m = CausalModel.load("pretrained")           # the whole-grid model that ships with cvae
    m.grid                                       # the classes it answers; m.grid.indices(): its images
    x = m.counterfactual(source_index=1234, do={"shape": "heart"})        # (64, 64) bool
    x = m.counterfactual(image=img, factors={...}, do={"scale": 5}, num_samples=4, seed=0)  # (4, 64, 64)
    xs = m.intervene(do={"scale": 5}, num_samples=8, seed=0)              # (8, 64, 64)
    xs = m.condition(given={"shape": "square"}, num_samples=8, seed=0)

Contract: every call builds one row in the query schema (`query_table`, the row `jobs.query`
reads from Parquet) and answers it with `cvae.serve.queries.answer_queries`, the query job's own
function, on the checkpoint's `ImageSCM`. So the API answers exactly as the query job does
for the same row and checkpoint, and an error row of the job is a ValueError here, with the
job's error text.

Factor values (in `do`, `given` and `factors`), keyed by the factor names of the query
schema (shape, scale, orientation, pos_x, pos_y):
- a class number, an int (numpy ints too): shape 0..2, scale 0..5, orientation 0..39, pos 0..31;
- for shape, its name: "square", "ellipse", "heart" (`cvae.data.grid.SHAPE_NAMES`, any case);
- `Value(v)`: the official latent value, taken to the nearest class (ties to the lower one):
  scale 0.5..1.0, orientation in radians 0..2pi, pos_x and pos_y 0..1, shape 1..3. A plain
  float is refused, so `{"scale": 1}` (class 1) and `{"scale": Value(1.0)}` (class 5) never mix.
An unknown factor, a class out of range, an unknown shape name or a value off the grid raises
ValueError naming the factor and the value.

query_id and seed (what makes a call reproducible):
- `seed=None` leaves the row's seed null, so, as in the job, the seed is derived from the
  query_id (`cvae.rng.seed_from_query_id`): the same call gives the same images every time.
  Pass different seeds for fresh draws.
- The query_id is, unless given, the query's canonical text: the kind, then each non-null
  column of the row as `name=value` in query-schema order, space-separated, classes as
  numbers; an image appears as `image=<blake2b-64 hex of the row's image bytes>` (the 4096 raw
  0/1 bytes for an array); num_samples and seed are not part of it. For example
  `counterfactual source_index=1234 do_shape=2` or `intervene do_scale=5 given_shape=0`.
  So names and class numbers give the same query_id, hence the same answer.
- Sample i depends only on (seed, i): the first k samples of num_samples=n (n >= k) are the
  samples of num_samples=k, and num_samples=None is sample 0.

Outputs: num_samples=None gives one (64, 64) bool array, an int n gives (n, 64, 64). With
`return_classes=True` each method returns (images, classes): the factor classes of the
generated world (the counterfactual world for a counterfactual), a dict of factor to int, or
to an (n,) int64 array.

Device: the CPU, or the GPU when torch sees one (ImageSCM's choice; `load(device=...)` to pick).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cvae import fs
from cvae.causal.image import ImageSCM
from cvae.data.grid import (
    FACTOR_SIZES,
    FACTORS,
    IMAGE_SIZE,
    LATENT_VALUES,
    NUM_IMAGES,
    SHAPE_NAMES,
    ModelGrid,
    classes_to_index,
    index_to_classes,
)
from cvae.data.images import decode_image
from cvae.model.checkpoint import META, WEIGHTS, resolve_checkpoint
from cvae.serve.queries import KINDS, QUERY_SCHEMA, answer_queries

__all__ = ["CausalModel", "Value", "query_table"]

# Columns of a row that do not enter its canonical query_id.
_NOT_IN_ID = ("query_id", "kind", "num_samples", "seed")


@dataclass(frozen=True)
class Value:
    """An official dSprites latent value in place of a class number: `{"scale": Value(0.75)}`.

    Ranges: scale 0.5..1.0, orientation 0..2pi (radians), pos_x and pos_y 0..1, shape 1..3.
    It is taken to the nearest class of the grid (ties to the lower class); a value more than
    half a step outside the range is a ValueError.
    """

    value: float


def factor_class(factor: str, value: Any, where: str = "factor") -> int:
    """The class number of one factor value (int class, shape name or `Value`); ValueError
    naming `where`, the factor and the value otherwise."""
    if factor not in FACTORS:
        raise ValueError(f"{where}: unknown factor {factor!r} (factors: {', '.join(FACTORS)})")
    size = FACTOR_SIZES[factor]
    if isinstance(value, Value):
        return _nearest_class(factor, value.value, where)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {factor}={value!r} is a bool; give a class number 0..{size - 1}")
    if isinstance(value, (int, np.integer)):
        if not 0 <= value < size:
            raise ValueError(f"{where}: {factor}={int(value)} is out of range: classes are 0..{size - 1}")
        return int(value)
    if isinstance(value, str):
        if factor != "shape":
            raise ValueError(f"{where}: {factor}={value!r}: only shape takes a name; give a class number "
                             f"0..{size - 1} or Value(<official value>)")
        name = value.strip().lower()
        if name not in SHAPE_NAMES:
            raise ValueError(f"{where}: unknown shape name {value!r} (shapes: {', '.join(SHAPE_NAMES)})")
        return SHAPE_NAMES.index(name)
    if isinstance(value, (float, np.floating)):
        raise ValueError(f"{where}: {factor}={value!r} is a float; give a class number 0..{size - 1}, or the "
                         f"official value as cvae.serve.api.Value({value!r})")
    raise ValueError(f"{where}: {factor}={value!r}: expected a class number, a shape name or Value(...), "
                     f"got {type(value).__name__}")


def _nearest_class(factor: str, value: Any, where: str) -> int:
    grid = LATENT_VALUES[factor]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {factor}=Value({value!r}) is not a number") from None
    half = (grid[-1] - grid[0]) / (len(grid) - 1) / 2
    if not grid[0] - half <= v <= grid[-1] + half:  # also refuses nan
        raise ValueError(f"{where}: {factor}=Value({v!r}) is off the grid: official values run from "
                         f"{grid[0]:.4g} to {grid[-1]:.4g}")
    return int(np.abs(grid - v).argmin())


def factor_classes(values: Mapping | None, where: str) -> dict[str, int]:
    """{factor: class} from a mapping of factor names to values (see factor_class)."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping of factor names to values, got {type(values).__name__}")
    return {f: factor_class(f, v, where) for f, v in values.items()}


def _image_bytes(image: Any) -> bytes:
    """The image column's bytes: bytes as given (PNG or raw), an array as 4096 raw 0/1 bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    array = np.asarray(image)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image: expected a ({IMAGE_SIZE}, {IMAGE_SIZE}) array of 0/1 (or PNG bytes), "
                         f"got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError("image: not binary: pixels must be 0 or 1 (or bool)")
    return array.astype(np.uint8).tobytes()


def _int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}={value} does not fit in int64")
    return int(value)


def canonical_query_id(row: Mapping) -> str:
    """The query_id the API gives a row without one: see the module docstring."""
    parts = [str(row["kind"])]
    for name in QUERY_SCHEMA.names:
        value = row.get(name)
        if name in _NOT_IN_ID or value is None:
            continue
        if name == "image":
            value = hashlib.blake2b(value, digest_size=8).hexdigest()
        parts.append(f"{name}={value}")
    return " ".join(parts)


def query_table(kind: str, *, source_index: int | None = None, image: Any = None, factors: Mapping | None = None,
                do: Mapping | None = None, given: Mapping | None = None, num_samples: int | None = None,
                seed: int | None = None, query_id: str | None = None) -> pa.Table:
    """The one-row query table (QUERY_SCHEMA) that the API answers: write it to Parquet and
    `jobs.query` gives the same answer. Factor values as in the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    row: dict[str, Any] = {name: None for name in QUERY_SCHEMA.names}
    row["kind"] = kind
    row["source_index"] = _int_or_none(source_index, "source_index")
    row["image"] = None if image is None else _image_bytes(image)
    for prefix, values, where in (("", factors, "factors"), ("do_", do, "do"), ("given_", given, "given")):
        for f, c in factor_classes(values, where).items():
            row[prefix + f] = c
    row["num_samples"] = _int_or_none(num_samples, "num_samples")
    row["seed"] = _int_or_none(seed, "seed")
    if query_id is not None and not isinstance(query_id, str):
        raise ValueError(f"query_id must be a string, got {query_id!r}")
    row["query_id"] = canonical_query_id(row) if query_id is None else query_id
    return pa.Table.from_pylist([row], schema=QUERY_SCHEMA)


class CausalModel:
    """A trained checkpoint as an SCM that answers condition, intervene and counterfactual
    queries one at a time, as `jobs.query` answers the same rows (see the module docstring)."""

    def __init__(self, scm: ImageSCM, checkpoint: str | None = None):
        self.scm = scm
        self.checkpoint = checkpoint  # the checkpoint folder it was loaded from, if any

    @classmethod
    def load(cls, path: str | Path, device: str | None = None,
             say: Callable[[str], None] | None = None) -> CausalModel:
        """Load one checkpoint folder, or a training run folder's best checkpoint (lowest
        validation loss, else test loss, else the latest epoch; `cvae.model.checkpoint.resolve_checkpoint`,
        which says which through `say`, by default one line logged at INFO). Local paths or URIs.
        Raises CheckpointError (a ValueError) naming the path for anything that is not one."""
        checkpoint = resolve_checkpoint(path, say=say)
        # A URI is copied to a local temporary folder for the load, as the query actors do.
        with fs.staged(checkpoint, only=[WEIGHTS, META] if fs.is_uri(checkpoint) else None) as local:
            scm = ImageSCM.from_checkpoint(local, device=device)
        return cls(scm, checkpoint)

    def __repr__(self) -> str:
        return f"CausalModel({self.checkpoint!r}, device={str(self.scm.device)!r})"

    @property
    def grid(self) -> ModelGrid:
        """The classes of each factor this model answers (`grid.classes[factor]`), as its
        checkpoint declares: the classes it was trained on. A query naming any other class is
        refused with a ValueError that names it. `grid.indices()` lists every source_index
        it accepts."""
        return self.scm.grid

    def source_index(self, factors: Mapping) -> int:
        """The official grid index of an image given all five factors (values as in `do`)."""
        classes = factor_classes(factors, "factors")
        missing = [f for f in FACTORS if f not in classes]
        if missing:
            raise ValueError(f"factors: missing {', '.join(missing)} (an index needs all five)")
        return int(classes_to_index(np.array([[classes[f] for f in FACTORS]]))[0])

    def factors(self, source_index: int) -> dict[str, int]:
        """The five factor classes of an official grid index."""
        index = _int_or_none(source_index, "source_index")
        if index is None or not 0 <= index < NUM_IMAGES:
            raise ValueError(f"source_index={source_index!r} is out of range [0, {NUM_IMAGES})")
        return dict(zip(FACTORS, (int(c) for c in index_to_classes(np.array([index]), with_color=False)[0])))

    @property
    def device(self):
        return self.scm.device

    def counterfactual(self, source_index: int | None = None, *, image: Any = None, factors: Mapping | None = None,
                       do: Mapping | None = None, num_samples: int | None = None, seed: int | None = None,
                       query_id: str | None = None, return_classes: bool = False):
        """What the factual observation would have looked like under `do`.

        The factual observation is `source_index` (an official grid index: its true image comes
        from the checkpoint's ground truth, its factors from the index) or `image` (a (64, 64)
        0/1 array, or PNG / 4096 raw bytes) with all five `factors`. `do` may be empty: the
        model's own reconstruction of the observation.
        """
        return self._ask("counterfactual", source_index=source_index, image=image, factors=factors, do=do,
                         num_samples=num_samples, seed=seed, query_id=query_id, return_classes=return_classes)

    def intervene(self, do: Mapping | None = None, *, given: Mapping | None = None, num_samples: int | None = None,
                  seed: int | None = None, query_id: str | None = None, return_classes: bool = False):
        """Samples of the world with the factors in `do` set (the graph mutilated), optionally
        conditioned on evidence `given` under the intervention."""
        return self._ask("intervene", do=do, given=given, num_samples=num_samples, seed=seed,
                         query_id=query_id, return_classes=return_classes)

    def condition(self, given: Mapping | None = None, *, num_samples: int | None = None, seed: int | None = None,
                  query_id: str | None = None, return_classes: bool = False):
        """Samples of the world given the evidence `given` (exact posterior over the other factors)."""
        return self._ask("condition", given=given, num_samples=num_samples, seed=seed, query_id=query_id,
                         return_classes=return_classes)

    def _ask(self, kind: str, *, num_samples: int | None, return_classes: bool, **row):
        table = query_table(kind, num_samples=num_samples, **row)
        n = table.column("num_samples")[0].as_py() or 1
        # No sample cap here: query.max_samples bounds a job's rows, not a notebook's call.
        results, errors = answer_queries(self.scm, table, max_samples=max(n, 1))
        if errors.num_rows:
            raise ValueError(f"{kind} query {table.column('query_id')[0].as_py()!r}: "
                             f"{errors.column('error')[0].as_py()}")
        order = np.argsort(results.column("sample").to_numpy(), kind="stable")
        pngs = results.column("image").to_pylist()
        images = np.stack([decode_image(pngs[i]) for i in order]).astype(bool)
        classes = {f: results.column(f).to_numpy()[order].astype(np.int64) for f in FACTORS}
        if num_samples is None:
            images = images[0]
            classes = {f: int(c[0]) for f, c in classes.items()}
        return (images, classes) if return_classes else images
