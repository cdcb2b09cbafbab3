"""The output folder's lease (cvae.serve.lease): refusal, stale takeover, heartbeat, lost lease, races.

Local folders, no Ray: each test takes well under a second or two. The same lease on an S3
bucket, with real query jobs, is in tests/test_s3.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from cvae.errors import OutputBusyError, OutputLocationError
from cvae.serve.lease import LEASE, OutputLease, _pid_namespace, stale_reason


def record(**changes) -> dict:
    """A live lease of this process, as another run would have written it."""
    now = time.time()
    return {"run_id": "other", "what": "query job", "host": socket.gethostname(), "pid": os.getpid(),
            "pid_namespace": _pid_namespace(), "started": now, "heartbeat": now, "timeout_s": 60, **changes}


def gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_when_a_lease_is_stale():
    assert stale_reason(record()) is None
    assert "no heartbeat for 100 s" in stale_reason(record(heartbeat=time.time() - 100))
    assert "is gone" in stale_reason(record(pid=gone_pid()))
    # On another machine a pid says nothing: only the heartbeat counts there.
    assert stale_reason(record(pid=gone_pid(), host="elsewhere")) is None
    assert stale_reason(None) and stale_reason({"run_id": "x"})


def test_a_live_lease_refuses_a_second_job_and_a_dead_ones_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    first = OutputLease(out, "first", settle_s=0).acquire()
    with pytest.raises(OutputBusyError, match=r"in use by job run first \(host .*, pid \d+, .*Wait for it") as err:
        OutputLease(out, "second", settle_s=0).acquire()
    assert isinstance(err.value, OutputLocationError)  # the jobs print it as one line, exit 2
    first.release()
    assert not out.exists()  # the folder the lease created, empty again, is gone
    (out).mkdir()
    (out / LEASE).write_text(json.dumps(record(run_id="killed", pid=gone_pid())))
    with OutputLease(out, "third", settle_s=0) as lease:
        assert json.loads((out / LEASE).read_text())["run_id"] == "third"
        lease.check()
    assert "taking over the lease of run killed" in caplog.text  # a warning (stderr in a job)
    assert out.is_dir() and not (out / LEASE).exists()  # a folder that was there stays


def test_the_heartbeat_keeps_a_lease_live_and_a_lost_lease_fails_the_check(tmp_path):
    out = tmp_path / "out"
    lease = OutputLease(out, "mine", timeout_s=0.4, settle_s=0).acquire()
    beat = json.loads((out / LEASE).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((out / LEASE).read_text())["heartbeat"] > beat
    assert stale_reason(json.loads((out / LEASE).read_text())) is None  # alive past its timeout
    # Another job took the folder over (say this one stalled past its timeout).
    (out / LEASE).write_text(json.dumps(record(run_id="taker")))
    with pytest.raises(OutputBusyError, match="lease was taken over by run taker"):
        lease.check()
    lease.release()
    assert json.loads((out / LEASE).read_text())["run_id"] == "taker"  # not ours to delete


def test_of_two_jobs_starting_together_exactly_one_gets_the_lease(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    outcome, go = {}, threading.Barrier(2)

    def start(name: str) -> None:
        go.wait()
        try:
            outcome[name] = OutputLease(out, name, settle_s=0.3).acquire()
        except OutputBusyError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n, v in outcome.items() if isinstance(v, OutputLease)]
    assert len(won) == 1 and isinstance(outcome[{"a": "b", "b": "a"}[won[0]]], OutputBusyError)
    outcome[won[0]].release()
