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
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from raynodes import RayNodes, kill_marked, listening, pids_with_marker

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# The job the test submits (the main job on the tiny config) and how its outputs are checked.
JOB = ("jobs.pipeline", "pipeline")

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def token_head():
    """A Ray head with RAY_AUTH_MODE=token on 127.0.0.1; yields its details, always stopped."""
    nodes = RayNodes()
    try:
        nodes.start_head(num_cpus=2)
        yield {"root": nodes.root, "token": nodes.token, "address": nodes.address,
               "marker": nodes.marker("head"), "home": nodes.home}
    finally:
        leftover = nodes.stop()
        assert not leftover, f"the test head's processes did not stop: {leftover}"


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return JobSubmissionClient(address, headers=headers)


def _check_prepare_outputs(out: Path) -> None:
    from cvae.data.shards import read_manifest, verify_dataset

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
    sockets = listening(pids_with_marker(token_head["marker"]))
    assert sockets, "found no listening sockets for the head"
    exposed = [(a, p) for a, p in sockets if a not in LOOPBACK]
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
from raynodes import listening, pids_with_marker
import ray

from cvae.localray import NO_DASHBOARD_LOGGERS

ctx = init_ray(num_cpus=1, log_to_driver=False)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
# Worker processes ran the setup hook that silences "State API unavailable" loggers.
levels = ray.get(ray.remote(lambda: [__import__("logging").getLogger(n).level
                                     for n in NO_DASHBOARD_LOGGERS]).remote())
pids = pids_with_marker(("CVAE_TEST_LOCAL=" + os.environ["CVAE_TEST_LOCAL"]).encode()) + [os.getpid()]
print(json.dumps({"token": is_token_auth_enabled(), "gcs": ctx.address_info["gcs_address"],
                  "listening": listening(pids), "worker_log_levels": levels}), flush=True)
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
        kill_marked(marker.encode())
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
