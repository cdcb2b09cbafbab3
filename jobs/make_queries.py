"""Write a bulk counterfactual query set from a spec: partitioned Parquet under --out.

    python -m jobs.make_queries --spec specs/test_x_shapes.yaml --out runs/q [--data runs/data]

--out and --data may be local paths or pyarrow-filesystem URIs (file://, s3://, gs://).
The spec format is documented in cvae/make_queries.py and docs/bulk.md.
"""
from __future__ import annotations

import argparse
import sys

from cvae.make_queries import SpecError, load_spec, make_queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="YAML spec (path or URI)")
    parser.add_argument("--out", required=True, help="output folder (path or URI)")
    parser.add_argument("--data", default=None, help="sharded dataset, for sources: {split: ...}")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        summary = make_queries(spec, args.out, data_dir=args.data)
    except (SpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['num_queries']:,} queries from {summary['num_sources']:,} sources "
          f"in {len(summary['files'])} file(s) to {args.out}")
    for factor, count in sorted(summary["queries_by_factor"].items()):
        print(f"  do({factor}): {count:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
