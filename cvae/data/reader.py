"""Reading shards: a shuffled batch stream for one training worker, and whole splits.

A worker of rank r in a world of W reads only shards r, r+W, r+2W, ... of its split.
Each epoch it visits its shards' HDF5 chunks in a random order, feeds them through a
shuffle buffer and yields exactly `num_batches` batches, the same number on every rank
(DDP needs every rank to step together): its rows are split into that many near-equal
batches, so batch sizes may differ slightly between ranks but no row is dropped or
repeated. The order is a function of (seed, epoch, rank) alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cvae.data.grid import IMAGE_SIZE
from cvae.data.shards import check_file, open_shard, read_manifest, split_shards
from cvae.errors import DataError


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 64, 64), 0/1
    classes: torch.Tensor  # int64 (B, 5): shape, scale, orientation, pos_x, pos_y
    index: torch.Tensor  # int64 (B,): official grid index

    def __len__(self) -> int:
        return len(self.index)


def _read_rows(f, path: Path, start: int, stop: int, images: np.ndarray,
               classes: np.ndarray, index: np.ndarray) -> None:
    """Rows [start, stop) of an open shard into the given arrays (same length)."""
    try:
        f["imgs"].read_direct(images, np.s_[start:stop])
        classes[:] = f["latents/classes"][start:stop, 1:]  # drop color, constant
        index[:] = f["index"][start:stop]
    except OSError as exc:  # HDF5 reports a fletcher32 mismatch or a damaged chunk as OSError
        raise DataError(f"{path}: cannot read rows {start}:{stop} (damaged: {exc})") from None


class ShardReader:
    """The shuffled batches of one rank's shards of one split; see the module docstring."""

    def __init__(self, data_dir: str | Path, split: str = "train", rank: int = 0,
                 world_size: int = 1, batch_size: int = 128, seed: int = 0,
                 shuffle_buffer: int = 4096, verify: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be >= 1")
        self.data_dir = Path(data_dir)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.manifest = read_manifest(self.data_dir)
        self.chunk_rows = int(self.manifest["chunk_rows"])
        shards = split_shards(self.manifest, split)
        if split == "train" and len(shards) < world_size:
            raise DataError(f"{self.data_dir}: the train split has {len(shards)} shard(s), fewer "
                            f"than world_size {world_size}; write it with data.num_shards >= {world_size}")
        self.shards = shards[rank::world_size]
        self.num_rows = sum(e["rows"] for e in self.shards)
        most = max(sum(e["rows"] for e in shards[r::world_size]) for r in range(world_size))
        self.num_batches = math.ceil(most / batch_size)
        if split == "train" and self.num_rows < self.num_batches:
            raise DataError(f"{self.data_dir}: rank {rank} has {self.num_rows} rows, too few for "
                            f"the {self.num_batches} batches every rank must yield")
        self.paths = [self.data_dir / e["file"] for e in self.shards]
        for entry, path in zip(self.shards, self.paths):
            if verify:
                check_file(self.data_dir, entry)
            open_shard(path, entry["rows"]).close()  # layout and row count, early

    def batch_sizes(self) -> list[int]:
        """Sizes of this rank's batches: `num_rows` in `num_batches` near-equal parts
        (a rank without rows of an evaluation split has none)."""
        n, k = self.num_rows, self.num_batches
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)] if k else []
        return [s for s in sizes if s > 0]

    def __len__(self) -> int:
        return len(self.batch_sizes())

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for `epoch`: every row exactly once, in a fresh order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        sizes = self.batch_sizes()
        blocks = [(s, start, min(start + self.chunk_rows, e["rows"]))
                  for s, e in enumerate(self.shards) for start in range(0, e["rows"], self.chunk_rows)]
        order = rng.permutation(len(blocks))
        fill = min(self.shuffle_buffer, self.num_rows)
        cap = max(fill, max(sizes, default=0)) + self.chunk_rows
        images = np.empty((cap, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        classes = np.empty((cap, 5), np.int64)
        index = np.empty(cap, np.int64)
        buffered, next_batch = 0, 0
        files = {}

        def take(k: int) -> Batch:
            # k random rows out of the buffer; rows from its tail fill the holes they leave.
            nonlocal buffered
            picked = rng.choice(buffered, size=k, replace=False)
            batch = Batch(torch.from_numpy(images[picked]), torch.from_numpy(classes[picked]),
                          torch.from_numpy(index[picked]))
            kept = buffered - k
            taken = np.zeros(buffered, dtype=bool)
            taken[picked] = True
            holes = picked[picked < kept]
            movers = kept + np.flatnonzero(~taken[kept:])
            images[holes], classes[holes], index[holes] = images[movers], classes[movers], index[movers]
            buffered = kept
            return batch

        try:
            for b in order:
                s, start, stop = blocks[b]
                if s not in files:
                    files[s] = open_shard(self.paths[s], self.shards[s]["rows"])
                end = buffered + stop - start
                _read_rows(files[s], self.paths[s], start, stop, images[buffered:end],
                           classes[buffered:end], index[buffered:end])
                buffered = end
                while next_batch < len(sizes) and buffered >= max(fill, sizes[next_batch]):
                    yield take(sizes[next_batch])
                    next_batch += 1
            while next_batch < len(sizes):  # the buffer holds exactly the remaining batches
                yield take(sizes[next_batch])
                next_batch += 1
        finally:
            for f in files.values():
                f.close()


def load_split(data_dir: str | Path, split: str, limit: int | None = None,
               verify: bool = True) -> dict[str, np.ndarray]:
    """All rows of a split (or its first `limit`), in shard order, as numpy arrays:
    "imgs" uint8 (n, 64, 64), "classes" int64 (n, 5), "index" int64 (n,)."""
    data_dir = Path(data_dir)
    shards = split_shards(read_manifest(data_dir), split)
    total = sum(e["rows"] for e in shards)
    n = total if limit is None else max(0, min(int(limit), total))
    out = {"imgs": np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
           "classes": np.empty((n, 5), np.int64), "index": np.empty(n, np.int64)}
    done = 0
    for entry in shards:
        if done == n:
            break
        path = check_file(data_dir, entry) if verify else data_dir / entry["file"]
        take = min(entry["rows"], n - done)
        with open_shard(path, entry["rows"]) as f:
            rows = slice(done, done + take)
            _read_rows(f, path, 0, take, out["imgs"][rows], out["classes"][rows], out["index"][rows])
        done += take
    return out
