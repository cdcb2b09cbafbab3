"""Write dSprites as sharded HDF5: `python -m jobs.prepare_data --config CONFIG [--out DIR]`.

The data go to DIR (default: <config.out>/data), a local path or a URI (file://, s3://,
gs://): manifest.json plus the shards. CONFIG may be a path or a URI too.
"""
from __future__ import annotations

import argparse
import sys
import time

from cvae import fs
from cvae.config import ConfigError, load_config
from cvae.data.shards import write_dataset
from cvae.errors import DataError, OutputLocationError
from cvae.logs import add_level_option, configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--out", help="data directory (default: <config.out>/data)")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        config = load_config(args.config)
        out = args.out or fs.join(config.out, "data")
        fs.check_writable(out)  # an unwritable --out (or a missing bucket) fails now, before any work
        print(f"prepare_data: {config.data.generator} -> {out}", flush=True)
        start = time.perf_counter()

        def progress(done: int, total: int, entry: dict) -> None:
            print(f"  [{done}/{total}] {entry['file']}: {entry['rows']} rows "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

        # A URI is written locally first and uploaded once complete (manifest last).
        with fs.local_output(out) as local:
            manifest = write_dataset(config, local, progress=progress)
    except (ConfigError, DataError, OutputLocationError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    size = sum(e["bytes"] for e in manifest["shards"]) / 2**20
    print(f"prepare_data: {manifest['grid']['rows']} rows ({counts}) in {seconds:.1f} s: "
          f"{manifest['num_shards']} shards, {size:.1f} MiB, {fs.join(out, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
