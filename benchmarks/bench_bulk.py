"""Bulk query generation and evaluation: rows per second and peak memory.

    python -m benchmarks.bench_bulk [--sets shapes,orientations] [--results 5000]

Generation: `make_queries` on growing sets, each in a fresh process so its peak resident
memory (ru_maxrss) is its own: "shapes" is the whole grid x every other shape (1.47 M
queries), "orientations" the whole grid x every other orientation (28.8 M). Streaming
shows as a peak that does not grow with the set.

Evaluation: `evaluate` on N counterfactual results whose images are the true ones
(rendered), with a random-weight checkpoint: the core metrics alone (readout, controls; no
figures, reversibility or model composition), then with the defaults (8 figures per factor,
256 reversal queries per group answered by the SCM, 256 images encoded and decoded 10 times),
timed side by side in this run; results/s leave out building the readout's index (once per
process, printed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = {
    "shapes": {"sources": {"grid": True}, "interventions": [{"factor": "shape", "values": "other"}]},
    "orientations": {"sources": {"grid": True}, "interventions": [{"factor": "orientation", "values": "other"}]},
}

CHILD = """
import json, resource, sys, time
from cvae.serve.make_queries import make_queries
spec, out = json.loads(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
summary = make_queries(spec, out)
print(json.dumps({"rows": summary["num_queries"], "files": len(summary["files"]),
                  "seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_generation(names: list[str], tmp: Path) -> None:
    print("make_queries (each set in its own process):")
    for name in names:
        out = tmp / f"q-{name}"
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SETS[name]), str(out)],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in out.glob("*.parquet")) / 2**20
        print(f"  {name:13s} {r['rows']:>11,} rows  {r['files']:3d} files  {size:7.1f} MiB  "
              f"{r['seconds']:6.1f} s  {r['rows'] / r['seconds'] / 1e6:5.2f} M rows/s  "
              f"peak RSS {r['peak_mb']:6.0f} MiB")


def bench_evaluation(n: int, tmp: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from cvae.config import Config
    from cvae.data.grid import FACTORS, classes_to_index, index_to_classes
    from cvae.data.groundtruth import GroundTruth
    from cvae.data.images import encode_pngs
    from cvae.data.render import RENDERER_VERSION
    from cvae.evaluate.scores import evaluate
    from cvae.model.checkpoint import save_checkpoint
    from cvae.model.networks import SupervisedVAE
    from cvae.serve.make_queries import make_queries
    from cvae.serve.queries import RESULT_SCHEMA

    config = Config()
    ckpt = tmp / "ckpt"
    save_checkpoint(ckpt, SupervisedVAE("mlp", config.model.z_dim, config.model.hidden),
                    {"config": config.to_dict(),
                     "manifest": {"generator": "render", "renderer": RENDERER_VERSION, "holdout": []},
                     "epoch": 0, "metrics": {}, "scm": None})
    per_source = 2 + 5 + 1  # the interventions below: 2 other shapes, 5 other scales, 1 pos_x
    make_queries({"sources": {"grid": True, "sample": max(1, n // per_source)}, "seed": 1,
                  "interventions": [{"factor": "shape", "values": "other"},
                                    {"factor": "scale", "values": "other"},
                                    {"factor": "pos_x", "values": "random_other"}]}, tmp / "q")
    q = pads.dataset(str(tmp / "q"), format="parquet").to_table()
    factual = index_to_classes(q["source_index"].to_numpy(), with_color=False)
    do = np.stack([q[f"do_{f}"].fill_null(-1).to_numpy() for f in FACTORS], axis=1)
    cf = np.where(do >= 0, do, factual)
    cols = {"query_id": q["query_id"], "sample": pa.array(np.zeros(q.num_rows, np.int64)), "kind": q["kind"],
            **{f: pa.array(cf[:, j]) for j, f in enumerate(FACTORS)},
            **{f"factual_{f}": pa.array(factual[:, j]) for j, f in enumerate(FACTORS)},
            "image": pa.array(encode_pngs(GroundTruth().images(classes_to_index(cf))), pa.binary())}
    (tmp / "res" / "results").mkdir(parents=True)
    pq.write_table(pa.table(cols, schema=RESULT_SCHEMA), tmp / "res" / "results" / "part-0.parquet")
    (tmp / "res" / "_SUCCESS.json").write_text("{}")
    print(f"evaluate ({q.num_rows:,} counterfactual results, mlp z 50 hidden 1000 for reversal):")
    core = {"figures_per_factor": 0, "reversibility_samples": 0, "composition_samples": 0}
    for label, kwargs in (("core metrics", core), ("with defaults", {})):
        start = time.perf_counter()
        report = evaluate(tmp / "res", ckpt, tmp / f"eval-{label[:4]}", tmp / "q", **kwargs)
        seconds = time.perf_counter() - start
        build = report["readout"]["build_seconds"]  # the readout's index, built by the first call
        print(f"  {label:13s} {seconds:6.1f} s  {q.num_rows / (seconds - build):8.0f} results/s  "
              f"(readout index built in {build:.1f} s; IoU {report['overall']['iou']:.3f}, "
              f"effectiveness {report['overall']['effectiveness']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="shapes,orientations", help=f"comma list of {', '.join(SETS)}")
    parser.add_argument("--results", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        if args.sets:
            bench_generation(args.sets.split(","), Path(tmp))
        if args.results:
            bench_evaluation(args.results, Path(tmp))


if __name__ == "__main__":
    main()
