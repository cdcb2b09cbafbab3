"""A real Ray head with token authentication, bound to loopback, driven through the Jobs API.

The head is started with `ray start --head` in its own temp dir, HOME and ports, so it
never meets the session's other Ray instances. Its token travels only in the
environment (RAY_AUTH_TOKEN): nothing is written to the real ~/.ray. The head is stopped
by killing exactly the processes it started (found by a marker in their environment),
never with `ray stop`, which would stop every Ray instance of this user.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# The job the test submits (the main job on the tiny config) and how its outputs are checked.
JOB = ("jobs.pipeline", "pipeline")

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_port_range(taken: list[int], size: int = 200) -> int:
    """The first port of `size` + 1 worker ports that holds none of `taken`: the kernel's
    free ports may fall anywhere, and Ray refuses a component port inside the range."""
    for start in [p + 1 for p in sorted(taken)] + [20000]:
        end = start + size
        if end <= 65535 and not any(start <= p <= end for p in taken):
            return start
    raise RuntimeError(f"no {size + 1}-port range free of {taken}")


def _pids_with_marker(marker: bytes) -> list[int]:
    """Processes whose environment holds `marker` (inherited by every process Ray starts)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            pids.append(int(entry))
    return pids


def _kill_marked(marker: bytes) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in _pids_with_marker(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets these processes listen on, from /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            out.append((addr, int(hex_port, 16)))
    return out


@pytest.fixture(scope="module")
def token_head():
    """A Ray head with RAY_AUTH_MODE=token on 127.0.0.1; yields its details, always stopped."""
    # Ray puts unix sockets under its temp dir: keep the path short (sun_path is 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="cvae-head-", dir="/tmp"))
    home = root / "home"
    home.mkdir(parents=True)
    token = secrets.token_hex(32)
    marker = f"CVAE_TEST_HEAD={root.name}"
    ports = _free_ports(9)
    (gcs, dashboard, client, nm, om, agent, agent_grpc, rt_env, metrics) = ports
    wmin = _worker_port_range(ports)
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # On Linux Ray replaces --node-ip-address=127.0.0.1 by the machine's own address
        # (services.resolve_ip_for_localhost) unless clusters of several machines are off;
        # with this set every port of the head binds to loopback, as on a laptop.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "CVAE_TEST_HEAD": root.name,
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 200}",
        "--num-cpus=2", f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
    ]
    info = {"root": root, "token": token, "address": f"http://127.0.0.1:{dashboard}",
            "marker": marker.encode(), "home": home}
    try:
        started = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield info
    finally:
        _kill_marked(marker.encode())
        leftover = _pids_with_marker(marker.encode())
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"the test head's processes did not stop: {leftover}"


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return JobSubmissionClient(address, headers=headers)


def _check_prepare_outputs(out: Path) -> None:
    from cvae.shards import read_manifest, verify_dataset

    manifest = read_manifest(out)
    assert manifest["counts"]["train"] > 0 and manifest["counts"]["test"] > 0
    verify_dataset(out)  # every shard present, with the manifest's size and sha256


def _check_pipeline_outputs(out: Path) -> None:
    reports = list(out.rglob("report.json"))
    assert reports, f"no report.json under {out}"
    report = json.loads(reports[0].read_text())
    assert report["overall"]["count"] > 0


CHECKS = {"prepare": _check_prepare_outputs, "pipeline": _check_pipeline_outputs}


@pytest.mark.slow
def test_token_auth_head_runs_a_job_and_refuses_others(token_head, tmp_path):
    address, token = token_head["address"], token_head["token"]

    # Every port the head's processes listen on is on loopback.
    listening = _listening(_pids_with_marker(token_head["marker"]))
    assert listening, "found no listening sockets for the head"
    exposed = [(a, p) for a, p in listening if a not in LOOPBACK]
    assert not exposed, f"ports open beyond loopback: {exposed}"

    # Without a token the Jobs API answers 401, with a wrong one 403; nothing is submitted.
    request = urllib.request.Request(
        f"{address}/api/jobs/", data=json.dumps({"entrypoint": "echo pwned"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    from ray.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="Invalid authentication token"):
        _client(address, "0" * 64).submit_job(entrypoint="echo pwned")

    # The CLI without the token (clean HOME, no RAY_AUTH_TOKEN) is refused as well.
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cli_env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")
    cli = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
                          f"--address={address}", "--no-wait", "--", "echo", "pwned"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0
    assert "token" in (cli.stdout + cli.stderr).lower()

    # With the token, the job runs to the end and leaves its outputs.
    client = _client(address, token)
    module, check = JOB
    out = tmp_path / "out"
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -m {module} --config {TINY} --out {out}",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "job did not finish in 10 minutes"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-4000:]}"
    CHECKS[check](out)

    # The refused submissions left no trace: ours is the only job the head knows.
    assert [j.submission_id for j in client.list_jobs()] == [job_id]


LOCAL_DRIVER = """
import json, os, sys
import ray.data  # imported first, as a job's modules do
from cvae.localray import init_ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from test_cluster import _listening, _pids_with_marker
import ray

from cvae.localray import NO_DASHBOARD_LOGGERS

ctx = init_ray(num_cpus=1, log_to_driver=False)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
# Worker processes ran the setup hook that silences "State API unavailable" loggers.
levels = ray.get(ray.remote(lambda: [__import__("logging").getLogger(n).level
                                     for n in NO_DASHBOARD_LOGGERS]).remote())
pids = _pids_with_marker(("CVAE_TEST_LOCAL=" + os.environ["CVAE_TEST_LOCAL"]).encode()) + [os.getpid()]
print(json.dumps({"token": is_token_auth_enabled(), "gcs": ctx.address_info["gcs_address"],
                  "listening": _listening(pids), "worker_log_levels": levels}), flush=True)
sys.stdin.readline()  # hold the cluster until the test has tried to get in
ray.shutdown()
"""

INTRUDER = """
import ray
ray.init(address="{gcs}")
print("CONNECTED")
"""


@pytest.mark.slow
def test_local_ray_uses_token_auth_on_loopback_and_writes_no_token_file(tmp_path):
    """cvae.localray.init_ray, as jobs start their in-process Ray."""
    home = tmp_path / "home"
    home.mkdir()
    marker = f"CVAE_TEST_LOCAL={tmp_path.name}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}")
    driver = subprocess.Popen([sys.executable, "-c", LOCAL_DRIVER], cwd=tmp_path, text=True,
                              env={**base, "CVAE_TEST_LOCAL": tmp_path.name},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = driver.stdout.readline()
        assert line, f"the driver failed:\n{driver.stderr.read()}"
        info = json.loads(line)
        assert info["token"] is True
        assert info["listening"], "found no listening sockets"
        assert all(addr in LOOPBACK for addr, _ in info["listening"]), info["listening"]
        assert info["gcs"].startswith("127.0.0.1:")
        assert info["worker_log_levels"] and set(info["worker_log_levels"]) == {logging.ERROR}
        # Another process without the token, or with a wrong one, is turned away by the GCS.
        # (It must skip Ray's loopback-to-machine-address rewrite to reach the GCS at all.)
        for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}):
            intruder = subprocess.run([sys.executable, "-c", INTRUDER.format(gcs=info["gcs"])],
                                      env={**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra},
                                      cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert "CONNECTED" not in intruder.stdout
            assert "InvalidAuthToken" in intruder.stderr, intruder.stderr[-2000:]
    finally:
        if driver.poll() is None:
            driver.stdin.write("\n")
            driver.stdin.flush()
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                driver.kill()
        _kill_marked(marker.encode())
    assert not list(home.iterdir()), f"wrote into HOME: {list(home.rglob('*'))}"


def test_cluster_configs_turn_on_token_auth_and_open_no_port():
    """cluster/: the launcher YAML passes Ray's own schema; every Ray start is in token mode
    with the dashboard on the head's loopback; no token is written into the files; the
    RayJob uses token auth from a Secret behind a ClusterIP Service, with no Ingress."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    validate_config(prepare_config(launcher))
    head = " ".join(launcher["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address" in " ".join(launcher["worker_start_ray_commands"])
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "security_group" not in launcher["provider"]  # the launcher's default: SSH + intra-cluster

    docs = list(yaml.safe_load_all((REPO / "cluster" / "rayjob.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert "Ingress" not in kinds and "Service" not in kinds and "Secret" not in kinds
    job = next(d for d in docs if d["kind"] == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "cvae-ray-token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "python -m jobs.pipeline" in job["spec"]["entrypoint"]

    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    from ray.runtime_env import RuntimeEnv

    assert RuntimeEnv(**runtime_env)["working_dir"] == "."
    assert ".venv/" in runtime_env["excludes"]
    for path in (REPO / "cluster").iterdir():  # no token or key committed with the configs
        text = path.read_text()
        assert "RAY_AUTH_TOKEN=" not in text.replace("RAY_AUTH_TOKEN=$(", "")
        assert not any(len(w) == 64 and all(c in "0123456789abcdef" for c in w) for w in text.split())
