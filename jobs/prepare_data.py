"""Write dSprites as sharded HDF5: `python -m jobs.prepare_data --config CONFIG [--out DIR]`.

The data go to DIR (default: <config.out>/data): manifest.json plus the shards.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cvae.config import ConfigError, load_config
from cvae.errors import DataError
from cvae.shards import write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--out", help="data directory (default: <config.out>/data)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.out is None and "://" in config.out:
            raise ConfigError(f"config.out: {config.out!r} is remote; prepare_data writes to a "
                              f"local directory, give one with --out")
        out = Path(args.out) if args.out else Path(config.out) / "data"
        print(f"prepare_data: {config.data.generator} -> {out}", flush=True)
        start = time.perf_counter()

        def progress(done: int, total: int, entry: dict) -> None:
            print(f"  [{done}/{total}] {entry['file']}: {entry['rows']} rows "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

        manifest = write_dataset(config, out, progress=progress)
    except (ConfigError, DataError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    size = sum(e["bytes"] for e in manifest["shards"]) / 2**20
    print(f"prepare_data: {manifest['grid']['rows']} rows ({counts}) in {seconds:.1f} s: "
          f"{manifest['num_shards']} shards, {size:.1f} MiB, {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
