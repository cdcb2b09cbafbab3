r"""Write a bulk counterfactual query set from a spec: partitioned Parquet under --out.

    python -m jobs.make_queries --spec SPEC --out DIR [--data DIR] [--checkpoint CKPT]

For example, after the quickstart (python -m jobs.pipeline --config configs/local.yaml):

    python -m jobs.make_queries --spec configs/bulk/test_other_shapes.yaml \
        --data runs/local/data --out runs/local/bulk

Example specs are in configs/bulk/. With --checkpoint (a checkpoint, a run folder, or
`pretrained`) the set stays on the classes that model answers: sources and values off its
grid are skipped and counted (without it, split sources stay on the dataset's grid).

--out and --data may be local paths or pyarrow-filesystem URIs (file://, s3://, gs://).
The spec format is documented in cvae/serve/spec.py and docs/bulk.md.
"""
from __future__ import annotations

import argparse
import sys

from cvae import fs
from cvae.logs import add_level_option, configure
from cvae.serve.make_queries import make_queries
from cvae.serve.spec import load_spec
from jobs import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_queries", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="YAML spec (path or URI)")
    parser.add_argument("--out", required=True, help="output folder (path or URI)")
    parser.add_argument("--data", default=None, help="sharded dataset, for sources: {split: ...}")
    parser.add_argument("--checkpoint", default=None,
                        help="keep to the classes this model answers (a checkpoint, run folder or 'pretrained')")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    spec = load_spec(args.spec)
    fs.check_writable(args.out)  # an unwritable --out fails now, before any work
    grid = None
    if args.checkpoint:
        from cvae.model.checkpoint import load_meta, model_grid, resolve_checkpoint  # torch, only for a checkpoint

        grid = model_grid(load_meta(resolve_checkpoint(args.checkpoint)))
    summary = make_queries(spec, args.out, data_dir=args.data, grid=grid)
    print(f"wrote {summary['num_queries']:,} queries from {summary['num_sources']:,} sources "
          f"in {len(summary['files'])} file(s) to {args.out}")
    for factor, count in sorted(summary["queries_by_factor"].items()):
        print(f"  do({factor}): {count:,}")
    skipped = summary["skipped_off_grid"]
    if summary["grid"] is not None:
        from cvae.data.grid import ModelGrid

        print(f"on the model's grid, {ModelGrid.from_dict(summary['grid'])!r}: skipped "
              f"{skipped['sources']:,} sources and {skipped['queries']:,} queries off it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
