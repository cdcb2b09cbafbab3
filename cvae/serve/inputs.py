"""The query job's whole-input checks, in the driver before any Ray work: the Parquet files
of a query file or folder (path or URI), their schemas and row counts, and the query_ids that
occur more than once in the whole input (cvae.serve.engine passes them to every actor)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cvae import fs as cfs
from cvae.serve.queries import QuerySchemaError, check_schema


def list_queries(path: str | Path) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted Parquet files) of a query file or folder, given as a path or URI."""
    try:
        fs, root = cfs.resolve(path)
        info = fs.get_file_info(root)
    except (ValueError, OSError) as exc:
        raise QuerySchemaError(f"{path}: cannot open: {exc}") from None
    if info.type == pafs.FileType.Directory:
        files = cfs.parquet_files(fs, root)
        if not files:
            raise QuerySchemaError(f"{path}: no .parquet files in this folder")
        return fs, files
    if info.type == pafs.FileType.File:
        return fs, [root]
    raise QuerySchemaError(f"{path}: no such file or folder")


def inspect_queries(path: str | Path) -> tuple[pafs.FileSystem, list[str], int, frozenset]:
    """Whole-input checks before any work: (filesystem, parquet files, row count, duplicated query_ids).

    Raises QuerySchemaError naming the file for a missing/mistyped column or an unreadable file.
    """
    fs, files = list_queries(path)
    rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f, filesystem=fs)
            schema = pq.read_schema(f, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise QuerySchemaError(f"{f}: not a readable Parquet file: {exc}") from None
        check_schema(schema, where=f)
        rows += meta.num_rows
    # Count ids over the whole input (Arrow memory: about 20-30 bytes per query id).
    ids = pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=["query_id"]).column("query_id")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    duplicates = frozenset(v for v in dup.to_pylist() if v is not None)
    return fs, files, rows, duplicates
