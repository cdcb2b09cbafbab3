"""Bulk counterfactual query sets from a plain spec, written as partitioned Parquet.

The spec (YAML or a dict) names the sources, the interventions and the samples; its format
and its checks are in cvae.serve.spec.

`all`, `other` and `random_other` range over the factor's classes in the sources' grid: the
dataset's grid for a split (the classes its training split holds: a model trained on every 4th
orientation is not asked for the others), the given strides for grid sources, every class for
indices. A list of classes reaches any class.

A model's grid (`grid`: the classes a checkpoint answers, `jobs.make_queries --checkpoint`;
for split sources without one, the dataset's own) bounds every query: sources with a class
off it are skipped, value modes range over its classes only, and listed values or joint
interventions off it are skipped. The summary counts what was skipped (`skipped_off_grid`),
so a set never holds a row the model would refuse.

The output holds `part-00000.parquet`, ... (query rows in the query schema of
docs/contracts.md) and `_summary.json`. Rows are produced a chunk of sources at a time
and each file holds at most `rows_per_file` rows, so a set of tens of millions of
rows never sits in memory. Everything random comes from a counter-based hash of
(seed, source index, entry), so a query's row does not depend on chunking or on
which other sources are in the set. `query_id` is "<prefix><source_index>-do_<factor>=<class>"
(joint interventions join one "-do_..." per factor, in factor order); rows come ordered
by source, then by intervention, and a (source, do) pair that two entries both produce is
written once.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvae import fs
from cvae.data.grid import (
    FACTOR_SIZES,
    FACTORS,
    ModelGrid,
    grid_indices,
    index_to_classes,
    rule_mask,
    strided_classes,
)
from cvae.data.shards import MANIFEST, check_file, open_shard, read_manifest, split_shards
from cvae.rng import hash_parts
from cvae.serve.schema import QUERY_SCHEMA
from cvae.serve.spec import SpecError, validate_spec

# Rows built per chunk: bounds memory independently of the size of the set.
CHUNK_ROWS = 262_144
_DO_CODES = int(np.prod([FACTOR_SIZES[f] + 1 for f in FACTORS]))  # distinct do vectors, null included



# ----------------------------------------------------------------------------- sources

def source_indices(sources: dict, seed: int, data_dir: str | Path | None = None,
                   grid: ModelGrid | None = None, skipped: dict | None = None) -> np.ndarray:
    """The official indices of the sources, ascending (a sample keeps ascending order); with
    a model's `grid`, only sources on it (the others counted in `skipped["sources"]`, before
    any sample is drawn)."""
    if "indices" in sources:
        idx = np.sort(np.asarray(sources["indices"], dtype=np.int64))
    elif "split" in sources:
        idx = np.sort(split_indices(_split_data(sources, data_dir), sources["split"]))
    else:
        idx = grid_indices(sources["grid"])
    if "filter" in sources:
        idx = idx[rule_mask(index_to_classes(idx, with_color=False), [sources["filter"]])]
    if grid is not None and not grid.is_whole():
        on = grid.contains_rows(index_to_classes(idx, with_color=False))
        if skipped is not None:
            skipped["sources"] = skipped.get("sources", 0) + int((~on).sum())
        idx = idx[on]
    if "sample" in sources and sources["sample"] < len(idx):
        # A seeded permutation of the candidates: the first n (sorted) are the sample.
        order = np.argsort(hash_parts(np.uint64(seed), idx.astype(np.uint64), np.uint64(0x5A)), kind="stable")
        idx = np.sort(idx[order[: sources["sample"]]])
    if len(idx) == 0:
        raise SpecError("spec.sources: selects no sources" + (f" on the model's grid ({grid!r})" if grid else ""))
    return idx


def _split_data(sources: dict, data_dir: str | Path | None) -> str | Path:
    """The data directory that split sources need, or a SpecError saying so."""
    if data_dir is None:
        raise SpecError(f"spec.sources.split: needs the data directory (--data) to read split {sources['split']!r}")
    return data_dir


def query_grid(sources: dict, data_dir: str | Path | None = None, grid: ModelGrid | None = None) -> ModelGrid | None:
    """The grid that bounds the queries: the given model's, else for split sources the
    dataset's (what a model trained on it answers), else None (the whole grid)."""
    if grid is not None or "split" not in sources:
        return grid

    with fs.staged(_split_data(sources, data_dir), only=[MANIFEST]) as local:
        return ModelGrid.of_manifest(read_manifest(local))


def value_classes(sources: dict, data_dir: str | Path | None = None,
                  grid: ModelGrid | None = None) -> dict[str, np.ndarray]:
    """The classes `all`, `other` and `random_other` range over, per factor: those of the
    sources' grid, within the model's `grid` (see the module docstring)."""
    grid = query_grid(sources, data_dir, grid)
    strides = sources.get("grid", {}) if "grid" in sources else {}
    domain = {f: strided_classes(f, strides) for f in FACTORS}
    if grid is not None:
        domain = {f: c[grid.contains(f, c)] for f, c in domain.items()}
    return domain


def split_indices(data_dir: str | Path, split: str) -> np.ndarray:
    """Official indices of one split of a sharded dataset (path or URI).

    Reads only the `index` dataset of that split's shards; a URI stages just those
    shards and the manifest.
    """
    with fs.staged(data_dir, only=[MANIFEST]) as local:
        entries = split_shards(read_manifest(local), split)
    if not entries:
        raise SpecError(f"spec.sources.split: the dataset at {data_dir} has no {split!r} rows")
    with fs.staged(data_dir, only=[MANIFEST] + [e["file"] for e in entries]) as local:
        parts = []
        for entry in entries:
            with open_shard(check_file(local, entry), entry["rows"]) as f:
                parts.append(f["index"][:])
    return np.concatenate(parts).astype(np.int64)


# ----------------------------------------------------------------------------- rows

def _entry_rows(entry: dict, e: int, src: np.ndarray, classes: np.ndarray, seed: int,
                domain: dict[str, np.ndarray]):
    """(positions into src, (m, 5) do classes with -1 for not intervened) for one entry;
    `domain` holds the classes each factor's all / other / random_other range over."""
    n = len(src)
    if "do" in entry:
        do = np.full((n, len(FACTORS)), -1, dtype=np.int64)
        for name, value in entry["do"].items():
            do[:, FACTORS.index(name)] = value
        return np.arange(n), do
    col = FACTORS.index(entry["factor"])
    classes_of = domain[entry["factor"]]
    size = len(classes_of)
    factual = classes[:, col]
    values = entry["values"]
    if values == "all":
        pos, vals = np.repeat(np.arange(n), size), np.tile(classes_of, n)
    elif values == "other":
        pos, vals = np.repeat(np.arange(n), size), np.tile(classes_of, n)
        keep = vals != factual[pos]
        pos, vals = pos[keep], vals[keep]
    elif values == "factual":
        # The null intervention: do the value the source already has (tests composition).
        pos, vals = np.arange(n), factual.copy()
    elif values == "random_other":
        # The r-th of the domain's classes other than the factual one (if it is there).
        rank = np.searchsorted(classes_of, factual)
        present = (rank < size) & (classes_of[np.minimum(rank, size - 1)] == factual)
        choices = (size - present).astype(np.uint64)
        r = hash_parts(np.uint64(seed), src.astype(np.uint64), np.uint64(e)) % choices
        pos, r = np.arange(n), r.astype(np.int64)
        vals = classes_of[r + (present & (r >= rank))]
    else:
        vals = np.tile(np.asarray(values, dtype=np.int64), n)
        pos = np.repeat(np.arange(n), len(values))
    do = np.full((len(pos), len(FACTORS)), -1, dtype=np.int64)
    do[:, col] = vals
    return pos, do


def _chunk_table(spec: dict, src: np.ndarray, domain: dict[str, np.ndarray],
                 grid: ModelGrid | None = None, skipped: dict | None = None) -> pa.Table:
    """All query rows for a chunk of sources, duplicates (same source and do) dropped, and
    rows whose do names a class off the model's `grid` (counted in `skipped["queries"]`)."""
    classes = index_to_classes(src, with_color=False)
    parts = [_entry_rows(entry, e, src, classes, spec["seed"], domain)
             for e, entry in enumerate(spec["interventions"])]
    pos = np.concatenate([p for p, _ in parts])
    do = np.concatenate([d for _, d in parts])
    if grid is not None and not grid.is_whole():
        on = ~grid.off(do, do >= 0).any(axis=1)
        if skipped is not None:
            skipped["queries"] = skipped.get("queries", 0) + int((~on).sum())
        pos, do = pos[on], do[on]
    if len(parts) > 1:
        # Order rows by source, then by intervention, and drop repeats of a (source, do) that
        # two entries both produced: one sort of a single int64 key per row.
        code = np.zeros(len(pos), dtype=np.int64)
        for i, name in enumerate(FACTORS):
            code = code * (FACTOR_SIZES[name] + 1) + do[:, i] + 1
        key = pos * _DO_CODES + code
        order = np.argsort(key, kind="stable")
        first = np.ones(len(order), dtype=bool)
        first[1:] = key[order[1:]] != key[order[:-1]]
        pos, do = pos[order[first]], do[order[first]]
    source = src[pos]

    # query_id "<prefix><source>-do_<factor>=<class>...", built by Arrow's string kernels.
    qid = pc.binary_join_element_wise(spec["id_prefix"], pa.array(source).cast(pa.string()), "")
    do_code = np.zeros(len(pos), dtype=np.uint64)
    for i, name in enumerate(FACTORS):
        mask = do[:, i] >= 0
        if not mask.any():
            continue
        seg = pc.binary_join_element_wise(f"-do_{name}=", pa.array(do[:, i]).cast(pa.string()), "")
        seg = pc.if_else(pa.array(mask), seg, "")
        qid = pc.binary_join_element_wise(qid, seg, "")
        do_code = do_code * np.uint64(FACTOR_SIZES[name] + 1) + (do[:, i] + 1).astype(np.uint64)
    seeds = (hash_parts(np.uint64(spec["seed"]), source.astype(np.uint64), do_code)
             & np.uint64(2**63 - 1)).astype(np.int64)

    n = len(pos)
    null_int = pa.nulls(n, pa.int64())
    columns = {
        "query_id": qid,
        "kind": pa.array(np.full(n, "counterfactual", dtype=object), pa.string()),
        "source_index": pa.array(source),
        "image": pa.nulls(n, pa.binary()),
        **{f: null_int for f in FACTORS},
        **{f"do_{f}": pa.array(do[:, i], mask=do[:, i] < 0) for i, f in enumerate(FACTORS)},
        **{f"given_{f}": null_int for f in FACTORS},
        "num_samples": pa.array(np.full(n, spec["samples"], dtype=np.int64)),
        "seed": pa.array(seeds),
    }
    return pa.table(columns, schema=QUERY_SCHEMA)


def _rows_per_source(spec: dict) -> int:
    """An upper bound on the rows one source produces, to size chunks."""
    total = 0
    for entry in spec["interventions"]:
        if "do" in entry or entry["values"] == "random_other":
            total += 1
        elif entry["values"] in ("all", "other"):
            total += FACTOR_SIZES[entry["factor"]]
        else:
            total += len(entry["values"])
    return total


def iter_query_tables(spec: dict, data_dir: str | Path | None = None,
                      domain: dict[str, np.ndarray] | None = None, grid: ModelGrid | None = None,
                      skipped: dict | None = None) -> Iterator[pa.Table]:
    """Yield the query set as Arrow tables of at most about CHUNK_ROWS rows each
    (`domain`: value_classes of the spec's sources, if the caller already has them; `grid`:
    the model's, see the module docstring; `skipped` counts the sources and queries off it)."""
    spec = validate_spec(spec)
    grid = query_grid(spec["sources"], data_dir, grid)
    src = source_indices(spec["sources"], spec["seed"], data_dir, grid, skipped)
    domain = domain if domain is not None else value_classes(spec["sources"], data_dir, grid)
    for i, entry in enumerate(spec["interventions"]):
        if entry.get("values") in ("other", "random_other") and len(domain[entry["factor"]]) < 2:
            raise SpecError(f"spec.interventions[{i}].values: the sources' grid has a single "
                            f"{entry['factor']} class, so no other value")
    step = max(1, CHUNK_ROWS // _rows_per_source(spec))
    for start in range(0, len(src), step):
        yield _chunk_table(spec, src[start:start + step], domain, grid, skipped)


# ----------------------------------------------------------------------------- writing

def make_queries(spec: dict, out_dir: str | Path, data_dir: str | Path | None = None,
                 grid: ModelGrid | None = None) -> dict:
    """Write the query set of `spec` under `out_dir` (path or URI) within the model's `grid`
    (None: the dataset's for split sources, else the whole grid); returns the summary.

    Files are `part-NNNNN.parquet`, each written under a hidden temporary name and
    renamed when complete, plus `_summary.json`. Parts from an earlier run in the same
    folder are removed first, so the folder holds exactly this set.
    """
    spec = validate_spec(spec)
    with fs.local_output(out_dir) as local:
        for old in list(local.glob("part-*.parquet")) + list(local.glob("_summary.json")):
            old.unlink()
        files, rows, per_factor = [], 0, {}
        writer, in_file = None, 0

        def close():
            nonlocal writer
            if writer is not None:
                writer.close()
                os.replace(local / f".{files[-1]}.tmp", local / files[-1])
                writer = None

        num_sources, skipped = 0, {"sources": 0, "queries": 0}
        grid = query_grid(spec["sources"], data_dir, grid)
        domain = value_classes(spec["sources"], data_dir, grid)
        for table in iter_query_tables(spec, data_dir, domain, grid, skipped):
            num_sources += len(pc.unique(table["source_index"]))
            _count_by_factor(table, per_factor)
            offset = 0
            while offset < len(table):
                if writer is None or in_file >= spec["rows_per_file"]:
                    close()
                    files.append(f"part-{len(files):05d}.parquet")
                    writer = pq.ParquetWriter(local / f".{files[-1]}.tmp", QUERY_SCHEMA, compression="zstd")
                    in_file = 0
                take = min(spec["rows_per_file"] - in_file, len(table) - offset)
                writer.write_table(table.slice(offset, take))
                offset, in_file, rows = offset + take, in_file + take, rows + take
        close()
        reduced = {f: c.tolist() for f, c in domain.items() if len(c) < FACTOR_SIZES[f]}
        summary = {"num_queries": rows, "num_sources": num_sources, "files": files,
                   "queries_by_factor": per_factor, "value_classes": reduced, "spec": spec,
                   "grid": None if grid is None else grid.to_dict(), "skipped_off_grid": skipped,
                   "out": str(out_dir)}
        fs.write_text_atomic(local / "_summary.json", json.dumps(summary, indent=2))
    return summary


def _count_by_factor(table: pa.Table, counts: dict) -> None:
    """Count rows by their intervened factors ('shape', or 'scale+shape' for a joint do)."""
    flags = np.column_stack([table[f"do_{f}"].is_valid().to_numpy(zero_copy_only=False) for f in FACTORS])
    codes, n = np.unique(flags, axis=0, return_counts=True)
    for code, count in zip(codes, n):
        key = "+".join(f for f, on in zip(FACTORS, code) if on)
        counts[key] = counts.get(key, 0) + int(count)


