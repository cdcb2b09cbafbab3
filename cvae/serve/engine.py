"""The batch query engine: Parquet queries -> a Ray Data actor pool holding the SCM -> Parquet.

    query_blocks(queries) -> map_batches(QueryActor, ActorPoolStrategy(size=actors)) -> AtomicParquetSink

The checkpoint, the queries and the output folder may each be a local path or a URI that
pyarrow's filesystems handle (file://, s3://, gs://): the queries are read and the output is
written through that filesystem, and each actor stages the checkpoint to its local disk.

Before any Ray work the driver checks every input file's schema (a whole-file problem is
a QuerySchemaError) and counts query_ids over the whole input, so duplicates are found
across blocks, not only within one.

The output is committed atomically, `_SUCCESS.json` last, by cvae.serve.commit.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from cvae import fs as cfs
from cvae.errors import ConfigError, OutputLocationError
from cvae.localray import init_ray
from cvae.logs import quiet_ray_data
from cvae.model.checkpoint import PRETRAINED, CheckpointError, check_checkpoint, resolve_checkpoint
from cvae.serve.card import provenance
from cvae.serve.commit import (  # noqa: F401 (SUCCESS, read_output: re-exported, the job's output)
    COMBINED_SCHEMA,
    COMBINED_VERIFIED,
    SUCCESS,
    AtomicParquetSink,
    read_output,
    refuse_finished,
)
from cvae.serve.inputs import inspect_queries, list_queries  # noqa: F401 (re-exported)
from cvae.serve.lease import OutputLease
from cvae.serve.queries import ERROR_SCHEMA, answer_queries
from cvae.serve.verify import check_keep


class QueryActor:
    """Holds one ImageSCM (loaded once per actor) and answers a batch per call."""

    def __init__(self, checkpoint: str, max_samples: int, duplicate_ids: frozenset, threads: int = 1,
                 verify: bool = False):
        # Kept lazy: torch and the model load in the actor, not in a driver that only plans the job.
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
    started = time.time()
    pretrained = str(checkpoint_dir) == PRETRAINED
    checkpoint_dir, verify = _check_checkpoint(checkpoint_dir, check_keep(keep, verify))
    fs, files, rows, duplicates = inspect_queries(queries_path)
    cfs.check_writable(out_dir)  # /proc/x or a read-only bucket fails here, not after the actors
    if not overwrite:
        refuse_finished(out_dir)
    # The actors load `pretrained` from their own node's installed copy (the package's path
    # may differ between nodes); any other checkpoint by its absolute path or URI, as actors
    # may run on other nodes.
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
            _run(sink, PoolRun(checkpoint, files, fs, duplicates, actors, block_rows(rows, batch_size, actors),
                               gpus_per_actor, cpus_per_actor, max_samples, ray_address, num_cpus))
    return sink.summary


def _check_checkpoint(checkpoint_dir: str | Path, verify: bool) -> tuple[str, bool]:
    """The checkpoint to answer with, checked here in the driver before Ray starts, not in
    every actor: a run folder becomes its best checkpoint; a missing, corrupt or malicious
    one is a CheckpointError, as is --verify without the data manifest it reads back against."""
    checkpoint_dir = resolve_checkpoint(checkpoint_dir)
    meta = check_checkpoint(checkpoint_dir)
    if verify and not meta.get("manifest"):
        raise CheckpointError(f"{checkpoint_dir}: --verify reads answers back against the ground truth of the "
                              "checkpoint's data manifest, and this checkpoint has none")
    return checkpoint_dir, verify


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


@dataclass(frozen=True)
class PoolRun:
    """What the Ray part of a query job needs beside its sink: the checkpoint the actors
    load, the checked query files, and how the actor pool runs (run_query_job's arguments)."""
    checkpoint: str  # `pretrained`, an absolute path or a URI: what every actor loads
    files: list[str]  # the query files, on `fs`
    fs: pafs.FileSystem
    duplicates: frozenset  # query_ids seen more than once over the whole input
    actors: int
    block_rows: int  # queries per actor call (block_rows())
    gpus_per_actor: float
    cpus_per_actor: float
    max_samples: int
    ray_address: str | None
    num_cpus: int | None  # CPUs of a local Ray started here


def _run(sink: AtomicParquetSink, run: PoolRun) -> None:
    """The Ray part of run_query_job: the query blocks -> actor pool -> sink pipeline."""
    actors, cpus_per_actor = run.actors, run.cpus_per_actor
    # The actors must leave a CPU for Ray Data's write tasks: with every CPU held by an actor,
    # answers would pile up unwritten until Ray Data's backpressure stalled the actors too.
    needed = actors * cpus_per_actor + 1
    if not ray.is_initialized():
        local_cpus = max(run.num_cpus or os.cpu_count() or 1, math.ceil(needed))  # logical CPUs
        init_ray(run.ray_address, num_cpus=local_cpus)
    total = ray.cluster_resources().get("CPU", 0)
    if total < needed:
        raise ConfigError(
            f"query.actors: the Ray cluster has {total:g} CPUs; {actors} actors x {cpus_per_actor:g} CPUs plus "
            f"one for writing need {needed:g}: use fewer actors or cpus_per_actor")
    quiet_ray_data()
    # from_items, not from_arrow_refs: its blocks' metadata is read here, where
    # from_arrow_refs runs a remote task per block, 2 s of a small job's start-up.
    blocks = query_blocks(run.files, run.fs, run.block_rows)
    ds = ray.data.from_items([{PACKED: block} for block in blocks], override_num_blocks=len(blocks))
    ds = ds.map_batches(
        QueryActor,
        fn_constructor_kwargs={"checkpoint": run.checkpoint, "max_samples": run.max_samples,
                               "duplicate_ids": run.duplicates, "threads": max(1, round(cpus_per_actor)),
                               "verify": sink.verify},
        batch_size=1,  # one packed block of batch_size queries per call
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=run.gpus_per_actor,
        num_cpus=cpus_per_actor,
    )
    ds.write_datasink(sink)


PACKED = "packed_queries"  # query_blocks' one column: a block of queries per row


def query_blocks(files: list[str], fs: pafs.FileSystem, block_rows: int) -> list[bytes]:
    """The query files read here in the driver, in blocks of at most block_rows queries (one
    actor call each, the Dataset's rows). Each block holds its queries as an Arrow IPC
    stream compressed with zstd (unpack), about 16 bytes a query without a source image
    against 200 as an Arrow table, so even 100M queries fit.

    The driver has read every footer and query id already (inspect_queries). Blocks the
    driver puts live on its node, so no worker node's loss can take input with it or leave
    a read to redo. With Ray Data's read_parquet, read tasks redone after a node loss could
    find no whole CPU free beside the actors (fractional actors leave fractions) and the job
    waited forever, and Ray 2.60's reader lists files with 32 footer-reading actors spread
    over the cluster, whose loss failed the whole job.
    """
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    blocks = []
    for f in files:
        with fs.open_input_file(f) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=block_rows):
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, batch.schema, options=options) as stream:
                    stream.write_batch(batch)
                blocks.append(sink.getvalue().to_pybytes())
    return blocks


def unpack(block: pa.Scalar) -> pa.Table:
    """The queries of one query_blocks block."""
    return pa.ipc.open_stream(block.as_buffer()).read_all()


