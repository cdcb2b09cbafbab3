"""The renderer against official dSprites: per-shape IoU on the official reference frames,
and a PNG of each frame, official against rendered.

    python -m benchmarks.bench_fidelity [--reference tests/data/official_frames.npz]
                                        [--figure docs/fidelity.png]

In the figure, white is on in both, orange official only, blue rendered only.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cvae.data.fidelity import REFERENCE, fidelity_table, iou, load_reference, overlay
from cvae.data.grid import SHAPE_NAMES
from cvae.data.render import ORIGIN, STEP, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=str(REFERENCE))
    parser.add_argument("--figure", default="docs/fidelity.png")
    args = parser.parse_args()
    frames, labels = load_reference(args.reference)
    t = time.perf_counter()
    rows = fidelity_table(frames, labels)
    print(f"{len(frames)} official frames ({args.reference}), rendered in "
          f"{time.perf_counter() - t:.2f} s")
    print(f"{'shape':<8} {'frames':>6} {'min IoU':>8} {'median':>8} {'mean':>8} {'exact':>6} {'pixels wrong':>13}")
    for r in rows:
        print(f"{r['shape']:<8} {r['frames']:>6} {r['min_iou']:>8.4f} {r['median_iou']:>8.4f} "
              f"{r['mean_iou']:>8.4f} {r['exact']:>6} {r['pixels_wrong']:>13}")

    rendered = render(labels)
    path = save_figure(args.figure, overlay(frames, rendered), labels, iou(rendered, frames))
    print(f"figure: {path}")


def save_figure(path: str, rgb: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                per_row: int = 10, crop: int = 34) -> str:
    """Each frame cropped to `crop` pixels around the shape's centre, titled with its
    classes and IoU, so single wrong pixels show."""
    from cvae.figures import plt  # matplotlib only here

    rows = -(-len(rgb) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(1.25 * per_row, 1.45 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (image, (shape, scale, orientation, x, y), score) in enumerate(zip(rgb, labels, scores)):
        cx, cy = (int(ORIGIN + STEP * p) for p in (x, y))
        x0, y0 = (min(max(c - crop // 2, 0), 64 - crop) for c in (cx, cy))
        ax = axes[i // per_row][i % per_row]
        ax.imshow(image[y0:y0 + crop, x0:x0 + crop], interpolation="nearest")
        ax.set_title(f"{SHAPE_NAMES[shape]} s{scale} o{orientation}\nx{x} y{y}  IoU {score:.3f}",
                     fontsize=6)
    fig.suptitle("official vs rendered: white both, orange official only, blue rendered only",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

if __name__ == "__main__":
    main()
