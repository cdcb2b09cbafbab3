"""Where orientation misses come from: counterfactual answers whose orientation does not
read back as asked, by scale, shape and by how many classes the read class is off.

    python -m benchmarks.bench_orientation --checkpoint runs/bench/train-learned \
        --data runs/bench/data [--sources 150] [--seed 1]

Official dSprites spaces its 40 orientations over [0, 2*pi] inclusive, a step of 2*pi/39
(9.23 degrees), so a square turned by 10 classes is turned by 92.3 degrees: 2.3 degrees
from its 90-degree symmetry, a few pixels apart at the smallest scales and not
pixel-identical (the readout counts only pixel-identical classes as one answer). This
prints how many misses are such near-symmetric twins (offsets of about 10, 20 or 30 classes
for squares; 19-20 for ellipses) and how many are other angles.
"""
from __future__ import annotations

import argparse
import collections
import tempfile

import numpy as np
import pyarrow.parquet as pq

from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTORS, SHAPE_NAMES
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import decode_image
from cvae.data.readout import Readout
from cvae.model.checkpoint import resolve_checkpoint
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import answer_queries

STEP_DEGREES = 360 / 39


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sources", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        make_queries({"seed": args.seed, "sources": {"split": "test", "sample": args.sources},
                      "interventions": [{"factor": f, "values": "random_other"}
                                        for f in ("shape", "scale", "pos_x", "pos_y")]}, folder, data_dir=args.data)
        results, _ = answer_queries(ImageSCM.from_checkpoint(checkpoint, device="cpu"), pq.read_table(folder),
                                    max_samples=4)
    images = np.stack([decode_image(b) for b in results["image"].to_pylist()])
    world = np.stack([np.array(results[f]) for f in FACTORS], 1)
    reads = Readout.of(GroundTruth("render")).read(images).reads[:, 2, :40]
    right = reads[np.arange(len(world)), world[:, 2]]
    print(f"{checkpoint}: {len(world)} counterfactual answers (do shape, scale, pos_x, pos_y; orientation "
          f"is preserved), orientation read back as the answer's own class: {right.mean():.3f}")
    offsets = collections.Counter()
    for i in np.flatnonzero(~right):
        got = np.flatnonzero(reads[i])
        if not len(got):
            offsets["nothing (a tie between different images)"] += 1
            continue
        d = min(min((g - world[i, 2]) % 40, (world[i, 2] - g) % 40) for g in got)
        offsets[f"{d} classes ({d * STEP_DEGREES:.1f} degrees)"] += 1
    print("misses by how far the read class is:")
    for name, count in offsets.most_common():
        print(f"  {name}: {count}")
    print("read back right, by scale: " + ", ".join(
        f"{s}: {right[world[:, 1] == s].mean():.3f}" for s in range(6)))
    print("read back right, by shape: " + ", ".join(
        f"{SHAPE_NAMES[s]}: {right[world[:, 0] == s].mean():.3f}" for s in range(3)))


if __name__ == "__main__":
    main()
