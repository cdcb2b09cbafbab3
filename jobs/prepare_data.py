"""Write dSprites as sharded HDF5: `python -m jobs.prepare_data --config CONFIG [--out DIR]`.

The data go to DIR (default: <config.out>/data), a local path or a URI (file://, s3://,
gs://): manifest.json plus the shards. CONFIG may be a path or a URI too.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from cvae import fs
from cvae.config import load_config
from cvae.data.shards import write_dataset
from cvae.logs import add_level_option, configure
from cvae.model.factors import dataset_scm
from jobs import reports_errors

log = logging.getLogger("jobs.prepare_data")


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--out", help="data directory (default: <config.out>/data)")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    config = load_config(args.config)
    out = args.out or fs.join(config.out, "data")
    fs.check_writable(out)  # an unwritable --out (or a missing bucket) fails now, before any work
    log.info("prepare_data: %s -> %s", config.data.generator, out)
    start = time.perf_counter()

    def progress(done: int, total: int, entry: dict) -> None:
        log.info("  [%d/%d] %s: %d rows (%.1f s)", done, total, entry["file"], entry["rows"],
                 time.perf_counter() - start)

    # A URI is written locally first and uploaded once complete (manifest last).
    with fs.local_output(out) as local:
        manifest = write_dataset(config, local, progress=progress, factor_scm=dataset_scm(config))
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    size = sum(e["bytes"] for e in manifest["shards"]) / 2**20
    print(f"prepare_data: {manifest['grid']['rows']} rows ({counts}) in {seconds:.1f} s: "
          f"{manifest['num_shards']} shards, {size:.1f} MiB, {fs.join(out, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
