"""What `jobs.query --verify` costs: rows/s of the query actors' work with and without reading
every answer back over the whole grid, side by side in one process.

    python -m benchmarks.bench_verify [--queries 4096] [--repeats 3] [--job]

The pretrained whole-grid model answers counterfactuals of sources drawn from the whole
grid, one random other value of every factor each (configs/bulk/any_image.yaml's kind of
set), through `answer_queries`, the function each query actor runs on its blocks: once
plain, once with a `Verifier` (the evaluation's exact readout, built once per actor; its
build time is reported apart, as it is paid once per actor, not per row). Runs alternate,
plain and verified, and each figure is the best of `--repeats`. One torch thread, as one
actor per core runs. `--job` also times two `jobs.query` runs end to end (Ray, one actor:
start-up and the readout build included) on the same queries.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cvae.causal.image import ImageSCM
from cvae.data.groundtruth import GroundTruth
from cvae.data.readout import Readout
from cvae.model.checkpoint import pretrained_checkpoint
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import answer_queries
from cvae.serve.verify import Verifier

GOAL = 1.5  # verified time / plain time


def query_set(n: int, folder: Path) -> Path:
    """About n counterfactuals: n/5 sources from the whole grid, a random other value of each factor."""
    factors = ("shape", "scale", "orientation", "pos_x", "pos_y")
    make_queries({"seed": 0, "sources": {"grid": True, "sample": max(1, n // 5)},
                  "interventions": [{"factor": f, "values": "random_other"} for f in factors]}, folder)
    return folder


def timed(scm, table, verifier, repeats: int) -> tuple[float, object]:
    best, results = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        results, errors = answer_queries(scm, table, verifier=verifier)
        best = min(best, time.perf_counter() - start)
        assert errors.num_rows == 0
    return best, results


def in_process(table, repeats: int) -> float:
    scm = ImageSCM.from_checkpoint(str(pretrained_checkpoint()), device="cpu")
    start = time.perf_counter()
    verifier = Verifier(Readout.of(GroundTruth("render")))
    print(f"readout index built in {time.perf_counter() - start:.1f} s (once per actor; rendering the grid included)")
    answer_queries(scm, table.slice(0, 256), verifier=verifier)  # warm-up of both paths
    plain, verified = [], []
    for _ in range(repeats):  # alternate, so a busy minute of the shared machine hits both
        plain.append(timed(scm, table, None, 1)[0])
        seconds, results = timed(scm, table, verifier, 1)
        verified.append(seconds)
    rows, p, v = table.num_rows, min(plain), min(verified)
    ratio = v / p
    print(f"{rows:,} counterfactual rows, best of {repeats}, one torch thread:")
    print(f"  plain     {rows / p:8,.0f} rows/s  ({p:.2f} s)")
    print(f"  --verify  {rows / v:8,.0f} rows/s  ({v:.2f} s)")
    print(f"  time with --verify / without: {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'MISSED'})")
    iou = results.column("read_iou").to_numpy()
    share = np.mean(results.column("verified").to_numpy(zero_copy_only=False))
    print(f"  verified {share:.3f} of the answers; {np.mean(iou == 1):.3f} are grid images (a hash look-up), "
          f"the others searched (median IoU with the nearest {np.median(iou[iou < 1]):.3f})")
    return ratio


def end_to_end(queries: Path, out: Path) -> None:
    from cvae.serve.engine import run_query_job

    for verify in (False, True):
        summary = run_query_job("pretrained", queries, out / str(verify), actors=1, verify=verify)
        print(f"  jobs.query{' --verify' if verify else ''}, one actor, end to end: {summary['seconds']:.1f} s "
              f"for {summary['result_rows']:,} rows ({summary['result_rows'] / summary['seconds']:,.0f} rows/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--job", action="store_true", help="also time jobs.query end to end, with and without")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        queries = query_set(args.queries, Path(tmp) / "queries")
        in_process(pq.read_table(queries), args.repeats)
        if args.job:
            end_to_end(queries, Path(tmp) / "answers")


if __name__ == "__main__":
    main()
