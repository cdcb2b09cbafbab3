"""Counterfactual queries per second against this machine's compute roof, and peak memory.

    python -m benchmarks.bench_query [--queries 2000] [--actors 2] [--memory 100000,1000000]

Speed: the notebook's mlp (z 50, hidden 1000), one sample per counterfactual query, a
randomly initialised checkpoint (speed does not depend on the weights):
- in-process: `answer_queries` on one Arrow table;
- end to end: Parquet -> Ray Data actor pool -> Parquet (`run_query_job`, Ray already up);
each next to the roof measured in the same run: the FLOPs a counterfactual needs (one encoder
pass, two decoder passes: abduction of U_x and prediction) divided by the float32 matmul
FLOP/s torch reaches here on all cores.

Memory: the same job on files of N queries (a small network, so a million rows finish in
minutes: what grows with N is the data, not the model); peak of the summed resident memory
(VmRSS) of the driver and every process it started (Ray's raylet, GCS, object store, actors),
sampled every 0.2 s. Shared pages are counted once per process, so it is an upper bound.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cvae.checkpoint import save_checkpoint
from cvae.config import Config
from cvae.engine import run_query_job
from cvae.model import LABEL_DIM, NUM_PIXELS, SupervisedVAE
from cvae.queries import QUERY_SCHEMA, answer_queries
from cvae.scm import FactorSCM, ImageSCM


def matmul_flops(seconds: float = 2.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def counterfactual_flops(z: int, h: int) -> float:
    encoder = (NUM_PIXELS + LABEL_DIM) * h + h * h + 2 * h * z
    decoder = (z + LABEL_DIM) * h + 2 * h * h + h * NUM_PIXELS
    return 2.0 * (encoder + 2 * decoder)


def checkpoint(directory: Path, z: int, h: int) -> str:
    config = Config()
    config.model.z_dim, config.model.hidden = z, h
    torch.manual_seed(0)
    save_checkpoint(directory, SupervisedVAE("mlp", z, h),
                    {"config": config.to_dict(), "manifest": {"generator": "render"}, "epoch": 0,
                     "metrics": {}, "scm": FactorSCM.uniform().to_dict()})
    return str(directory)


def counterfactual_queries(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    factor = rng.integers(0, 5, n)
    columns = {"query_id": pa.array([f"q{i:08d}" for i in range(n)]),
               "kind": pa.array(["counterfactual"] * n),
               "source_index": pa.array(rng.integers(0, 737280, n))}
    for j, (name, size) in enumerate((("shape", 3), ("scale", 6), ("orientation", 40), ("pos_x", 32), ("pos_y", 32))):
        values = rng.integers(0, size, n)
        columns[f"do_{name}"] = pa.array(values, mask=factor != j)
    table = pa.table(columns)
    return table


def write_queries(path: Path, n: int, chunk: int = 100_000) -> None:
    """Written a chunk at a time, in row groups of 10k rows (the reader streams them)."""
    schema = counterfactual_queries(1).schema
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            writer.write_table(counterfactual_queries(min(chunk, n - start), seed=start), row_group_size=10_000)


def tree_rss() -> int:
    """Summed VmRSS (bytes) of this process and all its descendants, from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    pids, frontier = [os.getpid()], [os.getpid()]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        pids += frontier
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakMemory:
    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--memory", default="100000,1000000", help="query counts for the memory figure ('' skips)")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_query_"))
    figures = {}
    flops = matmul_flops()
    per_query = counterfactual_flops(50, 1000)
    roof = flops / per_query
    figures.update({"matmul_gflops": flops / 1e9, "flops_per_query_m": per_query / 1e6, "roof_qps": roof})
    print(f"roof: {flops / 1e9:.1f} GFLOP/s matmul / {per_query / 1e6:.1f} MFLOP per counterfactual "
          f"= {roof:.0f} queries/s", flush=True)

    ckpt = checkpoint(work / "ckpt", 50, 1000)
    scm = ImageSCM.from_checkpoint(ckpt, device="cpu")
    table = counterfactual_queries(args.queries)
    answer_queries(scm, table.slice(0, 64))  # warm up
    start = time.perf_counter()
    results, errors = answer_queries(scm, table)
    seconds = time.perf_counter() - start
    assert errors.num_rows == 0 and results.num_rows == args.queries
    qps = args.queries / seconds
    figures.update({"in_process_qps": qps, "in_process_of_roof": qps / roof})
    print(f"in-process: {qps:.0f} queries/s = {100 * qps / roof:.0f}% of roof", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    pq.write_table(table, work / "q.parquet", row_group_size=args.batch_size)
    run_query_job(ckpt, work / "q.parquet", work / "warm", actors=args.actors, batch_size=args.batch_size)
    start = time.perf_counter()
    summary = run_query_job(ckpt, work / "q.parquet", work / "out", actors=args.actors, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    assert summary["result_rows"] == args.queries
    qps = args.queries / seconds
    figures.update({"end_to_end_qps": qps, "end_to_end_of_roof": qps / roof})
    print(f"end to end ({args.actors} actors, batch {args.batch_size}): {qps:.0f} queries/s "
          f"= {100 * qps / roof:.0f}% of roof (includes actor start-up: {seconds:.1f} s)", flush=True)

    small = checkpoint(work / "small", 4, 16)
    for n in [int(x) for x in args.memory.split(",") if x]:
        path = work / f"q{n}.parquet"
        write_queries(path, n)
        with PeakMemory() as mem:
            start = time.perf_counter()
            summary = run_query_job(small, path, work / f"out{n}", actors=args.actors, batch_size=4096)
        assert summary["result_rows"] == n
        figures[f"peak_rss_gib_{n}"] = mem.peak / 2**30
        print(f"memory: {n} queries: peak RSS (driver + Ray processes) {mem.peak / 2**30:.2f} GiB, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
