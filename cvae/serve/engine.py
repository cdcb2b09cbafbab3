"""The batch query engine: Parquet queries -> a Ray Data actor pool holding the SCM -> Parquet.

    query_blocks(queries) -> map_batches(QueryActor, ActorPoolStrategy(size=actors)) -> AtomicParquetSink

The checkpoint, the queries and the output folder may each be a local path or a URI that
pyarrow's filesystems handle (file://, s3://, gs://): the queries are read and the output is
written through that filesystem, and each actor stages the checkpoint to its local disk.

Before any Ray work the driver checks every input file's schema (a whole-file problem is
a QuerySchemaError) and counts query_ids over the whole input, so duplicates are found
across blocks, not only within one.

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
import math
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from cvae import fs as cfs
from cvae.config import ConfigError
from cvae.data.grid import OFF_GRID
from cvae.errors import OutputExistsError, OutputLocationError
from cvae.localray import init_ray
from cvae.serve.card import CARD, dataset_card, provenance
from cvae.serve.inputs import inspect_queries, list_queries  # noqa: F401 (re-exported)
from cvae.serve.lease import OutputLease
from cvae.serve.queries import ERROR_SCHEMA, RESULT_SCHEMA, answer_queries, result_schema
from cvae.serve.verify import check_keep, counts, folders, split_rows, verified_count

# One table type flows from the actors to the sink: result rows and error rows side by side,
# told apart by `error` (null on result rows).
COMBINED_SCHEMA = pa.schema(list(RESULT_SCHEMA) + [pa.field("error", pa.string())])
COMBINED_VERIFIED = pa.schema(list(result_schema(True)) + [pa.field("error", pa.string())])
SUCCESS = "_SUCCESS.json"
STAGING_PREFIX = "_staging-"


class QueryActor:
    """Holds one ImageSCM (loaded once per actor) and answers a batch per call."""

    def __init__(self, checkpoint: str, max_samples: int, duplicate_ids: frozenset, threads: int = 1,
                 verify: bool = False):
        import torch

        from cvae.causal.image import ImageSCM
        from cvae.model.checkpoint import META, PRETRAINED, WEIGHTS, pretrained_checkpoint

        if checkpoint == PRETRAINED:  # the copy installed on this actor's node, checksums checked
            checkpoint = str(pretrained_checkpoint())
        # As many matmul threads as CPUs reserved for this actor (Ray sets one otherwise).
        torch.set_num_threads(max(1, threads))
        # A URI is copied to local disk for the load (weights and meta only), then removed.
        with cfs.staged(checkpoint, only=None if not cfs.is_uri(checkpoint) else [WEIGHTS, META]) as local:
            self.scm = ImageSCM.from_checkpoint(local)
        self.max_samples = max_samples
        self.duplicate_ids = duplicate_ids
        self.verifier = None
        if verify:  # the readout index, built once per actor (cvae.serve.verify)
            from cvae.serve.verify import Verifier

            self.verifier = Verifier.of(self.scm)

    def __call__(self, packed: pa.Table) -> pa.Table:
        """Rows of query_blocks' packed column in (one per call as the engine runs it), the
        answers to their queries out."""
        schema = COMBINED_VERIFIED if self.verifier is not None else COMBINED_SCHEMA
        answers = [combine(*answer_queries(self.scm, unpack(block), self.max_samples, self.duplicate_ids,
                                           self.verifier), schema=schema)
                   for block in packed.column(PACKED)]
        return pa.concat_tables(answers) if answers else schema.empty_table()


def combine(results: pa.Table, errors: pa.Table, schema: pa.Schema = COMBINED_SCHEMA) -> pa.Table:
    results = results.append_column("error", pa.nulls(results.num_rows, pa.string()))
    columns = [errors.column(name) if name in ERROR_SCHEMA.names else pa.nulls(errors.num_rows, field.type)
               for name, field in zip(schema.names, schema)]
    errors = pa.Table.from_arrays(columns, schema=schema)
    return pa.concat_tables([results.cast(schema), errors])


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
        from ray.data.block import BlockAccessor

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
        self.summary = {**counts(reported, self.verify, self.keep), **self.about}
        if self.started is not None:
            self.summary["seconds"] = round(time.time() - self.started, 3)
        committed = {folder: sorted(n.split("/", 1)[1] for n in keep if n.startswith(f"{folder}/"))
                     for folder in folders(self.keep)}
        card = dataset_card(self.summary, self.provenance)
        if self.provenance is not None:
            self.summary["provenance"] = self.provenance
        commit(self.fs, self.staging, self.out, {**self.summary, "committed": committed}, {CARD: card})

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


def run_query_job(checkpoint_dir: str | Path, queries_path: str | Path, out_dir: str | Path,
                  actors: int = 2, batch_size: int = 4096, gpus_per_actor: float = 0.0,
                  cpus_per_actor: float = 1.0, max_samples: int = 64,
                  ray_address: str | None = None, num_cpus: int | None = None,
                  lease_timeout: float | None = None, overwrite: bool = False, verify: bool = False,
                  keep: str = "all", command: str | None = None) -> dict:
    """Answer every query of a Parquet file or folder into out_dir (see the module docstring).

    Each of the three locations may be a local path or a pyarrow filesystem URI; the
    checkpoint may also be a training run folder (its best checkpoint is used, see
    cvae.model.checkpoint.resolve_checkpoint). Before any Ray work the checkpoint is loaded once
    (CheckpointError), the queries checked (QuerySchemaError) and the output location
    created and written to (OutputLocationError). Then uses the running Ray, else connects
    to `ray_address` (or starts a local Ray with `num_cpus`). Bad rows go to out_dir/errors.

    While it runs the job holds the output folder's lease (cvae.serve.lease; stale after
    `lease_timeout` seconds without a heartbeat, default 60 or $CVAE_LEASE_TIMEOUT_S): a
    second job into the same folder raises OutputBusyError before any Ray work.

    A folder that already holds a committed output (_SUCCESS.json) is refused with
    OutputExistsError unless `overwrite`; one left by a killed job (no _SUCCESS.json) is
    taken over as always. An empty query set commits an empty output without starting Ray.

    `verify`: every answer is read back over the whole grid in the actors and its row gains
    the verify columns; `keep="verified"` (which implies it) writes unverified rows to
    rejected/ instead of results/ (cvae.serve.verify). The folder's README.md is a dataset
    card (cvae.serve.card) naming `command`, the checkpoint, the code's commit and the queries.
    """
    from cvae.model.checkpoint import PRETRAINED, CheckpointError, check_checkpoint, resolve_checkpoint

    started = time.time()
    # The actors load `pretrained` from their own node's installed copy (the package's path
    # may differ between nodes); any other checkpoint by its absolute path or URI.
    pretrained = str(checkpoint_dir) == PRETRAINED
    # A run folder becomes its best checkpoint; a missing, corrupt or malicious checkpoint
    # fails here in the driver, before Ray starts, not in every actor.
    checkpoint_dir = resolve_checkpoint(checkpoint_dir)
    meta = check_checkpoint(checkpoint_dir)
    verify = check_keep(keep, verify)
    if verify and not meta.get("manifest"):
        raise CheckpointError(f"{checkpoint_dir}: --verify reads answers back against the ground truth of the "
                              "checkpoint's data manifest, and this checkpoint has none")
    fs, files, rows, duplicates = inspect_queries(queries_path)
    cfs.check_writable(out_dir)  # /proc/x or a read-only bucket fails here, not after the actors
    if not overwrite:
        _refuse_finished(out_dir)
    # Actors may run on other nodes: give them an absolute path (or the URI as is).
    if pretrained:
        checkpoint = PRETRAINED
    else:
        checkpoint = str(checkpoint_dir) if cfs.is_uri(checkpoint_dir) else str(Path(checkpoint_dir).resolve())
    run_id = uuid.uuid4().hex
    try:
        # on_write_complete runs here in the driver, so the sink's summary is the job's.
        lease = OutputLease(out_dir, run_id, timeout_s=lease_timeout, what="query job")
        sink = AtomicParquetSink(out_dir, run_id=run_id, about={"queries": rows, "duplicate_ids": len(duplicates)},
                                 started=started, lease=lease, verify=verify, keep=keep,
                                 provenance=provenance(checkpoint_dir, pretrained, str(queries_path), command))
        sink.about["out"] = str(out_dir) if cfs.is_uri(out_dir) else sink.out
    except ValueError as exc:
        raise OutputLocationError(f"output {out_dir}: {exc}") from None
    with lease:  # OutputBusyError while another live job writes into out_dir
        if rows == 0:  # nothing to answer: an empty committed output, no Ray
            sink.on_write_start()
            sink.on_write_complete(SimpleNamespace(write_returns=[]))
        else:
            _run(sink, checkpoint, files, fs, duplicates, actors, block_rows(rows, batch_size, actors),
                 gpus_per_actor, cpus_per_actor, max_samples, ray_address, num_cpus)
    return sink.summary


def _refuse_finished(out_dir: str | Path) -> None:
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


def block_rows(rows: int, batch_size: int, actors: int) -> int:
    """Query rows per actor call: at most batch_size, with the number of blocks rounded up
    to a multiple of the actors, so the last round of calls keeps every actor busy.

    2,000 rows and 2 actors: two blocks of 1,000, not one of 2,000. 20,000 rows, 2 actors,
    batch 4,096: six blocks of 3,334, where five (four of 4,096 and one of 3,616) left one
    actor idle for the whole last call, 2.3 of the job's 11.8 s. Answers do not depend on
    it (cvae.causal.image: fixed-size network chunks)."""
    actors = max(1, actors)
    blocks = math.ceil(max(1, rows) / max(1, batch_size) / actors) * actors
    return max(1, math.ceil(rows / blocks))


def _run(sink: AtomicParquetSink, checkpoint: str, files: list[str], fs: pafs.FileSystem, duplicates: frozenset,
         actors: int, batch_size: int, gpus_per_actor: float, cpus_per_actor: float, max_samples: int,
         ray_address: str | None, num_cpus: int | None) -> None:
    """The Ray part of run_query_job: the query blocks -> actor pool -> sink pipeline."""
    import ray

    # The actors must leave a CPU for Ray Data's write tasks: with every CPU held by an actor,
    # answers would pile up unwritten until Ray Data's backpressure stalled the actors too.
    needed = actors * cpus_per_actor + 1
    if not ray.is_initialized():
        local_cpus = max(num_cpus or os.cpu_count() or 1, math.ceil(needed))  # logical CPUs
        init_ray(ray_address, num_cpus=local_cpus)
    total = ray.cluster_resources().get("CPU", 0)
    if total < needed:
        raise ConfigError(
            f"query.actors: the Ray cluster has {total:g} CPUs; {actors} actors x {cpus_per_actor:g} CPUs plus "
            f"one for writing need {needed:g}: use fewer actors or cpus_per_actor")
    ds = ray.data.from_arrow_refs(query_blocks(files, fs, batch_size))
    ds = ds.map_batches(
        QueryActor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "max_samples": max_samples,
                               "duplicate_ids": duplicates, "threads": max(1, round(cpus_per_actor)),
                               "verify": sink.verify},
        batch_size=1,  # one packed block of batch_size queries per call
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )
    ds.write_datasink(sink)


PACKED = "packed_queries"  # query_blocks' one column: a block of queries per row


def query_blocks(files: list[str], fs: pafs.FileSystem, block_rows: int) -> list:
    """The query files read here in the driver and put into the object store in blocks of at
    most block_rows queries (one actor call each). Each block is a one-row table: its
    queries as an Arrow IPC stream compressed with zstd (unpack), about 16 bytes a query
    without a source image against 200 as an Arrow table, so even 100M queries fit.

    The driver has read every footer and query id already (inspect_queries). Blocks the
    driver puts live on its node, so no worker node's loss can take input with it or leave
    a read to redo. With Ray Data's read_parquet, read tasks redone after a node loss could
    find no whole CPU free beside the actors (fractional actors leave fractions) and the job
    waited forever, and Ray 2.60's reader lists files with 32 footer-reading actors spread
    over the cluster, whose loss failed the whole job.
    """
    import ray

    options = pa.ipc.IpcWriteOptions(compression="zstd")
    refs = []
    for f in files:
        with fs.open_input_file(f) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=block_rows):
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, batch.schema, options=options) as stream:
                    stream.write_batch(batch)
                refs.append(ray.put(pa.table({PACKED: pa.array([sink.getvalue().to_pybytes()], pa.large_binary())})))
    return refs


def unpack(block: pa.Scalar) -> pa.Table:
    """The queries of one query_blocks block."""
    return pa.ipc.open_stream(block.as_buffer()).read_all()


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
