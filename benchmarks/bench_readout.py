"""The nearest-ground-truth readout (`cvae.data.readout`) over the whole grid: answers per second.

    python -m benchmarks.bench_readout [--answers 1024] [--check 32]

Builds the readout once (rendering the grid), then reads back answer sets of growing
difficulty made from random grid images: the images themselves (a hash lookup), with a
fraction of their edge pixels flipped (the best IoU drops, so fewer candidates are ruled
out by the bounds), and shifted by one pixel. Each set is read with and without hints
(the true image, as jobs.evaluate gives the counterfactual and factual images); --check
answers of each set are also compared with a brute-force search over every candidate.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cvae.data.grid import NUM_IMAGES
from cvae.data.groundtruth import GroundTruth
from cvae.data.readout import Readout


def _edges(images: np.ndarray) -> np.ndarray:
    """Pixels on either side of the shape's outline (4-neighbourhood)."""
    shifts = [np.roll(images, s, axis=a) for s in (1, -1) for a in (1, 2)]
    inner = images.astype(bool) & np.logical_and.reduce([s.astype(bool) for s in shifts])
    outer = images.astype(bool) | np.logical_or.reduce([s.astype(bool) for s in shifts])
    return outer & ~inner


def _brute(readout: Readout, answers: np.ndarray) -> np.ndarray:
    """Best IoU of each answer over every candidate, by dense matrix products."""
    a = answers.reshape(len(answers), -1).astype(np.float32)
    best = np.zeros(len(a))
    for start in range(0, len(readout.indices), 32768):
        bits = np.unpackbits(readout.packed[start:start + 32768].view(np.uint8), axis=1).astype(np.float32)
        inter = (a @ bits.T).astype(np.float64)
        score = inter / (a.sum(1)[:, None] + bits.sum(1)[None, :] - inter)
        best = np.maximum(best, score.max(1))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=1024)
    parser.add_argument("--check", type=int, default=32, help="answers per set checked by brute force")
    args = parser.parse_args()
    truth = GroundTruth("render")
    start = time.perf_counter()
    readout = Readout.of(truth)
    print(f"readout: {len(readout.indices)} candidates ({readout.distinct_images} distinct images), "
          f"built in {time.perf_counter() - start:.1f} s (rendering included)")
    rng = np.random.default_rng(0)
    index = rng.integers(0, NUM_IMAGES, args.answers)
    images = truth.images(index)
    edges = _edges(images)
    sets = {"grid images": images}
    for p in (0.05, 0.15, 0.35):
        sets[f"edge pixels flipped, p={p}"] = images ^ (edges & (rng.random(images.shape) < p)).astype(np.uint8)
    sets["shifted one pixel right"] = np.roll(images, 1, axis=2)
    for name, answers in sets.items():
        for hints in (None, index[:, None]):
            start = time.perf_counter()
            read = readout.read(answers, hints)
            seconds = time.perf_counter() - start
            print(f"{name:32s} hints {'yes' if hints is not None else 'no ':3s}: "
                  f"{len(answers) / seconds:9.1f} answers/s, mean best IoU {read.iou.mean():.3f}, "
                  f"ties {np.mean(read.images > 1):.3f}")
        if args.check:
            same = np.array_equal(_brute(readout, answers[:args.check]), read.iou[:args.check])
            print(f"{'':32s} brute force agrees on {args.check} answers: {same}")


if __name__ == "__main__":
    main()
