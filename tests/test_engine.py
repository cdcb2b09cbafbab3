"""The query engine through Ray Data: Parquet to Parquet, bad rows, determinism, and faults."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvae.causal.image import ImageSCM
from cvae.config import ConfigError
from cvae.serve.engine import SUCCESS, block_rows, read_output, run_query_job
from cvae.serve.queries import QuerySchemaError, answer_queries
from scm_fixtures import causal_scm, make_checkpoint, queries

KEY = [("query_id", "ascending"), ("sample", "ascending")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), causal_scm())


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The pure function's answers for queries(60, bad_every=7): the reference."""
    scm = ImageSCM.from_checkpoint(checkpoint, device="cpu")
    return answer_queries(scm, queries(60, bad_every=7))


def write_split(table: pa.Table, folder: Path, parts: int, seed: int) -> Path:
    """The rows permuted and spread over `parts` files (a different block order)."""
    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    for k, rows in enumerate(np.array_split(order, parts)):
        pq.write_table(table.take(rows), folder / f"part-{k}.parquet")
    return folder


def test_all_kinds_parquet_to_parquet_and_independent_of_batching(ray_session, checkpoint, expected, tmp_path):
    want_results, want_errors = expected
    table = queries(60, bad_every=7)
    pq.write_table(table, tmp_path / "q.parquet")
    runs = [(tmp_path / "q.parquet", 7, 1), (write_split(table, tmp_path / "split", 3, seed=1), 25, 2)]
    for k, (path, batch_size, actors) in enumerate(runs):
        out = tmp_path / f"out{k}"
        summary = run_query_job(checkpoint, path, out, actors=actors, batch_size=batch_size, max_samples=8)
        results, errors = read_output(out)
        assert results.sort_by(KEY).equals(want_results.sort_by(KEY))
        assert errors.sort_by("query_id").equals(want_errors.sort_by("query_id"))
        assert summary["result_rows"] == want_results.num_rows and summary["error_rows"] == 9
        assert set(results.column("kind").to_pylist()) == {"condition", "intervene", "counterfactual"}
        assert not list(out.glob("_staging-*"))


def test_blocks_are_split_evenly_over_every_actor():
    assert block_rows(2000, 4096, 2) == 1000  # both actors answer, not one
    assert block_rows(2001, 4096, 2) == 1001
    assert block_rows(8192, 4096, 2) == 4096  # large inputs: batch_size rows per call
    assert block_rows(20_000, 4096, 2) == 3334  # six blocks, three per actor, not five
    assert block_rows(100_000, 4096, 3) == 3704  # 27 blocks, nine per actor
    assert block_rows(3, 4096, 8) == 1
    assert block_rows(0, 4096, 2) == 1
    assert block_rows(4097, 4096, 1) == 2049  # two even calls, not 4,096 and 1


def test_a_job_starts_no_actors_but_its_pool(ray_session, checkpoint, tmp_path):
    """Each actor a job starts is a node it can be failed by: Ray 2.60's default Parquet
    reader adds 32 footer-reading actors that live until the last read, and a node lost
    under one of them failed the whole job (a CI run of tests/test_multinode.py)."""
    from ray._private import state  # the GCS actor table; the state API needs the dashboard

    before = set(state.actors())
    write_split(queries(40), tmp_path / "q", 3, seed=2)
    run_query_job(checkpoint, tmp_path / "q", tmp_path / "out", actors=2, batch_size=8, max_samples=2)
    started = {a["ActorClassName"] for key, a in state.actors().items() if key not in before}
    # Ray Data's bookkeeping actors, started once per Ray and pinned to the driver's node
    started -= {"_StatsActor", "ActorLocationTracker", "_AutoscalingCoordinatorActor"}
    assert started == {"MapWorker(MapBatches(QueryActor))"}, started


def test_duplicates_across_files_are_found(ray_session, checkpoint, tmp_path):
    table = queries(6)
    folder = tmp_path / "dups"
    folder.mkdir()
    pq.write_table(table, folder / "a.parquet")
    pq.write_table(table.slice(0, 1), folder / "b.parquet")  # q000000 again, in another file
    run_query_job(checkpoint, folder, tmp_path / "out", actors=1, batch_size=4)
    results, errors = read_output(tmp_path / "out")
    assert errors.column("query_id").to_pylist() == ["q000000", "q000000"]
    assert "q000000" not in results.column("query_id").to_pylist()


def test_whole_file_problems_fail_before_any_work(ray_session, checkpoint, tmp_path):
    pq.write_table(pa.table({"query_id": ["a"], "kind": ["intervene"], "do_shape": [1.5]}), tmp_path / "bad.parquet")
    with pytest.raises(QuerySchemaError, match="bad.parquet.*'do_shape' must be an integer"):
        run_query_job(checkpoint, tmp_path / "bad.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "jobs.query", "--checkpoint", checkpoint,
                           "--queries", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "must be an integer" in proc.stderr and "Traceback" not in proc.stderr


def _descendants(root: int) -> list[int]:
    """Pids of root's descendants, from /proc (this session's Ray processes are ours)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def _query_actor_pids() -> list[int]:
    """Worker processes of this session's Ray (our descendants) that hold a QueryActor."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            if b"QueryActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_killing_a_query_actor_mid_run_loses_and_duplicates_nothing(ray_session, checkpoint, tmp_path):
    table = queries(600, seed=3, samples=4)
    pq.write_table(table, tmp_path / "q.parquet", row_group_size=50)
    outcome = {}

    def job():
        outcome["summary"] = run_query_job(checkpoint, tmp_path / "q.parquet", tmp_path / "out",
                                           actors=1, batch_size=8, max_samples=8)

    thread = threading.Thread(target=job)
    thread.start()
    killed, seen = None, None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and thread.is_alive():
        pids = _query_actor_pids()
        seen = seen or (pids and time.time())
        if pids and time.time() - seen > 3:  # loaded and answering for a while: kill it mid-run
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    assert killed is not None and thread.is_alive(), "the job ended before the actor could be killed"
    thread.join(timeout=300)
    results, errors = read_output(tmp_path / "out")
    assert errors.num_rows == 0
    want = {q: n for q, n in zip(table.column("query_id").to_pylist(), table.column("num_samples").to_pylist())}
    ids = results.column("query_id").to_pylist()
    assert len(ids) == sum(want.values())
    assert {q: ids.count(q) for q in want} == want
    assert len(set(zip(ids, results.column("sample").to_pylist()))) == len(ids)


def test_killing_the_job_then_rerunning_gives_exactly_the_output(ray_session, checkpoint, tmp_path):
    big = queries(600, seed=5, bad_every=7)
    pq.write_table(big, tmp_path / "q.parquet", row_group_size=50)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.query", "--checkpoint", checkpoint,
                             "--queries", str(tmp_path / "q.parquet"), "--out", str(out),
                             "--actors", "1", "--batch-size", "8"],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None:
        staged = list(out.glob("_staging-*/results/*.parquet"))
        seen = seen or (_query_actor_pids() and time.time())
        if staged or (seen and time.time() - seen > 3):  # some answers staged, or answering for a while
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
    proc.wait()
    # Nothing partial is visible: no committed folders, no success marker.
    assert not (out / "results").exists() and not (out / "errors").exists() and not (out / SUCCESS).exists()
    # Rerun twice into the same folder: the output is complete, without duplicates.
    for overwrite in (False, True):  # the first rerun takes over the killed job's folder
        run_query_job(checkpoint, tmp_path / "q.parquet", out, actors=1, batch_size=64, max_samples=8,
                      overwrite=overwrite)
        results, errors = read_output(out)
        counts = dict(zip(*np.unique(results.column("query_id").to_numpy(zero_copy_only=False), return_counts=True)))
        valid = [(q, n) for q, n in zip(big.column("query_id").to_pylist(), big.column("num_samples").to_pylist())
                 if n >= 1]
        assert counts == dict(valid)
        assert errors.num_rows == big.num_rows - len(valid)
        assert not list(out.glob("_staging-*"))


def test_file_uris_for_checkpoint_queries_and_output(ray_session, checkpoint, expected, tmp_path):
    """All three locations as file:// URIs: read, staged and written through pyarrow's filesystem."""
    want_results, want_errors = expected
    folder = write_split(queries(60, bad_every=7), tmp_path / "in", 2, seed=4)
    out_uri = (tmp_path / "out").as_uri()
    summary = run_query_job(Path(checkpoint).as_uri(), folder.as_uri(), out_uri, actors=1, batch_size=16,
                            max_samples=8)
    assert summary["out"] == out_uri and summary["result_rows"] == want_results.num_rows
    for location in (out_uri, tmp_path / "out"):  # the same committed output by URI or by path
        results, errors = read_output(location)
        assert results.sort_by(KEY).equals(want_results.sort_by(KEY))
        assert errors.sort_by("query_id").equals(want_errors.sort_by("query_id"))
    assert (tmp_path / "out" / SUCCESS).is_file() and not list((tmp_path / "out").glob("_staging-*"))
    # A second run into the same URI is refused, unless it may overwrite: then it replaces the
    # output (no duplicates). A missing URI fails early.
    from cvae.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match=r"already holds a finished query output \(\d+ result rows\)"):
        run_query_job(Path(checkpoint).as_uri(), folder.as_uri(), out_uri, actors=1, batch_size=16)
    run_query_job(Path(checkpoint).as_uri(), folder.as_uri(), out_uri, actors=1, batch_size=16, max_samples=8,
                  overwrite=True)
    assert read_output(out_uri)[0].num_rows == want_results.num_rows
    with pytest.raises(QuerySchemaError, match="no such file or folder"):
        run_query_job(checkpoint, (tmp_path / "nowhere").as_uri(), out_uri, overwrite=True)
    from cvae.model.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        run_query_job((tmp_path / "nowhere").as_uri(), folder.as_uri(), out_uri, overwrite=True)


def test_an_actor_pool_that_leaves_no_cpu_for_writing_is_refused(ray_session, checkpoint, tmp_path):
    # ray_session has 4 CPUs: 4 one-CPU actors would leave Ray Data's write tasks none; the
    # engine refuses that up front instead.
    pq.write_table(queries(4), tmp_path / "q.parquet")
    with pytest.raises(ConfigError, match=r"query\.actors: the Ray cluster has 4 CPUs"):
        run_query_job(checkpoint, tmp_path / "q.parquet", tmp_path / "out", actors=4)
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()


def test_a_finished_output_is_not_overwritten_silently(ray_session, checkpoint, tmp_path):
    from cvae.errors import OutputExistsError

    pq.write_table(queries(6), tmp_path / "q.parquet")
    first = run_query_job(checkpoint, tmp_path / "q.parquet", tmp_path / "out", actors=1, batch_size=8)
    before = (tmp_path / "out" / SUCCESS).read_text()
    with pytest.raises(OutputExistsError, match=rf"already holds a finished query output \({first['result_rows']} "):
        run_query_job(checkpoint, tmp_path / "q.parquet", tmp_path / "out", actors=1, batch_size=8)
    assert (tmp_path / "out" / SUCCESS).read_text() == before  # untouched
    proc = subprocess.run([sys.executable, "-m", "jobs.query", "--checkpoint", checkpoint, "--queries",
                           str(tmp_path / "q.parquet"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "pass --overwrite" in proc.stderr
    assert (tmp_path / "out" / SUCCESS).read_text() == before


def test_an_empty_query_set_commits_an_empty_output(checkpoint, tmp_path, capsys):
    """No Ray is needed (no ray_session): nothing is answered."""
    from jobs import query

    pq.write_table(queries(3).slice(0, 0), tmp_path / "empty.parquet")
    summary = run_query_job(checkpoint, tmp_path / "empty.parquet", tmp_path / "out")
    assert summary["queries"] == summary["result_rows"] == summary["error_rows"] == 0
    results, errors = read_output(tmp_path / "out")
    assert results.num_rows == errors.num_rows == 0
    assert query.main(["--checkpoint", checkpoint, "--queries", str(tmp_path / "empty.parquet"),
                       "--out", str(tmp_path / "again")]) == 0
    assert "nothing to answer" in capsys.readouterr().out
    assert query.summary_lines({**summary, "queries": 10, "error_rows": 4, "result_rows": 6, "off_grid_rows": 3,
                                "seconds": 1.0}, "OUT") == [
        "answered 6 of 10 queries in 1.0 s: 6 result rows in OUT/results",
        "refused 4 queries, each with its reason, in OUT/errors",
        "  3 of them name classes this model was not trained on (`python -m jobs.make_queries --checkpoint` "
        "keeps a query set on its grid)",
        "the run's record: OUT/_SUCCESS.json"]
