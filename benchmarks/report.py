"""One command, one record: run the benchmarks at a size that fits this machine, and write
benchmarks/RESULTS.md (machine, date, commit, every figure, each as its benchmark printed it).

    python -m benchmarks.report                  # data, scaling, queries, training speed, fidelity
    python -m benchmarks.report --quick          # smaller query and training runs (about 11 min)
    python -m benchmarks.report --with notebook  # also the notebook's SVI method side by side
                                                 # (needs the configs/bench-mlp.yaml checkpoint)
    python -m benchmarks.report --with gpu       # also benchmarks/bench_gpu.py (on a GPU machine)

Each benchmark runs as its own process, one after another (never two at once: their
ratios are measured side by side inside each run, and two runs would share the cores).
Its full output goes to benchmarks/results/report/<name>.txt; RESULTS.md holds the
headline lines of each and links the full output. A benchmark that fails is recorded as
failed, with the end of its output, and the others still run. The long runs kept as
committed outputs of their own (RECORDS: the notebook's method and training table, the GPU)
close RESULTS.md with their headline lines, so it holds every figure.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
OUTPUTS = ROOT / "benchmarks" / "results" / "report"


@dataclass
class Step:
    name: str
    what: str
    args: list[str]  # after `python`
    quick_args: list[str] | None = None  # instead, with --quick
    headline: str = ""  # regex: the output lines RESULTS.md quotes
    optional: bool = False  # only with --with NAME


STEPS = [
    Step("data", "full-grid render + shards, reader rate, duplicates",
         ["-m", "benchmarks.bench_data"],
         headline=r"^(render|reader|load_split|duplicate|  \w+ steps)"),
    Step("scaling", "per-worker figures behind docs/scaling.md",
         ["-m", "benchmarks.bench_scaling"],
         headline=r"^  (training step|queries|alone|shard reader|bytes|N=|100M)"),
    Step("query", "counterfactuals/s in-process and end to end against the compute roof; peak memory",
         ["-m", "benchmarks.bench_query", "--memory", "100000"],
         # 20,000 queries: the steady state is the marginal rate between two jobs, and each
         # carries about 6 s of start-up that varies by a second or two from run to run.
         ["-m", "benchmarks.bench_query", "--queries", "20000", "--small", "2000", "--layouts", "2x1",
          "--memory", ""],
         headline=r"^(model|network alone|in_process|end_to_end|memory)"),
    Step("train", "Ray Train against a plain PyTorch loop, per worker; reader headroom",
         ["-m", "benchmarks.bench_train", "--steps", "40"],
         ["-m", "benchmarks.bench_train", "--steps", "30"],
         headline=r"^(model|plain loop|Ray Train|reader alone|  Ray Train|  per worker|  what|  reader)"),
    Step("fidelity", "the renderer against official dSprites frames",
         ["-m", "benchmarks.bench_fidelity"],
         headline=r"^(shape|all|heart|ellipse|square|\s*\|)"),
    Step("notebook", "the original notebook's SVI counterfactuals next to ours",
         ["-m", "benchmarks.bench_notebook", "--queries", "10", "--out", "benchmarks/results/report/notebook"],
         headline=r"^\| ours|^\| notebook|^- ", optional=True),
    Step("gpu", "the GPU paths checked and timed, no Ray (on a machine with a GPU)",
         ["-m", "benchmarks.bench_gpu"], ["-m", "benchmarks.bench_gpu", "--only", "checks,roof,queries"],
         headline=r"^(device|  PASS|  FAIL|roof|  (mlp|conv|sprite) |  \d actor|  epoch 10)", optional=True),
]


@dataclass
class Record:
    """A long run (hours, or a lent GPU) kept as a committed output with its own date and
    commit; RESULTS.md quotes its headline lines, so every figure is in the one record."""
    name: str
    what: str
    path: str  # the committed output, from the repository root
    headline: str  # regex: the lines RESULTS.md quotes


RECORDS = [
    Record("job", "the 100,000-counterfactual query job end to end per GFLOP/s, before and after "
           "(`python -m benchmarks.bench_job`; issue 30)",
           "benchmarks/results/job.txt", r"^(# 20|Q|  end to end|  steady)"),
    Record("notebook", "the original notebook's SVI counterfactuals next to ours, 50 queries "
           "(`python -m benchmarks.bench_notebook`)",
           "benchmarks/results/notebook/bench_notebook.txt",
           r"^(date|notebook method|notebook per query|\| |end to end bulk, paired)"),
    Record("notebook-table", "the notebook's training table, reproduced on the full grid "
           "(`python -m jobs.pipeline --config configs/notebook-table.yaml`)",
           "benchmarks/results/notebook-table/README.md", r"^\| "),
    Record("gpu", "one lent H200: the GPU paths checked and timed (`python -m benchmarks.bench_gpu`)",
           "benchmarks/results/gpu.txt",
           r"^(# |roof|training step|the network|answer_queries|N actor|  arch|  (mlp|conv|sprite) +(cuda|\d)"
           r"|  \d actor|  epoch 10|\d+ check)"),
]


def recorded(skip: set[str]) -> list[str]:
    """RESULTS.md's last section: the long runs' committed outputs (those not rerun now)."""
    body = ["## Long runs, as recorded when they ran", "",
            "Too long for this command, or run on a lent GPU: each file says its own date, "
            "commit and machine.", ""]
    for record in RECORDS:
        if record.name in skip:
            continue
        path = ROOT / record.path
        lines = ([line for line in path.read_text().splitlines() if re.search(record.headline, line)]
                 if path.is_file() else [f"missing: {record.path}"])
        link = Path(os.path.relpath(path, RESULTS.parent))
        body += [f"### {record.name}: {record.what}", "", f"Full output: [{link}]({link})", "",
                 "```", *lines, "```", ""]
    return body


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0.0) if Path("/proc/meminfo").exists() else 0.0
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, ray, pyro, pyarrow, h5py; print(f'torch {torch.__version__}, "
         "ray {ray.__version__}, pyro {pyro.__version__}, pyarrow {pyarrow.__version__}, h5py {h5py.__version__}; "
         "GPU: ' + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'))"],
        capture_output=True, text=True).stdout.strip()
    return [f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {mem:.0f} GiB",
            f"- {versions}", f"- Python {platform.python_version()} on {platform.platform()}"]


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def run(step: Step, quick: bool) -> tuple[str, float, int]:
    args = step.quick_args if quick and step.quick_args else step.args
    command = "python " + " ".join(a if a else "''" for a in args)
    print(f"== {step.name}: {command}", flush=True)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (OUTPUTS / f"{step.name}.txt").open("w") as out:
        out.write(f"$ {command}\n")
        out.flush()
        code = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    seconds = time.perf_counter() - started
    print(f"   {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f} s", flush=True)
    return command, seconds, code


def section(step: Step, command: str, seconds: float, code: int) -> list[str]:
    text = (OUTPUTS / f"{step.name}.txt").read_text()
    lines = [line for line in text.splitlines()[1:] if re.search(step.headline, line)]
    if code != 0:
        lines = ["FAILED, the end of its output:"] + text.splitlines()[-15:]
    link = (OUTPUTS / f"{step.name}.txt").relative_to(RESULTS.parent)  # from RESULTS.md
    status = "ok" if code == 0 else f"exit {code}"
    return [f"## {step.name}: {step.what}", "",
            f"`{command}`: {status}, {seconds:.0f} s; full output: [{link}]({link})",
            "", "```", *lines, "```", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller query and training runs")
    parser.add_argument("--with", dest="extra", default="", help="optional benchmarks to add: notebook")
    parser.add_argument("--only", default="", help="run only these steps (comma-separated names)")
    args = parser.parse_args()
    extra, only = set(filter(None, args.extra.split(","))), set(filter(None, args.only.split(",")))
    unknown = (extra | only) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in STEPS)}")
    steps = [s for s in STEPS if (not s.optional or s.name in extra) and (not only or s.name in only)]
    started = datetime.datetime.now(datetime.timezone.utc)
    at = commit()  # before the run, which rewrites the committed outputs under results/report
    done = [(step, *run(step, args.quick)) for step in steps]
    body = [
        "# Benchmark results", "",
        f"Written by `python -m benchmarks.report{' --quick' if args.quick else ''}"
        f"{' --with ' + args.extra if args.extra else ''}{' --only ' + args.only if args.only else ''}` "
        f"on {started:%Y-%m-%d %H:%M} UTC at commit {at}. Each benchmark ran alone, one after "
        "another; each ratio inside one was measured side by side in that run. The machine may be "
        "shared: absolute rates are noisy, ratios less so.", "",
        *machine(), "",
        "| benchmark | seconds | status |", "| --- | --- | --- |",
        *[f"| {s.name} | {sec:.0f} | {'ok' if code == 0 else f'failed ({code})'} |" for s, _, sec, code in done],
        "",
    ]
    for step, command, seconds, code in done:
        body += section(step, command, seconds, code)
    body += recorded({step.name for step, *_ in done})
    RESULTS.write_text("\n".join(body))
    print(f"wrote {RESULTS}")
    sys.exit(0 if all(code == 0 for *_, code in done) else 1)


if __name__ == "__main__":
    main()
