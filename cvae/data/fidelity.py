"""How closely the renderer draws official dSprites: official frames against the renderer's
images of the same factor classes.

The reference frames (`tests/data/official_frames.npz`, a copy of
`shared/reference/official_frames.npz`) are 80 official images from the animation in the
official dSprites README, with their factor classes; see that folder's README. They are
what `cvae.data.render`'s geometry was fitted to (`benchmarks/fit_renderer.py`), so a figure on
them is a training figure: `fit_renderer.py --holdout` shows what half of them says about
the other half.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cvae.data.grid import IMAGE_SIZE, SHAPE_NAMES
from cvae.data.images import iou  # per-image IoU, the evaluation's own
from cvae.data.render import render

REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "data" / "official_frames.npz"


def load_reference(path: str | Path = REFERENCE) -> tuple[np.ndarray, np.ndarray]:
    """(frames (n, 64, 64) uint8 0/1, labels (n, 5) int64 factor classes) of a reference file."""
    with np.load(path, allow_pickle=False) as data:
        frames = np.unpackbits(data["frames"], axis=1).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        return frames, data["labels"].astype(np.int64)


def fidelity_table(frames: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per shape and overall: frames, min / median / mean IoU, exact frames, and the
    pixels that differ in all, rendering `labels` and comparing with `frames`."""
    rendered = render(labels)
    scores = iou(rendered, frames)
    wrong = (rendered != frames).sum(axis=(1, 2))
    rows = []
    for name, mask in [(n, labels[:, 0] == i) for i, n in enumerate(SHAPE_NAMES)] + [
            ("all", np.ones(len(labels), bool))]:
        s = scores[mask]
        rows.append({"shape": name, "frames": int(mask.sum()), "min_iou": float(s.min()),
                     "median_iou": float(np.median(s)), "mean_iou": float(s.mean()),
                     "exact": int((s == 1).sum()), "pixels_wrong": int(wrong[mask].sum())})
    return rows


def overlay(official: np.ndarray, rendered: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 3) uint8 RGB: both on in white, official only in orange, rendered only
    in blue, neither black."""
    official, rendered = official.astype(bool), rendered.astype(bool)
    rgb = np.zeros(official.shape + (3,), dtype=np.uint8)
    rgb[official & rendered] = (255, 255, 255)
    rgb[official & ~rendered] = (255, 140, 0)
    rgb[~official & rendered] = (30, 144, 255)
    return rgb
