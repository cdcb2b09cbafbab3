"""Every job against a real S3-compatible server (moto's server mode on 127.0.0.1) through s3:// URIs.

The server and its endpoint are found the standard way: AWS_ENDPOINT_URL (pyarrow >= 15 and
boto3 read it), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION. Ray's worker processes
(Ray Train workers, query actors, Ray Data tasks) get their environment from the raylet, which
inherits the driver's environment when `ray.init` starts it. So the variables are set when this
module is imported: pytest imports every test module before any fixture runs, so the session's
Ray (tests/conftest.py) starts after them. The `bucket` fixture checks that a Ray worker sees
the endpoint, and restarts Ray with them only if one was started earlier (as in a session that
imported this module late).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from cvae import fs as cfs
from cvae.serve import commit, engine
from cvae.serve.engine import SUCCESS, read_output
from cvae.serve.lease import LEASE, _pid_namespace
from cvae.serve.queries import ERROR_SCHEMA, QUERY_SCHEMA, RESULT_SCHEMA
from scm_fixtures import make_checkpoint

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
BUCKET = "cvae-test"
ROOT = f"s3://{BUCKET}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
os.environ.update(AWS_ENDPOINT_URL=ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")


def _endpoint_in_a_worker(ray) -> str | None:
    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    return ray.get(endpoint.remote())


@pytest.fixture(scope="module")
def bucket(ray_session):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    ray = ray_session
    if _endpoint_in_a_worker(ray) != ENDPOINT:  # Ray started before this module was imported
        from cvae.localray import init_ray

        ray.shutdown()
        init_ray(num_cpus=4, log_to_driver=False)
    assert _endpoint_in_a_worker(ray) == ENDPOINT
    yield ROOT
    server.stop()


def listing(uri: str) -> list[str]:
    """Files under a URI, relative to it."""
    filesystem, root = cfs.resolve(uri)
    found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(f.path[len(root) + 1:] for f in found if f.type == pafs.FileType.File)


def put_text(uri: str, text: str) -> str:
    filesystem, path = cfs.resolve(uri)
    with filesystem.open_output_stream(path) as fh:
        fh.write(text.encode())
    return uri


def tiny_config(uri: str, epochs: int) -> str:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["train"]["epochs"] = epochs
    return put_text(uri, yaml.safe_dump(raw))


# ---------------------------------------------------------------- the jobs, one after another


@pytest.fixture(scope="module")
def data(bucket):
    from jobs.prepare_data import main

    assert main(["--config", str(CONFIG), "--out", f"{bucket}/run/data"]) == 0
    return f"{bucket}/run/data"


@pytest.fixture(scope="module")
def trained(bucket, data):
    """Train one epoch into the bucket, then again with epochs: 2 under the same run name."""
    from jobs.train import main

    out = f"{bucket}/run/train"
    for epochs in (1, 2):  # the config itself comes from the bucket too
        config = tiny_config(f"{bucket}/configs/tiny-{epochs}.yaml", epochs)
        assert main(["--config", config, "--data", data, "--out", out]) == 0
    return out


def test_prepare_data_writes_manifest_and_shards_to_the_bucket(data):
    files = listing(data)
    manifest = json.loads(cfs.read_bytes(f"{data}/manifest.json"))
    assert "manifest.json" in files and manifest["num_shards"] == len(manifest["shards"]) > 1
    assert {e["file"] for e in manifest["shards"]} <= set(files)


@pytest.mark.slow  # two Ray Train runs of two workers (the `trained` fixture)
def test_train_keeps_checkpoints_in_the_bucket_and_resumes_from_them(trained, capsys):
    from cvae.model.checkpoint import load_meta

    files = listing(trained)
    epochs = sorted({f.split("/")[1] for f in files if f.startswith("tiny/checkpoint_epoch_")})
    assert epochs == ["checkpoint_epoch_00001", "checkpoint_epoch_00002"]
    assert {"metrics.json", "metrics.csv", "loss_curve.png", "reconstructions.png"} <= set(files)
    with cfs.staged(f"{trained}/tiny/checkpoint_epoch_00002") as local:
        meta = load_meta(local)
    # The second run continued from the first one's checkpoint in the bucket: epoch 1 is the
    # first run's (attempt 0), epoch 2 the second's (attempt 1).
    assert [(r["epoch"], r["attempt"]) for r in meta["history"]] == [(1, 0), (2, 1)]
    history = json.loads(cfs.read_bytes(f"{trained}/metrics.json"))
    assert [r["epoch"] for r in history] == [1, 2]


def test_a_missing_dataset_uri_is_one_line_naming_it(bucket, capsys):
    from jobs.train import main

    assert main(["--config", str(CONFIG), "--data", f"{bucket}/nothing", "--out", f"{bucket}/t"]) == 2
    err = capsys.readouterr().err
    # The URI keeps both slashes (Path() made it s3:/cvae-test/nothing).
    assert f"no dataset at {bucket}/nothing: {bucket}/nothing/manifest.json is missing" in err
    assert "Traceback" not in err


@pytest.mark.slow  # two Ray Train runs of two workers (the `trained` fixture)
def test_make_queries_query_and_evaluate_through_the_bucket(bucket, data, trained, capsys):
    """The query job also meets a second job started into its folder while it runs: that one
    refuses (the first one's lease), and the first one's output is whole."""
    from jobs.evaluate import main as evaluate
    from jobs.make_queries import main as make_queries
    from jobs.query import main as query

    spec = put_text(f"{bucket}/specs/small.yaml", yaml.safe_dump(
        {"seed": 0, "sources": {"split": "test", "sample": 6},
         "interventions": [{"factor": "shape", "values": "other"}], "rows_per_file": 5}))
    queries, answers, report = f"{bucket}/run/queries", f"{bucket}/run/answers", f"{bucket}/run/eval"
    assert make_queries(["--spec", spec, "--data", data, "--out", queries]) == 0
    assert [f for f in listing(queries) if f.endswith(".parquet")] == [f"part-0000{k}.parquet" for k in range(3)]

    args = ["--checkpoint", trained, "--queries", queries, "--out", answers, "--actors", "1", "--batch-size", "4"]
    outcome = {}
    first = threading.Thread(target=lambda: outcome.setdefault("rc", query(args)))
    first.start()
    deadline = time.time() + 120
    while first.is_alive() and time.time() < deadline and LEASE not in listing(answers):
        time.sleep(0.05)
    assert first.is_alive(), "the first job ended before the second could start"
    capsys.readouterr()
    assert query(args) == 2
    err = capsys.readouterr().err
    assert "in use by query job run" in err and "Wait for it to finish, or write elsewhere" in err
    first.join(timeout=600)
    assert outcome["rc"] == 0
    filesystem, path = cfs.resolve(queries)
    assert_exactly(answers, pads.dataset(path, filesystem=filesystem, format="parquet").to_table())
    assert read_output(answers)[0].num_rows == 12

    capsys.readouterr()
    assert evaluate(["--results", answers, "--queries", queries, "--checkpoint", trained, "--data", data,
                     "--out", report, "--figures-per-factor", "1", "--reversibility-samples", "4",
                     "--composition-samples", "4", "--max-samples", "4"]) == 0
    assert "evaluate: 12 counterfactuals" in capsys.readouterr().out
    assert json.loads(cfs.read_bytes(f"{report}/report.json"))["rows"] == 12
    assert "report.md" in listing(report)


# ---------------------------------------------------------------- exactly once on object storage


def query_table(prefix: str, n: int) -> pa.Table:
    """n intervention queries (every 10th one broken: num_samples -1)."""
    rows = [{"query_id": f"{prefix}{i:04d}", "kind": "intervene", "do_scale": i % 6,
             "num_samples": -1 if i % 10 == 3 else 1 + i % 2} for i in range(n)]
    return pa.Table.from_pylist([{c: r.get(c) for c in QUERY_SCHEMA.names} for r in rows], schema=QUERY_SCHEMA)


def put_queries(uri: str, table: pa.Table) -> str:
    filesystem, path = cfs.resolve(uri)
    pq.write_table(table, path, filesystem=filesystem)
    return uri


def assert_exactly(out: str, table: pa.Table) -> None:
    """out holds every valid row of the query `table` exactly once (num_samples rows each), its
    bad rows as errors, and nothing else: no file the marker does not list, no staging, no lease."""
    results, errors = read_output(out)
    ids = results["query_id"].to_pylist()
    want = {q: n for q, n in zip(table["query_id"].to_pylist(), table["num_samples"].to_pylist())
            if n is None or n >= 1}
    assert {q: ids.count(q) for q in set(ids)} == {q: n or 1 for q, n in want.items()}
    assert len(set(zip(ids, results["sample"].to_pylist()))) == len(ids)
    assert sorted(errors["query_id"].to_pylist()) == sorted(set(table["query_id"].to_pylist()) - set(want))
    marker = json.loads(cfs.read_bytes(f"{out}/{SUCCESS}"))
    on_disk = [f for f in listing(out) if f.startswith(("results/", "errors/"))]
    assert sorted(on_disk) == sorted(f"{d}/{n}" for d in ("results", "errors") for n in marker["committed"][d])
    assert not [f for f in listing(out) if f.startswith(("_staging-", LEASE))]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` cleanup runs (Ray Data's
    on_write_failed, which deletes the staging folder, is not called)."""


def _reaped_pid() -> int:
    """The pid of a process that has ended: a killed job's driver."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_job_killed_mid_commit_then_rerun_leaves_every_row_once(bucket, tmp_path, monkeypatch, capsys):
    from cvae.causal.image import ImageSCM
    from cvae.serve.queries import answer_queries
    from jobs.query import main as query

    local_checkpoint = make_checkpoint(tmp_path / "ckpt")
    checkpoint = cfs.upload(local_checkpoint, f"{bucket}/killed/ckpt")
    out, table = f"{bucket}/killed/answers", query_table("b", 30)
    queries = put_queries(f"{bucket}/killed/q.parquet", table)
    # An earlier run's committed output (written by hand: one query job fewer to wait for).
    for folder, schema in (("results", RESULT_SCHEMA), ("errors", ERROR_SCHEMA)):
        old = pa.table({"query_id": [f"old{i}" for i in range(3)], "sample": [0] * 3, "error": ["x"] * 3})
        put_queries(f"{out}/{folder}/part-old.parquet",
                    pa.table({c: old[c] if c in old.column_names else pa.nulls(3) for c in schema.names}).cast(schema))
    put_text(f"{out}/{SUCCESS}", json.dumps({"committed": {"results": ["part-old.parquet"],
                                                           "errors": ["part-old.parquet"]}}))
    assert read_output(out)[0].num_rows == 3

    # A run into the same folder, driven through the sink's own methods as Ray Data calls them
    # (three write tasks), dies right after its commit moved the first result file: on S3 a
    # move is a copy and a delete, file by file.
    answers = engine.combine(*answer_queries(ImageSCM.from_checkpoint(local_checkpoint), table))
    sink = engine.AtomicParquetSink(out, run_id="killed")
    sink.on_write_start()
    returns = [sink.write([answers.slice(k, 15)], None) for k in (0, 15, 30)]
    real_move, moved = commit._move_file, []

    def move_then_die(filesystem, src, dst):
        real_move(filesystem, src, dst)
        moved.append(dst)
        if "/results/" in dst:
            raise Killed(dst)

    monkeypatch.setattr(commit, "_move_file", move_then_die)
    with pytest.raises(Killed):
        sink.on_write_complete(types.SimpleNamespace(write_returns=returns))
    monkeypatch.setattr(commit, "_move_file", real_move)
    files = listing(out)
    assert [f for f in files if f.startswith("results/")] == [moved[-1].split("/answers/", 1)[1]]
    staged = sum(name.startswith("results/") for r in returns for name, *_ in r)
    assert staged >= 2 and len([f for f in files if f.startswith("_staging-killed/results/")]) == staged - 1
    assert SUCCESS not in files
    with pytest.raises(FileNotFoundError, match="no committed output"):
        read_output(out)  # readers refuse the half-committed folder
    from cvae.evaluate.scores import EvaluationError, _results_files

    with cfs.staged(out) as local, pytest.raises(EvaluationError, match="did not commit"):
        _results_files(local)

    # A real kill leaves the lease behind, naming a process that is gone: the rerun takes it
    # over at once, deletes the dead run's staging folder and commits the whole output.
    put_text(f"{out}/{LEASE}", json.dumps({
        "run_id": "killed", "what": "query job", "host": socket.gethostname(), "pid": _reaped_pid(),
        "pid_namespace": _pid_namespace(), "started": time.time() - 5, "heartbeat": time.time(), "timeout_s": 60}))
    capsys.readouterr()
    assert query(["--checkpoint", checkpoint, "--queries", queries, "--out", out,
                  "--actors", "1", "--batch-size", "8"]) == 0
    assert "taking over the lease of run killed" in capsys.readouterr().err
    assert_exactly(out, table)
