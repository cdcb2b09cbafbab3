"""Real Ray clusters for tests: a head and worker nodes started with `ray start` on loopback.

Every node runs in its own temp dir with its own ports and token authentication, so it
never meets the session's other Ray instances. The token travels only in the environment
(RAY_AUTH_TOKEN): nothing is written to the real ~/.ray. Each node's processes carry a
marker in their environment (inherited by every worker its raylet starts), so a test can
kill exactly one node, raylet and workers, as a machine failure would, and stops the
cluster by killing exactly the processes it started, never with `ray stop`, which would
stop every Ray instance of this user.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE_MARKER = "CVAE_TEST_NODE"


def free_ports(n: int) -> list[int]:
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


def worker_port_range(taken: list[int], size: int = 200) -> int:
    """The first port of `size` + 1 worker ports that holds none of `taken`: the kernel's
    free ports may fall anywhere, and Ray refuses a component port inside the range."""
    for start in [p + 1 for p in sorted(taken)] + [20000]:
        end = start + size
        if end <= 65535 and not any(start <= p <= end for p in taken):
            return start
    raise RuntimeError(f"no {size + 1}-port range free of {taken}")


def pids_with_marker(marker: bytes) -> list[int]:
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


def kill_marked(marker: bytes, graceful: bool = True) -> None:
    """Stop every process with `marker`: SIGTERM then SIGKILL, or SIGKILL at once (a crash)."""
    steps = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)) if graceful else ((signal.SIGKILL, 5.0),)
    for sig, wait in steps:
        for pid in pids_with_marker(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listening(pids: list[int]) -> list[tuple[str, int]]:
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


class RayNodes:
    """A head (`start_head`) and worker nodes (`add_worker`) on loopback with token auth.

    A lone head listens on 127.0.0.1 with multi-machine clusters off, as on a laptop. A
    cluster (`multinode=True`) gives each node its own loopback address, 127.0.0.2 for the
    head, 127.0.0.3 and on for the workers, like machines on a network: Ray refuses worker
    nodes unless multi-machine clusters are on, and with them on it would replace the
    address 127.0.0.1 (only that one) by the machine's own network address.

    `env()` is the environment a client needs (the token, these settings, no other RAY_*);
    `address` is the Jobs API (dashboard) URL and `gcs` the address `ray.init` takes.
    """

    def __init__(self, multinode: bool = False, env: dict | None = None) -> None:
        self.multinode, self.extra_env = multinode, dict(env or {})  # extra_env: on every node
        # Ray puts unix sockets under its temp dir: keep the path short (sun_path is 108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="cvae-ray-", dir="/tmp"))
        self.home = self.root / "home"
        self.home.mkdir(parents=True)
        self.token = secrets.token_hex(32)
        self.gcs = self.address = None
        self.nodes: list[str] = []

    def marker(self, node: str) -> bytes:
        return f"{NODE_MARKER}={self.root.name}-{node}".encode()

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({
            "HOME": str(self.home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            # On Linux Ray replaces --node-ip-address=127.0.0.1 by the machine's own address
            # (services.resolve_ip_for_localhost) unless clusters of several machines are off.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if self.multinode else "0",
            # `python` on a node is this interpreter, as on a cluster with the project installed.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        })
        env.update(self.extra_env)
        env.update(extra)
        return env

    def ip(self, node_index: int) -> str:
        return f"127.0.0.{2 + node_index}" if self.multinode else "127.0.0.1"

    def _start(self, node: str, head_args: list[str], num_cpus: int, ports: list[int]) -> None:
        nm, om, agent, agent_grpc, rt_env, metrics = ports[-6:]
        ip = self.ip(len(self.nodes))
        wmin = worker_port_range(ports)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", *head_args,
            f"--node-ip-address={ip}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 200}",
            # Its own temp dir per node, as on separate machines: nodes sharing one share their
            # runtime_resources, where one node's agent can delete a job's working_dir that
            # another node's driver is still importing from.
            f"--num-cpus={num_cpus}", f"--temp-dir={self.root / node}", "--disable-usage-stats",
        ]
        name, value = self.marker(node).decode().split("=", 1)
        self.nodes.append(node)
        started = subprocess.run(cmd, env=self.env(**{name: value}), cwd=self.root,
                                 capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"ray start ({node}) failed:\n{started.stdout}\n{started.stderr}")

    def start_head(self, num_cpus: int) -> None:
        ports = free_ports(9)
        gcs, dashboard, client = ports[:3]
        ip = self.ip(0)
        self.gcs, self.address = f"{ip}:{gcs}", f"http://{ip}:{dashboard}"
        self._start("head", ["--head", f"--dashboard-host={ip}", f"--port={gcs}",
                             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}"],
                    num_cpus, ports)

    def add_worker(self, node: str, num_cpus: int) -> None:
        self._start(node, [f"--address={self.gcs}"], num_cpus, free_ports(6))

    def node_at(self, ip: str) -> str:
        """The name of the node with this address (a cluster's nodes each have their own)."""
        return next(n for i, n in enumerate(self.nodes) if self.ip(i) == ip)

    def pids(self, node: str | None = None) -> list[int]:
        nodes = [node] if node else self.nodes
        return sorted(pid for n in nodes for pid in pids_with_marker(self.marker(n)))

    def node_running(self, title: str) -> list[str]:
        """The nodes with a process whose command line (Ray's process title) holds `title`."""
        return [n for n in self.nodes if any(title in process_title(p) for p in self.pids(n))]

    def wait_gone(self, title: str, timeout: float = 120) -> None:
        """Wait until no node runs a process titled `title`: the actors of a finished job
        hold their CPUs until Ray has reaped them, which takes a while on a loaded machine."""
        deadline = time.monotonic() + timeout
        while self.node_running(title):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{title} processes still run on {self.node_running(title)}")
            time.sleep(0.5)

    def kill(self, node: str) -> None:
        """SIGKILL the node's raylet and every process it started: a machine failure."""
        kill_marked(self.marker(node), graceful=False)

    def stop(self) -> list[int]:
        """Stop every node; returns the pids that would not stop (none, if all is well)."""
        for node in reversed(self.nodes):
            kill_marked(self.marker(node))
        leftover = self.pids()
        shutil.rmtree(self.root, ignore_errors=True)
        return leftover
