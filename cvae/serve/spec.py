"""The bulk query spec, read and checked strictly: every key, type and value, each error
naming its key (`spec.interventions[0].values: ...`). What the spec asks for, and how
cvae.serve.make_queries turns it into query rows, is in that module's docstring.

A spec (YAML or a dict) names the sources, the interventions and the samples:

    seed: 0
    sources:                       # one of grid / split / indices (default: grid: true)
      split: test                  # every source in a data split (needs the data dir)
      filter: {shape: [0, 1]}      # optional: keep sources whose factors are in these classes
      sample: 1000                 # optional: a seeded sample of n sources, no replacement
    interventions:                 # each entry adds queries for every source
      - {factor: shape, values: other}         # every other shape (of the sources' grid)
      - {factor: scale, values: all}           # all values, the factual one included (null do)
      - {factor: pos_x, values: random_other}  # one random other value per source
      - {factor: scale, values: factual}       # the null intervention (do = the factual value)
      - {factor: orientation, values: [0, 10]} # given values
      - {do: {shape: 2, scale: 5}}             # a joint intervention
    samples: 1                     # num_samples per query
    rows_per_file: 1000000         # rows per Parquet file
    id_prefix: ""                  # prepended to every query_id

"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cvae import fs
from cvae.data.grid import FACTOR_SIZES, FACTORS, NUM_IMAGES
from cvae.data.shards import SPLITS
from cvae.errors import CvaeError

VALUE_MODES = ("all", "other", "random_other", "factual")


MAX_SAMPLES = 1_000_000  # a sanity bound; the query engine caps num_samples itself


class SpecError(CvaeError):
    """A query-set spec that cannot be used, with the offending key named."""


def validate_spec(spec: Any) -> dict:
    """Check a spec strictly and return it with defaults filled in."""
    if not isinstance(spec, dict):
        raise SpecError(f"spec: must be a mapping, got {type(spec).__name__}")
    _known(spec, ("sources", "interventions", "samples", "seed", "rows_per_file", "id_prefix"), "spec")
    out = {
        "seed": _int(spec.get("seed", 0), "spec.seed", minimum=0),
        "samples": _int(spec.get("samples", 1), "spec.samples", minimum=1, maximum=MAX_SAMPLES),
        "rows_per_file": _int(spec.get("rows_per_file", 1_000_000), "spec.rows_per_file", minimum=1),
        "id_prefix": spec.get("id_prefix", ""),
    }
    if not isinstance(out["id_prefix"], str):
        raise SpecError(f"spec.id_prefix: must be a string, got {out['id_prefix']!r}")
    out["sources"] = _validate_sources(spec.get("sources", {"grid": True}))
    if "interventions" not in spec:
        raise SpecError("spec.interventions: required (a list of interventions)")
    entries = spec["interventions"]
    if not isinstance(entries, list) or not entries:
        raise SpecError("spec.interventions: must be a non-empty list")
    out["interventions"] = [_validate_entry(e, f"spec.interventions[{i}]") for i, e in enumerate(entries)]
    return out


def _validate_sources(src: Any) -> dict:
    where = "spec.sources"
    if not isinstance(src, dict):
        raise SpecError(f"{where}: must be a mapping, got {type(src).__name__}")
    _known(src, ("grid", "split", "indices", "filter", "sample"), where)
    bases = [k for k in ("grid", "split", "indices") if k in src]
    if len(bases) > 1:
        raise SpecError(f"{where}: give one of grid, split, indices, not {' and '.join(bases)}")
    out: dict = {}
    base = bases[0] if bases else "grid"
    if base == "grid":
        grid = src.get("grid", True)
        if grid is True:
            out["grid"] = {}
        elif isinstance(grid, dict):
            for name, stride in grid.items():
                if name not in FACTORS:
                    raise SpecError(f"{where}.grid.{name}: unknown factor (expected one of {FACTORS})")
                _int(stride, f"{where}.grid.{name}", minimum=1)
            out["grid"] = dict(grid)
        else:
            raise SpecError(f"{where}.grid: must be true or a mapping of factor to stride, got {grid!r}")
    elif base == "split":
        if src["split"] not in SPLITS:
            raise SpecError(f"{where}.split: must be one of {', '.join(SPLITS)}, got {src['split']!r}")
        out["split"] = src["split"]
    else:
        idx = src["indices"]
        if not isinstance(idx, list) or not idx:
            raise SpecError(f"{where}.indices: must be a non-empty list of official indices")
        for i, v in enumerate(idx):
            _int(v, f"{where}.indices[{i}]", minimum=0, maximum=NUM_IMAGES - 1)
        if len(set(idx)) != len(idx):
            raise SpecError(f"{where}.indices: holds duplicates")
        out["indices"] = list(idx)
    if "filter" in src:
        flt = src["filter"]
        if not isinstance(flt, dict) or not flt:
            raise SpecError(f"{where}.filter: must be a mapping of factor to a list of classes")
        for name, classes in flt.items():
            _factor(name, f"{where}.filter.{name}")
            if not isinstance(classes, list) or not classes:
                raise SpecError(f"{where}.filter.{name}: must be a non-empty list of classes")
            for c in classes:
                _int(c, f"{where}.filter.{name}", minimum=0, maximum=FACTOR_SIZES[name] - 1)
        out["filter"] = {k: list(v) for k, v in flt.items()}
    if "sample" in src:
        out["sample"] = _int(src["sample"], f"{where}.sample", minimum=1)
    return out


def _validate_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: must be a mapping, got {type(entry).__name__}")
    if "do" in entry:
        _known(entry, ("do",), where)
        do = entry["do"]
        if not isinstance(do, dict) or not do:
            raise SpecError(f"{where}.do: must be a mapping of factor to class")
        for name, value in do.items():
            _factor(name, f"{where}.do.{name}")
            _int(value, f"{where}.do.{name}", minimum=0, maximum=FACTOR_SIZES[name] - 1)
        return {"do": dict(do)}
    _known(entry, ("factor", "values"), where)
    if "factor" not in entry:
        raise SpecError(f"{where}.factor: required (or give 'do' for a joint intervention)")
    factor = entry["factor"]
    if factor not in FACTORS:
        raise SpecError(f"{where}.factor: unknown factor {factor!r} (expected one of {FACTORS})")
    values = entry.get("values", "all")
    top = FACTOR_SIZES[factor] - 1
    if isinstance(values, str):
        if values not in VALUE_MODES:
            raise SpecError(f"{where}.values: must be one of {', '.join(VALUE_MODES)} or classes, got {values!r}")
        if values in ("other", "random_other") and top == 0:
            raise SpecError(f"{where}.values: {factor} has a single class, so no other value")
    elif isinstance(values, list) and values:
        for v in values:
            _int(v, f"{where}.values", minimum=0, maximum=top)
        values = sorted(set(values))
    elif isinstance(values, int) and not isinstance(values, bool):
        values = [_int(values, f"{where}.values", minimum=0, maximum=top)]
    else:
        raise SpecError(f"{where}.values: must be all, other, random_other, factual, a class or a list of classes")
    return {"factor": factor, "values": values}


def _factor(name: Any, where: str) -> None:
    if name not in FACTORS:
        raise SpecError(f"{where}: unknown factor (expected one of {FACTORS})")


def _known(mapping: dict, keys: tuple, where: str) -> None:
    for key in mapping:
        if key not in keys:
            raise SpecError(f"{where}.{key}: unknown key (known keys: {', '.join(keys)})")


def _int(value: Any, where: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpecError(f"{where}: must be an integer, got {value!r}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise SpecError(f"{where}: must be {bounds}, got {value}")
    return int(value)


def load_spec(path: str | Path) -> dict:
    """Read a YAML spec file (path or URI) and validate it."""
    try:
        raw = yaml.safe_load(fs.read_bytes(path))
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    try:
        return validate_spec(raw)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
