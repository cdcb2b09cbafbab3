"""A lease on an output folder: one writing job at a time, on local disk and object storage.

A query job stages its files in `<out>/_staging-<run id>/` and, at the start, deletes the
staging folders that killed runs left behind. Two live jobs into the same folder would delete
each other's staged files, and the later commit would replace the earlier one's output. So a
job first takes the folder's lease, `<out>/_LEASE.json` (a `_` name that Parquet readers skip):

    {"run_id", "host", "pid", "pid_namespace", "started", "heartbeat", "timeout_s"}

and a thread of the job refreshes `heartbeat` every `timeout_s / 4` seconds. Another job
refuses the folder with OutputBusyError (one line naming the owner) while the lease is live;
it takes a stale lease over. A lease is stale when its heartbeat is older than its
`timeout_s` (the clocks of the machines involved must agree to well within it, as NTP keeps
them), or at once when its owner ran on this machine, in this PID namespace, and that process
is gone (a killed job is taken over without waiting; a reused pid only delays that until the
heartbeat times out).

Object stores have no "create if absent" in pyarrow, so taking a lease is: read it, refuse a
live one, write ours (one PUT, or temp file and rename on local disk), wait `settle_s`, read
it back and refuse if another job's lease replaced ours. Of two jobs starting together, the
last to write wins and the other refuses, as long as each writes within `settle_s` of its own
check (milliseconds; `settle_s` is 1 s). A job that loses its lease while it runs (its
heartbeat stalled past the timeout and another job took over) finds out at `check()`, which
the engine calls before it commits, and fails instead of committing.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.fs as pafs

from cvae import fs as cfs
from cvae.errors import OutputBusyError

log = logging.getLogger(__name__)

LEASE = "_LEASE.json"
TIMEOUT_ENV = "CVAE_LEASE_TIMEOUT_S"  # overrides DEFAULT_TIMEOUT_S
DEFAULT_TIMEOUT_S = 60.0
SETTLE_S = 1.0


def default_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else DEFAULT_TIMEOUT_S


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_gone(pid: int) -> bool:
    """True when no process `pid` runs here (a zombie, killed but not yet reaped, is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z"
    except (OSError, IndexError):
        return False


def describe(record: dict, now: float | None = None) -> str:
    """'run R (host H, pid P, started T UTC, last heartbeat S s ago)' for messages."""
    now = time.time() if now is None else now
    started = datetime.fromtimestamp(record.get("started", 0), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    age = now - record.get("heartbeat", 0)
    return (f"run {record.get('run_id')} (host {record.get('host')}, pid {record.get('pid')}, "
            f"started {started} UTC, last heartbeat {age:.0f} s ago)")


def stale_reason(record: dict | None, now: float | None = None) -> str | None:
    """Why the lease `record` may be taken over, or None while its owner is live."""
    if record is None:
        return "no readable lease"
    now = time.time() if now is None else now
    try:
        age = now - float(record["heartbeat"])
        timeout = float(record.get("timeout_s") or DEFAULT_TIMEOUT_S)
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return "an unreadable lease"
    if age > timeout:
        return f"no heartbeat for {age:.0f} s (timeout {timeout:g} s)"
    if (record.get("host") == socket.gethostname() and record.get("pid_namespace") == _pid_namespace()
            and pid != os.getpid() and _process_gone(pid)):
        return f"its process {pid} on this machine is gone"
    return None


class OutputLease:
    """The lease on output folder `out` (a path or URI) for run `run_id`; a context manager.

    `acquire()` takes it or raises OutputBusyError; `check()` raises OutputBusyError if the
    lease is no longer ours; `release()` deletes it (only if still ours) and stops the
    heartbeat.
    """

    def __init__(self, out: str | Path, run_id: str | None = None, timeout_s: float | None = None,
                 settle_s: float = SETTLE_S, what: str = "job"):
        self.where = str(out)
        self.fs, root = cfs.resolve(out)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LEASE}"
        self.run_id = run_id or uuid.uuid4().hex
        self.timeout_s = default_timeout() if timeout_s is None else float(timeout_s)
        self.settle_s = settle_s
        self.what = what
        self.started = time.time()
        self.lost: dict | None = None  # the record that replaced ours, once seen
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one read-or-write of the lease file at a time
        self._created = False  # acquire() created the folder: release() removes it if still empty

    # ------------------------------------------------------------------ file access

    def read(self) -> dict | None:
        """The lease record in the folder, or None (no lease, or not JSON)."""
        try:
            with self.fs.open_input_stream(self.path) as fh:
                record = json.loads(fh.read())
        except (FileNotFoundError, ValueError):
            return None
        except OSError:
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise
        return record if isinstance(record, dict) else None

    def _record(self) -> dict:
        return {"run_id": self.run_id, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_namespace": _pid_namespace(), "started": self.started, "heartbeat": time.time(),
                "timeout_s": self.timeout_s}

    def _write(self) -> None:
        data = json.dumps(self._record(), indent=1).encode()
        if self.fs.type_name == "local":  # temp file and rename: readers never see half of it
            tmp = f"{self.root}/.{LEASE}.{self.run_id}.tmp"
            with self.fs.open_output_stream(tmp) as fh:
                fh.write(data)
            self.fs.move(tmp, self.path)
        else:  # one PUT: an object appears whole or not at all
            with self.fs.open_output_stream(self.path) as fh:
                fh.write(data)

    # ------------------------------------------------------------------ the protocol

    def _busy(self, record: dict, prefix: str) -> OutputBusyError:
        return OutputBusyError(
            f"output {self.where}: {prefix} {record.get('what', 'job')} {describe(record)}; two jobs into one "
            f"folder would delete each other's files. Wait for it to finish, or write elsewhere (a lease "
            f"is taken over after {float(record.get('timeout_s') or DEFAULT_TIMEOUT_S):g} s without a "
            f"heartbeat, or at once when its process on this machine is gone)")

    def acquire(self) -> OutputLease:
        self._created = self.fs.get_file_info(self.root).type == pafs.FileType.NotFound
        self.fs.create_dir(self.root, recursive=True)
        current = self.read()
        if current is not None and current.get("run_id") != self.run_id:
            reason = stale_reason(current)
            if reason is None:
                raise self._busy(current, "in use by")
            log.warning("output %s: taking over the lease of %s: %s", self.where, describe(current), reason)
        self._write()
        time.sleep(self.settle_s)
        current = self.read()
        if current is None or current.get("run_id") != self.run_id:
            if current is None:
                raise OutputBusyError(f"output {self.where}: the lease {self.path} vanished while it was "
                                      f"being taken; is another job starting into this folder?")
            raise self._busy(current, "taken at the same moment by")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        interval = max(self.timeout_s / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    current = self.read()
                    if current is not None and current.get("run_id") != self.run_id:
                        self.lost = current  # taken over: stop writing, check() will fail
                        return
                    self._write()
            except OSError:
                continue  # a transient storage error: try again at the next beat

    def check(self) -> None:
        """Raise OutputBusyError unless the lease in the folder is still ours."""
        current = self.read()
        if current is None or current.get("run_id") != self.run_id:
            self.lost = current or self.lost
            who = describe(current) if current else "nobody (the lease file is gone)"
            raise OutputBusyError(f"output {self.where}: this job's lease was taken over by {who}; not "
                                  f"committing (run the job again when the folder is free)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.held:
            return
        self.held = False
        with self._lock:
            try:
                current = self.read()
                if current is not None and current.get("run_id") == self.run_id:
                    self.fs.delete_file(self.path)
                if self._created and not self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
                    self.fs.delete_dir(self.root)  # a job that failed early leaves no empty folder
            except OSError:
                pass  # a stale lease is taken over anyway

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
