"""The batch query engine: Parquet queries -> a Ray Data actor pool holding the SCM -> Parquet.

    read_parquet(queries) -> map_batches(QueryActor, concurrency=actors) -> AtomicParquetSink

Before any Ray work the driver checks every input file's schema (a whole-file problem is
a QuerySchemaError) and counts query_ids over the whole input, so duplicates are found
across blocks, not only within one.

Output layout and commit protocol (docs/queries.md):
    out_dir/results/part-*.parquet   RESULT_SCHEMA rows, one per sample
    out_dir/errors/part-*.parquet    ERROR_SCHEMA rows, one per bad query
    out_dir/_SUCCESS.json            the run's summary, written last
Write tasks write into out_dir/_staging-<run id>/ (a name Parquet readers skip); each file
is written under a temporary name and renamed, and a write task reports the files it
finished. Only when the whole dataset is written does the driver move the reported files
into place (files from killed or retried tasks were never reported and are dropped), swap
the folders in, and write _SUCCESS.json. A killed job leaves nothing partial in results/
or errors/; a rerun with the same out_dir removes stale staging folders and replaces the
output, so it never holds duplicates.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data import Datasink

from cvae.queries import ERROR_SCHEMA, RESULT_SCHEMA, QuerySchemaError, answer_queries, check_schema

# One table type flows from the actors to the sink: result rows and error rows side by side,
# told apart by `error` (null on result rows).
COMBINED_SCHEMA = pa.schema(list(RESULT_SCHEMA) + [pa.field("error", pa.string())])
SUCCESS = "_SUCCESS.json"
STAGING_PREFIX = "_staging-"


def inspect_queries(path: str | Path) -> tuple[list[str], int, frozenset]:
    """Whole-input checks before any work: (parquet files, row count, duplicated query_ids).

    Raises QuerySchemaError naming the file for a missing/mistyped column or an unreadable file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet")
                       if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
        if not files:
            raise QuerySchemaError(f"{path}: no .parquet files in this folder")
    elif path.is_file():
        files = [str(path)]
    else:
        raise QuerySchemaError(f"{path}: no such file or folder")
    rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f)
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise QuerySchemaError(f"{f}: not a readable Parquet file: {exc}") from None
        check_schema(schema, where=f)
        rows += meta.num_rows
    # Count ids over the whole input (Arrow memory: about 20-30 bytes per query id).
    ids = pads.dataset(files, format="parquet").to_table(columns=["query_id"]).column("query_id")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    duplicates = frozenset(v for v in dup.to_pylist() if v is not None)
    return files, rows, duplicates


class QueryActor:
    """Holds one ImageSCM (loaded once per actor) and answers a batch per call."""

    def __init__(self, checkpoint_dir: str, max_samples: int, duplicate_ids: frozenset):
        from cvae.scm import ImageSCM

        self.scm = ImageSCM.from_checkpoint(checkpoint_dir)
        self.max_samples = max_samples
        self.duplicate_ids = duplicate_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        results, errors = answer_queries(self.scm, batch, self.max_samples, self.duplicate_ids)
        return combine(results, errors)


def combine(results: pa.Table, errors: pa.Table) -> pa.Table:
    results = results.append_column("error", pa.nulls(results.num_rows, pa.string()))
    columns = [errors.column(name) if name in ERROR_SCHEMA.names else pa.nulls(errors.num_rows, field.type)
               for name, field in zip(COMBINED_SCHEMA.names, COMBINED_SCHEMA)]
    errors = pa.Table.from_arrays(columns, schema=COMBINED_SCHEMA)
    return pa.concat_tables([results.cast(COMBINED_SCHEMA), errors])


class AtomicParquetSink(Datasink):
    """A Ray Data sink that splits result and error rows and commits them atomically."""

    def __init__(self, out_dir: str | Path, run_id: str | None = None):
        self.out_dir = Path(out_dir).resolve()
        self.staging = self.out_dir / f"{STAGING_PREFIX}{run_id or uuid.uuid4().hex}"
        self.summary: dict = {}

    def on_write_start(self, schema=None) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(f"{STAGING_PREFIX}*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        (self.staging / "results").mkdir(parents=True)
        (self.staging / "errors").mkdir(parents=True)

    def write(self, blocks: Iterable, ctx) -> list[tuple[str, int]]:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables([t.cast(COMBINED_SCHEMA) for t in tables])
        is_error = pc.is_valid(table.column("error"))
        written = []
        name = f"part-{uuid.uuid4().hex}.parquet"
        for folder, rows, schema in (("results", pc.invert(is_error), RESULT_SCHEMA),
                                     ("errors", is_error, ERROR_SCHEMA)):
            part = table.filter(rows).select(schema.names).cast(schema)
            if part.num_rows:
                final = self.staging / folder / name
                tmp = final.with_name("." + name + ".tmp")
                pq.write_table(part, tmp)
                os.replace(tmp, final)  # a file under its final name is always complete
                written.append((f"{folder}/{name}", part.num_rows))
        return written

    def on_write_complete(self, write_result) -> None:
        reported = [item for returned in write_result.write_returns for item in (returned or [])]
        keep = {name for name, _ in reported}
        for folder in ("results", "errors"):
            for f in (self.staging / folder).iterdir():
                if f"{folder}/{f.name}" not in keep:  # a killed or retried task's leftovers
                    f.unlink()
        counts = {"results": 0, "errors": 0}
        for name, rows in reported:
            counts[name.split("/")[0]] += rows
        self.summary = {"result_rows": counts["results"], "error_rows": counts["errors"],
                        "result_files": sum(n.startswith("results/") for n, _ in reported),
                        "error_files": sum(n.startswith("errors/") for n, _ in reported)}
        commit(self.staging, self.out_dir, self.summary)

    def on_write_failed(self, error: Exception) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def commit(staging: Path, out_dir: Path, summary: dict) -> None:
    """Swap staging/{errors,results} into out_dir, then write _SUCCESS.json last."""
    marker = out_dir / SUCCESS
    marker.unlink(missing_ok=True)  # from here until the end, the output is not complete
    old = staging / "old"
    old.mkdir()
    for folder in ("errors", "results"):
        if (out_dir / folder).exists():
            os.replace(out_dir / folder, old / folder)
        os.replace(staging / folder, out_dir / folder)
    tmp = out_dir / (SUCCESS + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.replace(tmp, marker)
    shutil.rmtree(staging, ignore_errors=True)


def run_query_job(checkpoint_dir: str | Path, queries_path: str | Path, out_dir: str | Path,
                  actors: int = 2, batch_size: int = 1024, gpus_per_actor: float = 0.0,
                  cpus_per_actor: float = 1.0, max_samples: int = 64,
                  ray_address: str | None = None, num_cpus: int | None = None) -> dict:
    """Answer every query of a Parquet file or folder into out_dir (see the module docstring).

    Uses the running Ray, else connects to `ray_address` (or starts a local Ray with
    `num_cpus`) after the input checks. Raises QuerySchemaError before any work for a
    whole-input problem; bad rows go to out_dir/errors.
    """
    import ray

    from cvae.checkpoint import load_meta

    started = time.time()
    load_meta(checkpoint_dir)  # a missing or broken checkpoint fails here, not in every actor
    files, rows, duplicates = inspect_queries(queries_path)
    checkpoint_dir = str(Path(checkpoint_dir).resolve())
    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=None if ray_address else num_cpus)
    ds = ray.data.read_parquet(files)
    ds = ds.map_batches(
        QueryActor,
        fn_constructor_kwargs={"checkpoint_dir": checkpoint_dir, "max_samples": max_samples,
                               "duplicate_ids": duplicates},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=actors,
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )
    sink = AtomicParquetSink(out_dir)
    ds.write_datasink(sink)
    summary = json.loads((Path(out_dir) / SUCCESS).read_text())
    summary.update({"queries": rows, "duplicate_ids": len(duplicates),
                    "seconds": round(time.time() - started, 3), "out": str(Path(out_dir).resolve())})
    (Path(out_dir) / (SUCCESS + ".tmp")).write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.replace(Path(out_dir) / (SUCCESS + ".tmp"), Path(out_dir) / SUCCESS)
    return summary


def read_output(out_dir: str | Path) -> tuple[pa.Table, pa.Table]:
    """(results, errors) of a committed run; refuses an output without _SUCCESS.json."""
    out_dir = Path(out_dir)
    if not (out_dir / SUCCESS).is_file():
        raise FileNotFoundError(f"{out_dir}: no committed output ({SUCCESS} missing)")

    def read(folder, schema):
        files = sorted((out_dir / folder).glob("*.parquet")) if (out_dir / folder).is_dir() else []
        return pa.concat_tables([pq.read_table(f, schema=schema) for f in files]) if files else schema.empty_table()

    return read("results", RESULT_SCHEMA), read("errors", ERROR_SCHEMA)
