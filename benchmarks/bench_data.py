"""Data-layer figures: render+write of the grid as shards, the reader's images/s, and the
number of duplicate images in the grid.

    python -m benchmarks.bench_data                      # all 737,280 images (configs/full.yaml)
    python -m benchmarks.bench_data --strides orientation=8,pos_x=2,pos_y=2   # a quick run
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from cvae.config import load_config
from cvae.data.grid import factor_classes
from cvae.data.reader import ShardReader, load_split
from cvae.data.render import count_duplicates, render, warm_up
from cvae.data.shards import verify_dataset, write_dataset


def parse_strides(text: str) -> dict:
    if not text:
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/full.yaml")
    parser.add_argument("--strides", default="", help="e.g. orientation=8,pos_x=2 (default: full grid)")
    parser.add_argument("--out", help="data directory (default: a temporary one, removed after)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    strides = parse_strides(args.strides)
    config = load_config(args.config, {"data.strides": strides})
    classes = factor_classes(strides)
    print(f"grid: {len(classes):,} images (strides {strides or 'none'}), "
          f"{config.data.num_shards} train shards, {config.data.compression}, "
          f"{os.cpu_count()} CPUs (shared machine: figures are noisy)")

    t = time.perf_counter()
    warm_up()
    print(f"sprite tiles (720 x 961 sub-pixel phases, drawn once): {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    for start in range(0, len(classes), 65536):
        render(classes[start:start + 65536])
    seconds = time.perf_counter() - t
    print(f"render only: {seconds:.2f} s ({len(classes) / seconds:,.0f} images/s)")

    with tempfile.TemporaryDirectory(dir=args.out and os.path.dirname(os.path.abspath(args.out))) as tmp:
        out = args.out or os.path.join(tmp, "data")
        t = time.perf_counter()
        manifest = write_dataset(config, out)
        seconds = time.perf_counter() - t
        size = sum(e["bytes"] for e in manifest["shards"])
        print(f"render + write shards: {seconds:.2f} s ({len(classes) / seconds:,.0f} images/s), "
              f"{manifest['num_shards']} shards, {size / 2**20:.1f} MiB "
              f"({len(classes) * 4096 / size:.1f}x compression), counts {manifest['counts']}")
        t = time.perf_counter()
        verify_dataset(out)
        print(f"verify (sha256 + layout): {time.perf_counter() - t:.2f} s")

        reader = ShardReader(out, batch_size=args.batch_size, seed=0)
        for epoch in range(2):  # epoch 0 also warms the page cache
            t = time.perf_counter()
            rows = sum(len(b) for b in reader.epoch(epoch))
            seconds = time.perf_counter() - t
        print(f"reader, one process, batch {args.batch_size}: {rows / seconds:,.0f} images/s "
              f"({rows:,} rows in {seconds:.2f} s, {reader.num_batches} batches)")
        t = time.perf_counter()
        test = load_split(out, "test")
        seconds = time.perf_counter() - t
        print(f"load_split(test): {len(test['index']) / seconds:,.0f} images/s")

    t = time.perf_counter()
    dup = count_duplicates(classes)
    print(f"duplicate images in the grid: {dup['duplicates']:,} of {dup['images']:,} "
          f"({dup['distinct']:,} distinct; counted in {time.perf_counter() - t:.1f} s)")
    for axis, name in [(1, "scale"), (2, "orientation"), (3, "pos_x"), (4, "pos_y")]:
        print(f"  {name} steps that leave the image unchanged: "
              f"{unchanged_steps(classes, axis):,}")


def unchanged_steps(classes, axis: int, batch: int = 65536) -> int:
    """How many single steps up one factor's classes leave the image as it was."""
    base = classes[classes[:, axis] < classes[:, axis].max()]
    same = 0
    for start in range(0, len(base), batch):
        rows = base[start:start + batch]
        step = rows.copy()
        step[:, axis] += 1
        same += int((render(rows) == render(step)).all(axis=(1, 2)).sum())
    return same


if __name__ == "__main__":
    main()
