"""The 100,000-counterfactual query job end to end, per GFLOP/s of this machine's matmul rate.

    python -m benchmarks.bench_job [--checkpoint runs/local ...] [--queries 100000] [--repeats 3]
                                   [--baseline-tree DIR]

What a user waits for: `python -m jobs.query` in a subprocess (Python and Ray start-up,
checkpoint and ground-truth loading, Parquet in, the actor pool, Parquet out, the commit),
with the quickstart's checkpoint (`python -m jobs.pipeline --config configs/local.yaml`
first) on --queries counterfactuals, each from a random source the checkpoint's factor SCM
allows and with one random factor set to a random class of its grid. Next to each run, the
machine's float32 matmul rate (1024 x 1024 on all cores, the best of six bursts) measured
right before and right after it: the figure is counterfactuals/s per GFLOP/s of the mean
of the two, so that runs on a faster or a busier machine compare. A run of --small
queries gives the fixed cost (start-up) and the steady rate between the two sizes.
The runs alternate (big, small, big, ...) and each figure is the best of --repeats.

Several --checkpoint (e.g. the quickstart's model and a narrower one) run in turn within
each repeat, and --baseline-tree runs the first checkpoint's jobs with the code of another
checkout too (a `git worktree` of the commit before a change): before and after, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_query import matmul_rate, write_queries
from benchmarks.fixtures import source_classes
from cvae.model.checkpoint import checkpoint_scm, model_grid, resolve_checkpoint


def run_job(checkpoint: str, queries: Path, out: Path, extra: list[str], tree: str | None = None) -> float:
    """Seconds of one `python -m jobs.query` in a fresh process (with the code of `tree` if
    given, else this checkout's); fails loudly if the job does."""
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.query", "--checkpoint", checkpoint, "--queries", str(queries),
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=tree, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"jobs.query failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads((out / "_SUCCESS.json").read_text())
    if summary["error_rows"] or summary["result_rows"] != summary["queries"]:  # a refused row is no answer
        raise SystemExit(f"jobs.query answered {summary['result_rows']} of {summary['queries']} queries "
                         f"({summary['error_rows']} error rows): the queries should all be answered")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append",
                        help="a checkpoint or training run folder, repeatable (default: runs/local, the quickstart's)")
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=5_000, help="queries of the run that measures start-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each size (the best counts)")
    parser.add_argument("--job-args", default="", help="extra jobs.query arguments, e.g. '--actors 2'")
    parser.add_argument("--baseline-tree", help="another checkout whose code runs the first checkpoint's jobs too")
    args = parser.parse_args()

    variants = {}  # name -> (checkpoint, tree)
    for path in args.checkpoint or ["runs/local"]:
        checkpoint = str(Path(resolve_checkpoint(path)).resolve())
        meta = json.loads((Path(checkpoint) / "checkpoint.json").read_text())
        variants[f"{path} {meta['model']}"] = (checkpoint, None)
    if args.baseline_tree:
        first = next(iter(variants.items()))
        variants[f"{first[0]}, code of {args.baseline_tree}"] = (first[1][0], str(Path(args.baseline_tree).resolve()))
    meta = json.loads((Path(next(iter(variants.values()))[0]) / "checkpoint.json").read_text())
    scm = checkpoint_scm(meta).on_classes(model_grid(meta).classes)  # the SCM the actors answer with
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads for the matmul rate", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_job-"))
    sizes = {"big": args.queries, "small": args.small}
    for size, n in sizes.items():  # sources the first checkpoint's SCM allows (the others': the same data)
        write_queries(work / f"{size}.parquet", n, sources=source_classes(scm))
    runs = {(name, size): [] for name in variants for size in sizes}
    for r in range(args.repeats):
        for v, (name, (checkpoint, tree)) in enumerate(variants.items()):
            for size, n in sizes.items():
                before = matmul_rate() / 1e9
                seconds = run_job(checkpoint, work / f"{size}.parquet", work / f"out-{v}-{size}-{r}",
                                  args.job_args.split(), tree)
                after = matmul_rate() / 1e9
                gflops = (before + after) / 2
                runs[name, size].append((seconds, gflops))
                print(f"  {name}, {size} run {r + 1}: {n:,} counterfactuals in {seconds:.1f} s = {n / seconds:,.0f}/s; "
                      f"matmul {before:.0f} / {after:.0f} GFLOP/s; {n / seconds / gflops:.2f} per GFLOP/s", flush=True)
    for name in variants:
        big, small = runs[name, "big"], runs[name, "small"]
        seconds, gflops = max(big, key=lambda run: 1 / run[0] / run[1])
        ratios = [args.queries / s / g for s, g in big]
        steady = (args.queries - args.small) / (min(s for s, _ in big) - min(s for s, _ in small))
        fixed = min(s for s, _ in small) - args.small / steady
        print(f"{name}:\n  end to end, {args.queries:,} counterfactuals: {args.queries / seconds:,.0f}/s at "
              f"{gflops:.0f} GFLOP/s = {args.queries / seconds / gflops:.2f} counterfactuals/s per GFLOP/s "
              f"(best of {args.repeats}; median {statistics.median(ratios):.2f}; goal >= 12)\n"
              f"  steady rate between {args.small:,} and {args.queries:,} queries: {steady:,.0f}/s "
              f"({steady / gflops:.2f} per GFLOP/s); fixed cost (start-up, commit) about {fixed:.1f} s")


if __name__ == "__main__":
    main()
