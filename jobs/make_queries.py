"""Write a bulk counterfactual query set from a spec: partitioned Parquet under --out.

    python -m jobs.make_queries --spec SPEC --out DIR [--data DIR]

For example, after the quickstart (python -m jobs.pipeline --config configs/local.yaml):

    python -m jobs.make_queries --spec configs/bulk/test_other_shapes.yaml \
        --data runs/local/data --out runs/local/bulk

Example specs are in configs/bulk/.

--out and --data may be local paths or pyarrow-filesystem URIs (file://, s3://, gs://).
The spec format is documented in cvae/serve/make_queries.py and docs/bulk.md.
"""
from __future__ import annotations

import argparse
import sys

from cvae import fs
from cvae.errors import OutputLocationError
from cvae.logs import add_level_option, configure
from cvae.serve.make_queries import SpecError, load_spec, make_queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_queries", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="YAML spec (path or URI)")
    parser.add_argument("--out", required=True, help="output folder (path or URI)")
    parser.add_argument("--data", default=None, help="sharded dataset, for sources: {split: ...}")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        spec = load_spec(args.spec)
        fs.check_writable(args.out)  # an unwritable --out fails now, before any work
        summary = make_queries(spec, args.out, data_dir=args.data)
    except (SpecError, OutputLocationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['num_queries']:,} queries from {summary['num_sources']:,} sources "
          f"in {len(summary['files'])} file(s) to {args.out}")
    for factor, count in sorted(summary["queries_by_factor"].items()):
        print(f"  do({factor}): {count:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
