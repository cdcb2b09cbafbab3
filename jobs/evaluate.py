r"""Evaluate counterfactual results against ground truth: report.json, report.md, figures/.

    python -m jobs.evaluate --results DIR --queries PATH --checkpoint CKPT --out DIR [--data DIR]

For example, after the quickstart (python -m jobs.pipeline --config configs/local.yaml):

    python -m jobs.evaluate --results runs/local/answers --queries runs/local/queries \
        --checkpoint runs/local/train/local --out runs/local/eval-again

--checkpoint is one checkpoint folder (holding checkpoint.json and model.pt) or a training
run folder (runs/local/train/local, or runs/local/train which holds it), whose best
checkpoint is used (lowest validation loss, else test loss, else the latest epoch).
--results is the query engine's output folder (results/, errors/, _SUCCESS.json);
--queries the query set that was answered (each row's intervention comes from it).
Every path may be a local path or a pyarrow-filesystem URI (file://, s3://, gs://).
--data is needed only when the checkpoint does not carry its data manifest.
"""
from __future__ import annotations

import argparse
import sys
import time

from cvae import fs
from cvae.evaluate.report import headline
from cvae.evaluate.scores import evaluate
from cvae.logs import add_level_option, configure
from jobs import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="query engine output folder")
    parser.add_argument("--queries", required=True, help="the query set (Parquet file or folder)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a training run folder (its best checkpoint)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--data", default=None, help="dataset folder (for its manifest)")
    parser.add_argument("--figures-per-factor", type=int, default=8,
                        help="answers shown in each figures/*.png, one figure per intervened factor (0: none)")
    parser.add_argument("--reversibility-samples", type=int, default=256,
                        help="reversal queries per intervened-factor group")
    parser.add_argument("--composition-samples", type=int, default=256,
                        help="factual images encoded and decoded for the model's composition")
    parser.add_argument("--max-samples", type=int, default=64,
                        help="most samples a query may ask (the query job's query.max_samples), "
                             "for the reversal queries the evaluation answers itself")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    if min(args.figures_per_factor, args.reversibility_samples, args.composition_samples) < 0 \
            or args.max_samples < 1:
        parser.error("--figures-per-factor, --reversibility-samples and --composition-samples "
                     "must be >= 0, --max-samples >= 1")
    start = time.perf_counter()
    fs.check_writable(args.out)  # an unwritable --out fails now, before any work
    report = evaluate(args.results, args.checkpoint, args.out, queries=args.queries,
                      data_dir=args.data, figures_per_factor=args.figures_per_factor,
                      reversibility_samples=args.reversibility_samples, max_samples=args.max_samples,
                      composition_samples=args.composition_samples)
    print(f"evaluate: {report['rows']} counterfactuals in {time.perf_counter() - start:.1f} s")
    for line in headline(report):
        print(f"evaluate: {line}")
    print(f"evaluate: wrote {args.out}/report.json, report.md and {len(report['figures'])} figure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
