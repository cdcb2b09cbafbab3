"""The query job's output, committed atomically: the Ray Data sink that stages the answers,
the commit that replaces the output folder's contents, and the reader that trusts only a
committed output.

Output layout and commit protocol (docs/queries.md):
    out/results/part-*.parquet   RESULT_SCHEMA rows, one per sample
    out/errors/part-*.parquet    ERROR_SCHEMA rows, one per bad query
    out/_SUCCESS.json            the run's summary and the list of committed files, written last
    out/_LEASE.json              while a job runs: its lease on the folder (cvae.serve.lease)
A job first takes the folder's lease, so a second job into the same folder refuses
(OutputBusyError) instead of deleting the first one's staged files. Write tasks write into
out/_staging-<run id>/ (a name Parquet readers skip) through the output's filesystem, so
tasks on any node can write to shared or object storage; each file is written under a
temporary name and moved, and a write task reports the files it finished. Only when the
whole dataset is written does the driver delete unreported files (from killed or retried
tasks), remove _SUCCESS.json, replace results/ and errors/ (one rename each on local disk;
on object stores, where a rename is a copy, the old files are deleted and the new ones
moved one by one), and write _SUCCESS.json naming every committed file. A job killed at any
point, even mid-commit, leaves no _SUCCESS.json unless its output is complete, so readers
that require it (read_output, evaluate) never read a partial output; a rerun with the same
out deletes the dead run's staging folders and replaces the output, so it never holds
duplicates.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from cvae import fs as cfs
from cvae.data.grid import OFF_GRID
from cvae.errors import OutputExistsError, OutputLocationError
from cvae.serve.card import CARD, dataset_card
from cvae.serve.lease import OutputLease
from cvae.serve.schema import ERROR_SCHEMA, RESULT_SCHEMA, result_schema
from cvae.serve.verify import REJECTED, check_keep, counts, folders, split_rows, verified_count

# One table type flows from the actors to the sink: result rows and error rows side by side,
# told apart by `error` (null on result rows).
COMBINED_SCHEMA = pa.schema(list(RESULT_SCHEMA) + [pa.field("error", pa.string())])


COMBINED_VERIFIED = pa.schema(list(result_schema(True)) + [pa.field("error", pa.string())])


SUCCESS = "_SUCCESS.json"


STAGING_PREFIX = "_staging-"


def _children(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _has_rename(fs: pafs.FileSystem) -> bool:
    """Whether moving a folder is one rename (local disk, HDFS); object stores (S3, GCS)
    have no folder rename, and a file's move is a copy and a delete."""
    return fs.type_name in ("local", "hdfs")


def _move_file(fs: pafs.FileSystem, src: str, dst: str) -> None:
    fs.move(src, dst)


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move a folder: one rename where the filesystem has one, else file by file."""
    parent = dst.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if _has_rename(fs):
        fs.move(src, dst)
        return
    fs.create_dir(dst, recursive=True)
    for info in _children(fs, src):
        _move_file(fs, info.path, f"{dst}/{info.base_name}")
    fs.delete_dir(src)


def _remove_dir(fs: pafs.FileSystem, path: str, aside: str) -> None:
    """Take a committed folder out of the way: renamed to `aside` (deleted with the staging
    folder) where that is one rename, else deleted (on an object store moving it aside
    would copy every file only to delete it)."""
    if _has_rename(fs):
        fs.create_dir(aside.rsplit("/", 1)[0], recursive=True)
        fs.move(path, aside)
    else:
        fs.delete_dir(path)


class AtomicParquetSink(Datasink):
    """A Ray Data sink that splits result and error rows and commits them atomically.

    Everything goes through a pyarrow FileSystem (local, or a URI's), so write tasks on any
    node of a cluster write to the same shared or object storage as the driver.
    """

    def __init__(self, out_dir: str | Path, run_id: str | None = None, about: dict | None = None,
                 started: float | None = None, lease: OutputLease | None = None, verify: bool = False,
                 keep: str = "all", provenance: dict | None = None):
        """`about`: fields the summary (_SUCCESS.json) carries besides the row counts;
        `started`: the job's start time, for its `seconds`; `lease`: the job's lease on the
        folder (cvae.serve.lease), checked before the commit. Without one, the caller guarantees
        that no other job writes into the folder. `verify`: the rows carry the verify columns;
        `keep="verified"`: unverified rows go to rejected/ (cvae.serve.verify); `provenance`: what
        the dataset card (README.md, cvae.serve.card) says of where the rows come from."""
        self.fs, self.out = cfs.resolve(out_dir)
        self.out = self.out.rstrip("/")
        self.staging = f"{self.out}/{STAGING_PREFIX}{run_id or uuid.uuid4().hex}"
        self.about, self.started, self.lease = dict(about or {}), started, lease
        self.summary: dict = {}
        self.verify, self.keep = check_keep(keep, verify), keep
        self.provenance = provenance

    def __getstate__(self) -> dict:
        # Write tasks get a copy of the sink; the lease (a heartbeat thread) stays in the driver.
        return {**self.__dict__, "lease": None}

    def on_write_start(self, schema=None) -> None:
        self.fs.create_dir(self.out, recursive=True)
        for stale in _children(self.fs, self.out):  # left by a killed run (the lease keeps live ones out)
            if (stale.base_name.startswith(STAGING_PREFIX) and stale.type == pafs.FileType.Directory
                    and stale.path.rstrip("/") != self.staging):
                self.fs.delete_dir(stale.path)
        for folder in folders(self.keep):
            self.fs.create_dir(f"{self.staging}/{folder}", recursive=True)

    def write(self, blocks: Iterable, ctx) -> list[tuple[str, int, int]]:
        """Stage the blocks' result and error rows (and rejected ones); returns (file, rows, rows
        refused as off the model's grid, rows verified) per file written."""
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        combined = COMBINED_VERIFIED if self.verify else COMBINED_SCHEMA
        table = pa.concat_tables([t.cast(combined) for t in tables])
        written = []
        name = f"part-{uuid.uuid4().hex}.parquet"
        for folder, part in split_rows(table, self.verify, self.keep):
            if part.num_rows:
                final = f"{self.staging}/{folder}/{name}"
                tmp = f"{self.staging}/{folder}/.{name}.tmp"
                pq.write_table(part, tmp, filesystem=self.fs)
                self.fs.move(tmp, final)  # a file under its final name is always complete
                off_grid = 0
                if folder == "errors":
                    off_grid = pc.sum(pc.match_substring(part.column("error"), OFF_GRID)).as_py() or 0
                written.append((f"{folder}/{name}", part.num_rows, off_grid, verified_count(folder, part)))
        return written

    def on_write_complete(self, write_result) -> None:
        if self.lease is not None:
            self.lease.check()  # another job took the folder over: its output, not ours
        reported = [item for returned in write_result.write_returns for item in (returned or [])]
        keep = {name for name, *_ in reported}
        staged = set()
        for folder in folders(self.keep):
            for f in _children(self.fs, f"{self.staging}/{folder}"):
                if f"{folder}/{f.base_name}" not in keep:  # a killed or retried task's leftovers
                    self.fs.delete_file(f.path)
                else:
                    staged.add(f"{folder}/{f.base_name}")
        if keep - staged:
            raise OutputLocationError(
                f"output {self.about.get('out', self.out)}: {len(keep - staged)} file(s) written by this job are "
                f"missing from {self.staging} (deleted by another job writing into the folder?); not committing")
        self._mark_empty_folders(keep)
        self.summary = {**counts(reported, self.verify, self.keep), **self.about}
        if self.started is not None:
            self.summary["seconds"] = round(time.time() - self.started, 3)
        committed = {folder: sorted(n.split("/", 1)[1] for n in keep if n.startswith(f"{folder}/"))
                     for folder in folders(self.keep)}
        card = dataset_card(self.summary, self.provenance)
        if self.provenance is not None:
            self.summary["provenance"] = self.provenance
        commit(self.fs, self.staging, self.out, {**self.summary, "committed": committed}, {CARD: card})

    def _mark_empty_folders(self, keep: set) -> None:
        """A folder no row went to gets one empty part in its schema (added to `keep`), so that
        reading it gives its columns, not a table without any (rejected/ of a job whose every
        answer verified, results/ of a job whose every row failed)."""
        schemas = {"results": result_schema(self.verify), "errors": ERROR_SCHEMA, REJECTED: result_schema(True)}
        for folder in folders(self.keep):
            if not any(name.startswith(f"{folder}/") for name in keep):
                name = f"{folder}/part-empty.parquet"
                pq.write_table(schemas[folder].empty_table(), f"{self.staging}/{name}", filesystem=self.fs)
                keep.add(name)

    def on_write_failed(self, error: Exception) -> None:
        try:
            self.fs.delete_dir(self.staging)
        except OSError:
            pass


def write_marker(fs: pafs.FileSystem, out: str, summary: dict) -> None:
    """_SUCCESS.json under a temporary name, then moved: readers never see half of it."""
    tmp = f"{out}/.{SUCCESS}.tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(json.dumps(summary, indent=2, sort_keys=True).encode())
    fs.move(tmp, f"{out}/{SUCCESS}")


def commit(fs: pafs.FileSystem, staging: str, out: str, summary: dict, files: dict | None = None) -> None:
    """Replace out/{errors,results} by staging/{errors,results}, then write _SUCCESS.json last.

    `summary` (the marker's content) lists the committed files under "committed"; `files`
    ({name: text}, the dataset card) are written beside them before the marker. Killed
    anywhere in here, the job leaves no _SUCCESS.json: readers refuse the folder until a
    rerun commits it again whole (its start deletes this run's staging folder)."""
    marker = f"{out}/{SUCCESS}"
    if _exists(fs, marker):
        fs.delete_file(marker)  # from here until the end, the output is not complete
    for folder in ("errors", "rejected", "results"):  # rejected/: only under keep=verified
        if _exists(fs, f"{out}/{folder}"):
            _remove_dir(fs, f"{out}/{folder}", f"{staging}/old/{folder}")
        if folder != "rejected" or _exists(fs, f"{staging}/{folder}"):
            _move_dir(fs, f"{staging}/{folder}", f"{out}/{folder}")
    for name, text in (files or {}).items():
        with fs.open_output_stream(f"{out}/.{name}.tmp") as fh:
            fh.write(text.encode())
        fs.move(f"{out}/.{name}.tmp", f"{out}/{name}")
    write_marker(fs, out, summary)
    fs.delete_dir(staging)


def read_output(out_dir: str | Path) -> tuple[pa.Table, pa.Table]:
    """(results, errors) of a committed run (path or URI); refuses an output without _SUCCESS.json.

    Reads exactly the files _SUCCESS.json lists (every Parquet file of the folders for a
    marker written before it listed them), and refuses an output missing one of them."""
    fs, out = cfs.resolve(out_dir)
    out = out.rstrip("/")
    marker = f"{out}/{SUCCESS}"
    if fs.get_file_info(marker).type != pafs.FileType.File:
        raise FileNotFoundError(f"{out_dir}: no committed output ({SUCCESS} missing)")
    with fs.open_input_stream(marker) as fh:
        marker_summary = json.loads(fh.read() or b"{}") or {}
    committed, verify = marker_summary.get("committed"), marker_summary.get("verify")

    def read(folder, schema):
        if committed is None:
            files = sorted(f.path for f in _children(fs, f"{out}/{folder}")
                           if f.base_name.endswith(".parquet") and f.type == pafs.FileType.File)
        else:
            files = [f"{out}/{folder}/{name}" for name in committed.get(folder, [])]
            missing = [f for f, info in zip(files, fs.get_file_info(files)) if info.type != pafs.FileType.File]
            if missing:
                raise FileNotFoundError(f"{out_dir}: {len(missing)} committed file(s) missing, e.g. {missing[0]}")
        tables = [pq.read_table(f, schema=schema, filesystem=fs) for f in files]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    return read("results", result_schema(bool(verify))), read("errors", ERROR_SCHEMA)


def refuse_finished(out_dir: str | Path) -> None:
    """OutputExistsError, in one line, for a folder holding a committed output."""
    fs, out = cfs.resolve(out_dir)
    marker = f"{out.rstrip('/')}/{SUCCESS}"
    if not _exists(fs, marker):
        return
    try:
        rows = json.loads(fs.open_input_stream(marker).read()).get("result_rows")
    except (OSError, ValueError, AttributeError):
        rows = None
    held = f" ({rows:,} result rows)" if isinstance(rows, int) else ""
    raise OutputExistsError(f"output {out_dir}: already holds a finished query output{held}, committed by "
                            f"{SUCCESS}; pass --overwrite (overwrite=True) to replace it, or choose another folder")
