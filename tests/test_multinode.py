"""A real Ray cluster of three nodes on one machine: placement, node faults, `ray job submit`.

A head and two worker nodes (tests/raynodes.py: `ray start` on 127.0.0.2-4, loopback
addresses of their own, with token auth, each node its own CPUs) run the jobs as a user's
cluster would. Data and checkpoints go through file:// URIs, so every Train worker stages
its own shards from storage as on machines that share no disk. A node fault is a SIGKILL
of one worker node's raylet and every process it started, mid-job; a new node replaces it
before the next test.

Each test prints what a fault cost in time (pytest -s shows it; the figures in
docs/cluster.md come from benchmarks/results/multinode.txt, such a run's output).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from raynodes import RayNodes, free_ports

from cvae.causal.image import ImageSCM
from cvae.config import load_config
from cvae.data.shards import split_shards, write_dataset
from cvae.model.checkpoint import load_meta
from cvae.serve.engine import read_output
from cvae.serve.queries import answer_queries
from scm_fixtures import causal_scm, make_checkpoint, queries

REPO = Path(__file__).resolve().parents[1]
KEY = [("query_id", "ascending"), ("sample", "ascending")]
BUCKET = "cvae-cluster"
pytestmark = pytest.mark.slow

# One CPU per node: two Train workers or two query actors can only share a node when a
# fault leaves them no other; with a node killed, the two left still hold the whole job.
NODE_CPUS = 1


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto) on loopback with one bucket; yields the AWS_* settings
    that every node gets, as a cluster's nodes get their credentials from their machines."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_ports(1)[0]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    s3 = pafs.S3FileSystem(endpoint_override=settings["AWS_ENDPOINT_URL"], access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    try:
        yield settings, s3
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3_server):
    nodes = RayNodes(multinode=True, env=s3_server[0])
    try:
        nodes.start_head(num_cpus=NODE_CPUS)
        yield nodes
    finally:
        leftover = nodes.stop()
        assert not leftover, f"the cluster's processes did not stop: {leftover}"


def two_workers(nodes: RayNodes) -> list[str]:
    """Worker nodes up to two live ones (a killed node leaves no process behind)."""
    live = [n for n in nodes.nodes if n != "head" and nodes.pids(n)]
    while len(live) < 2:
        name = f"worker{len(nodes.nodes)}"
        nodes.add_worker(name, num_cpus=NODE_CPUS)
        live.append(name)
    return live


def run_job(nodes: RayNodes, args: list[str], kill_when=None, timeout: float = 600) -> tuple[float, str, str | None]:
    """Run `python -m jobs...` as a driver connected to the cluster; while it runs, kill the
    worker node that `kill_when()` names (once it names one). Returns (seconds, output, killed)."""
    log = nodes.root / f"job-{time.monotonic_ns()}.log"  # a file: a full pipe would stall the job
    started = time.monotonic()
    with log.open("w") as sink:
        job = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=nodes.env(PYTHONPATH=str(REPO)),
                               stdout=sink, stderr=subprocess.STDOUT)
    killed = None
    try:
        while job.poll() is None and time.monotonic() - started < timeout:
            victim = kill_when() if kill_when is not None and killed is None else None
            if victim is not None:
                nodes.kill(victim)
                killed = victim
                print(f"killed node {victim} at {time.monotonic() - started:.1f} s", flush=True)
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    seconds = time.monotonic() - started
    output = log.read_text()
    assert job.returncode == 0, f"{' '.join(args)} failed ({job.returncode}):\n{output[-6000:]}"
    return seconds, output, killed


def worker_node_running(nodes: RayNodes, title: str) -> str | None:
    """A worker node (never the head, which holds the GCS) running a process titled `title`."""
    return next((n for n in nodes.node_running(title) if n != "head"), None)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_dataset(load_config(REPO / "configs" / "tiny.yaml"), out)
    return out


def train_config(path: Path, cluster: RayNodes, epochs: int) -> str:
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config.pop("num_cpus")  # resources come from the cluster's nodes
    config["ray_address"] = cluster.gcs
    # Small batches of a wider mlp: epochs of seconds, so a node can die in the middle of one.
    config["model"]["hidden"] = 256
    config["train"].update(num_workers=2, cpus_per_worker=1, epochs=epochs, max_failures=2, batch_size=16)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_training_spreads_over_nodes_and_survives_a_node_kill(cluster, tiny_data, tmp_path):
    two_workers(cluster)
    config = train_config(tmp_path / "train.yaml", cluster, epochs=3)
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    train_files = {e["file"] for e in split_shards(manifest, "train")}

    def run(name: str, kill_when=None):
        out = tmp_path / name
        seconds, output, killed = run_job(cluster, ["jobs.train", "--config", config, "--data",
                                                    f"file://{tiny_data}", "--out", f"file://{out}"], kill_when)
        history = json.loads((out / "metrics.json").read_text())
        latest = max((out / "tiny").glob("checkpoint_epoch_*"))
        return seconds, history, load_meta(latest), killed, output

    # Undisturbed: each rank on its own node, staging only its own train shards.
    base_seconds, history, meta, _, _ = run("calm")
    placement = meta["placement"]
    assert len({p["node_id"] for p in placement}) == 2, placement
    assert all(p["staged"] for p in placement)
    shards = [set(p["files"]) & train_files for p in placement]
    assert shards[0] and shards[1] and not shards[0] & shards[1] and shards[0] | shards[1] == train_files
    assert [(r["epoch"], r["attempt"], r["nodes"]) for r in history] == [(1, 0, 2), (2, 0, 2), (3, 0, 2)]

    # A worker node dies after the first checkpoint: Ray Train restarts the worker group on
    # the nodes left and resumes from the latest checkpoint; every epoch is trained once.
    def after_first_checkpoint():
        """The node of a rank that is not on the head, once the epoch-1 checkpoint is
        committed (in the controller's snapshot: a checkpoint that is only uploaded is not
        handed to a restart, which then begins from scratch)."""
        run = tmp_path / "fault" / "tiny"
        try:
            if '"checkpoint_epoch_00001"' not in (run / "checkpoint_manager_snapshot.json").read_text():
                return None
            placement = json.loads((run / "checkpoint_epoch_00001" / "checkpoint.json").read_text())["placement"]
        except (OSError, ValueError):  # not there yet, or being written
            return None
        nodes = [cluster.node_at(p["node_ip"]) for p in placement]
        return next(n for n in nodes if n != "head")

    cluster.wait_gone("RayTrainWorker")  # the first run's workers have let go of their CPUs

    fault_seconds, history, meta, killed, output = run("fault", after_first_checkpoint)
    assert killed is not None, "the training finished before a node could be killed"
    # Epoch 1 from the first attempt; the restart resumed at epoch 2 (nothing trained twice).
    assert [(r["epoch"], r["attempt"]) for r in history] == [(1, 0), (2, 1), (3, 1)], output[-5000:]
    assert all(np.isfinite(r["test_loss"]) for r in history)
    assert len(meta["placement"]) == 2
    print(f"training, 3 epochs of tiny on 2 workers: {base_seconds:.1f} s undisturbed, "
          f"{fault_seconds:.1f} s with a worker node killed after epoch 1 "
          f"(+{fault_seconds - base_seconds:.1f} s)", flush=True)


def test_queries_spread_over_nodes_and_survive_a_node_kill(cluster, tmp_path):
    two_workers(cluster)
    checkpoint = make_checkpoint(tmp_path / "ckpt", causal_scm())
    table = queries(24_000, seed=5, bad_every=97)
    (tmp_path / "q").mkdir()
    for k, rows in enumerate(np.array_split(np.arange(table.num_rows), 6)):
        pq.write_table(table.take(rows), tmp_path / "q" / f"part-{k}.parquet")
    expected, expected_errors = answer_queries(ImageSCM.from_checkpoint(checkpoint, device="cpu"), table)
    args = ["jobs.query", "--checkpoint", checkpoint, "--queries", str(tmp_path / "q"),
            "--actors", "2", "--cpus-per-actor", "0.5", "--batch-size", "128", "--address", cluster.gcs]
    seen: set[str] = set()

    def note_actors():
        seen.update(cluster.node_running("QueryActor"))

    def check(out: Path) -> None:
        results, errors = read_output(out)
        assert results.num_rows == expected.num_rows  # every valid row exactly once
        assert results.sort_by(KEY).equals(expected.sort_by(KEY))  # and the same answers
        assert sorted(errors["query_id"].to_pylist()) == sorted(expected_errors["query_id"].to_pylist())

    def spying():  # never kills: records where the actors run
        note_actors()

    base_seconds, _, _ = run_job(cluster, args + ["--out", str(tmp_path / "calm")], spying)
    check(tmp_path / "calm")
    assert len(seen) == 2, f"the two actors ran on {sorted(seen)}, not on two nodes"

    staging = tmp_path / "fault"
    cluster.wait_gone("QueryActor")  # the first job's actors have let go of their CPUs

    answering = []

    def while_answering():
        # Kill the node of an actor once it has been answering for a second (five polls in a
        # row). Not "once answers are written": the actors answer faster than Ray Data writes
        # them out, so by the time files land the actors may be done and gone.
        note_actors()
        node = worker_node_running(cluster, "QueryActor")
        answering.append(node)
        if node is not None and answering[-5:] == [node] * 5:
            return node
        return None

    fault_seconds, _, killed = run_job(cluster, args + ["--out", str(staging)], while_answering)
    assert killed is not None, "the query job finished before a node could be killed"
    check(staging)
    summary = json.loads((staging / "_SUCCESS.json").read_text())
    assert summary["result_rows"] == expected.num_rows and summary["queries"] == table.num_rows
    print(f"queries, 24,000 rows on 2 actors: {base_seconds:.1f} s undisturbed, {fault_seconds:.1f} s "
          f"with the node of one actor killed mid-job (+{fault_seconds - base_seconds:.1f} s)", flush=True)


def test_the_pipeline_submitted_with_ray_job_submit_into_a_bucket(cluster, s3_server):
    """docs/cluster.md's command, as written: `ray job submit --runtime-env
    cluster/runtime_env.yaml -- python -m jobs.pipeline ... --out s3://...` from the
    repository root, every stage reading and writing the bucket."""
    two_workers(cluster)
    _, s3 = s3_server
    started = time.monotonic()
    submitted = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={cluster.address}",
         "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "-m", "jobs.pipeline", "--config", "configs/tiny.yaml", "--out", f"s3://{BUCKET}/run"],
        cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=900)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-6000:]
    assert "succeeded" in output.lower()

    def read(path: str) -> dict:
        with s3.open_input_stream(f"{BUCKET}/run/{path}") as fh:
            return json.loads(fh.read())

    assert read("eval/report.json")["overall"]["count"] > 0
    assert read("answers/_SUCCESS.json")["result_rows"] > 0
    checkpoints = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/run/train/tiny"))
    latest = max(c.base_name for c in checkpoints if c.base_name.startswith("checkpoint_epoch_"))
    placement = read(f"train/tiny/{latest}/checkpoint.json")["placement"]
    assert len({p["node_id"] for p in placement}) == 2 and all(p["staged"] for p in placement), placement
    print(f"pipeline (tiny) through ray job submit on 3 nodes, into S3: {time.monotonic() - started:.1f} s",
          flush=True)


def test_answers_of_the_cluster_equal_the_pure_function(tmp_path):
    """Guards the check above: a result table missing one row, or with one image changed,
    is told apart from the reference by the comparison the fault tests use."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", causal_scm())
    table = queries(30, seed=1)
    expected, _ = answer_queries(ImageSCM.from_checkpoint(checkpoint, device="cpu"), table)
    assert expected.sort_by(KEY).equals(expected.sort_by(KEY))
    assert not expected.slice(1).sort_by(KEY).equals(expected.sort_by(KEY))
    images = expected.column("image").to_pylist()
    images[0] = bytes(images[0][:-1]) + bytes([images[0][-1] ^ 1])
    changed = expected.set_column(expected.schema.get_field_index("image"), "image",
                                  pa.array(images, expected.schema.field("image").type))
    assert not changed.sort_by(KEY).equals(expected.sort_by(KEY))
