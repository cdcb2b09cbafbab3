r"""Answer a Parquet file (or folder) of queries with the SCM held by a Ray actor pool.

    python -m jobs.query --checkpoint CKPT --queries PATH --out DIR [--actors N] [--batch-size N]
                         [--cpus-per-actor N] [--config CONFIG] [--address ADDR] [--overwrite]
                         [--verify] [--keep {all,verified}]

For example, after the quickstart (python -m jobs.pipeline --config configs/local.yaml):

    python -m jobs.query --checkpoint runs/local/train/local --queries runs/local/queries \
        --out runs/local/answers-again

CKPT is `pretrained` (the whole-grid model shipped with cvae), one checkpoint folder
(runs/local/train/local/checkpoint_epoch_00005, holding checkpoint.json and model.pt) or a
training run folder (runs/local/train/local, or runs/local/train which holds it): a run
folder's best checkpoint is used (lowest validation loss, else lowest test loss, else the
latest epoch) and one line says which. CKPT, PATH and DIR may be local paths or URIs that
pyarrow's filesystems handle (file://, s3://, gs://).

--verify reads every answer back over the whole grid (the evaluation's readout, in the query
actors) and adds read_shape .. read_pos_y, read_iou and verified to each result row;
--keep verified (implies --verify) writes only verified rows to DIR/results and the others
to DIR/rejected, with the same schema (docs/queries.md).

A DIR that already holds a finished output (_SUCCESS.json) is refused unless --overwrite;
one left by a killed job is taken over. Flags override the config's `query` section. A
whole-input problem (a missing or mistyped column, a missing, corrupt or refused
checkpoint, an output folder that cannot be created or written, or one that holds a finished
output) prints one clear line, before Ray starts, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from cvae.logs import add_level_option, configure
from jobs import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.query", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a training run folder (its best checkpoint); path or URI")
    parser.add_argument("--queries", required=True, help="a Parquet file or a folder of them (path or URI)")
    parser.add_argument("--out", required=True, help="output folder (results/, errors/, _SUCCESS.json; path or URI)")
    parser.add_argument("--config", help="YAML config; its `query` section gives the defaults")
    parser.add_argument("--actors", type=int,
                        help="query actors, each holding the model (default: the config's query.actors, else 2)")
    parser.add_argument("--batch-size", type=int,
                        help="most queries an actor answers per call; answers do not depend on it "
                             "(default: query.batch_size, else 4096)")
    parser.add_argument("--gpus-per-actor", type=float,
                        help="GPUs per actor, a fraction shares one GPU (default: query.gpus_per_actor, else 0)")
    parser.add_argument("--cpus-per-actor", type=float,
                        help="CPUs (and torch threads) per actor (default: query.cpus_per_actor, else 1)")
    parser.add_argument("--address", help="Ray address (default: the config's ray_address, else local)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished output in --out")
    parser.add_argument("--verify", action="store_true",
                        help="read every answer back over the whole grid: read_* columns and `verified`")
    parser.add_argument("--keep", choices=("all", "verified"), default="all",
                        help="verified: only verified rows in results/, the others in rejected/ (implies --verify)")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)

    from cvae import fs

    fs.check_writable(args.out)  # first, before the heavy imports: an unwritable --out fails within a second
    from cvae.config import Config, load_config

    config = load_config(args.config) if args.config else Config()
    query = config.query
    for flag in ("actors", "batch_size", "gpus_per_actor", "cpus_per_actor"):
        value = getattr(args, flag)
        if value is not None:
            setattr(query, flag, value)
    query.validate("flags")
    from cvae.serve.engine import run_query_job  # torch and Ray, after every flag is checked

    summary = run_query_job(args.checkpoint, args.queries, args.out, **query.job_settings(),
                            ray_address=args.address or config.ray_address, num_cpus=config.num_cpus,
                            overwrite=args.overwrite, verify=args.verify, keep=args.keep,
                            command=" ".join(["python -m jobs.query", *(sys.argv[1:] if argv is None else argv)]))
    for line in summary_lines(summary, args.out):
        print(line)
    return 0


def summary_lines(summary: dict, out: str) -> list[str]:
    """What the job did, for people: rows answered and refused, and where they are (the
    whole record is in _SUCCESS.json)."""
    if not summary["queries"]:
        return [f"nothing to answer: the queries hold no rows; committed an empty output in {out}"]
    lines = [f"answered {summary['queries'] - summary['error_rows']:,} of {summary['queries']:,} queries in "
             f"{summary.get('seconds', 0):.1f} s: {summary['result_rows']:,} result rows in {out}/results"]
    if summary["error_rows"]:
        lines.append(f"refused {summary['error_rows']:,} queries, each with its reason, in {out}/errors")
    if summary.get("off_grid_rows"):
        lines.append(f"  {summary['off_grid_rows']:,} of them name classes this model was not trained on "
                     f"(`python -m jobs.make_queries --checkpoint` keeps a query set on its grid)")
    lines += _verify_lines(summary, out)
    lines.append(f"the run's record: {out}/_SUCCESS.json")
    return lines


def _verify_lines(summary: dict, out: str) -> list[str]:
    """The verification's lines: how many answers read back as their own classes, and where
    the rejected ones are."""
    if not summary.get("verify"):
        return []
    answered = summary["result_rows"] + summary.get("rejected_rows", 0)
    share = f" ({summary['verified_rows'] / answered:.1%})" if answered else ""
    lines = [f"verified {summary['verified_rows']:,} of {answered:,} result rows{share}: they read back over "
             "the whole grid as their own classes"]
    if summary.get("keep") == "verified":
        lines.append(f"kept the {summary['result_rows']:,} verified rows in {out}/results; rejected "
                     f"{summary.get('rejected_rows', 0):,} rows, in {out}/rejected")
    return lines


if __name__ == "__main__":
    sys.exit(main())
