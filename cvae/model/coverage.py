"""Which classes a trained model answers, measured: its training grid, plus every class of a
factor it draws right although it never saw it.

A model trained on a strided grid (every 8th orientation, every 2nd position) saw only those
classes. Whether it draws the others is a property of its decoder, so it is measured, not
assumed: for each factor with classes the training split lacks, ground-truth images whose
class of that factor is unseen (the other factors on the training grid) are reconstructed
(z from the encoder, the most likely pixels at their own classes) and compared with the
truth by IoU, beside the same number of training-grid images. The factor's whole range is
declared answered when the unseen images reconstruct at IoU >= `MIN_IOU` and no more than
`MAX_DROP` below the seen ones; otherwise its classes stay the training grid's, and queries
naming the others are refused as before (cvae.data.grid.ModelGrid).

The warp decoder (cvae.model.networks) draws orientations and positions as functions of
their values and passes; a one-hot decoder (sprite, conv, mlp) draws an unseen class from
an untrained code and fails, so its grid stays the training grid.
"""
from __future__ import annotations

import numpy as np
import torch

from cvae.data.grid import FACTOR_SIZES, FACTORS, ModelGrid, classes_to_index

MIN_IOU = 0.95
MAX_DROP = 0.02
IMAGES = 256  # per factor measured, and as many seen ones


def reconstruction_iou(model, images: np.ndarray, classes: np.ndarray, device) -> np.ndarray:
    """(n,) IoU of each image with its most likely reconstruction at its own classes."""
    with torch.no_grad():
        x = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float32, device=device)
        y = torch.as_tensor(classes, dtype=torch.long, device=device)
        loc, _ = model.encode(x, y)
        drawn = (model.decode(loc, y) > 0).cpu().numpy()
    truth = images.reshape(len(images), -1) > 0
    union = (drawn | truth).sum(1)
    return np.where(union > 0, (drawn & truth).sum(1) / np.maximum(union, 1), 1.0)


def _rows(grid: ModelGrid, factor: str | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random class rows on `grid`, except `factor` (if given) drawn from its unseen classes."""
    rows = np.stack([rng.choice(grid.classes[f], n) for f in FACTORS], axis=1)
    if factor is not None:
        unseen = np.setdiff1d(np.arange(FACTOR_SIZES[factor]), grid.classes[factor])
        rows[:, FACTORS.index(factor)] = rng.choice(unseen, n)
    return rows


def measure_coverage(model, trained: ModelGrid, ground_truth, device, seed: int = 0,
                     images: int = IMAGES) -> tuple[ModelGrid, dict]:
    """The grid `model` answers and the measurement behind it ({} when `trained` is whole).

    Returns (grid, coverage): coverage[factor] = {"unseen_iou", "seen_iou", "images",
    "answered"} for each factor the training grid thins."""
    thinned = [f for f in FACTORS if not trained.is_whole(f)]
    if not thinned:
        return trained, {}
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    rng = np.random.default_rng(seed)
    try:
        seen_rows = _rows(trained, None, images, rng)
        seen = float(reconstruction_iou(module, ground_truth.images(classes_to_index(seen_rows)),
                                        seen_rows, device).mean())
        classes, why, coverage = dict(trained.classes), dict(trained.why), {}
        for f in thinned:
            rows = _rows(trained, f, images, rng)
            unseen = float(reconstruction_iou(module, ground_truth.images(classes_to_index(rows)),
                                              rows, device).mean())
            answered = unseen >= MIN_IOU and unseen >= seen - MAX_DROP
            coverage[f] = {"unseen_iou": round(unseen, 4), "seen_iou": round(seen, 4),
                           "images": images, "answered": answered}
            if answered:
                classes[f] = np.arange(FACTOR_SIZES[f])
                why.pop(f, None)
            else:
                why[f] = (f"{why[f]}; " if f in why else "") + (
                    f"unseen classes measured at reconstruction IoU {unseen:.3f} "
                    f"(seen {seen:.3f}; answered from IoU {MIN_IOU})")
    finally:
        module.train(was_training)
    return ModelGrid(classes, why), coverage


def describe_coverage(coverage: dict) -> list[str]:
    """One line per measured factor, for logs and the model card."""
    return [f"{f}: unseen classes reconstruct at IoU {c['unseen_iou']:.3f} (seen {c['seen_iou']:.3f}, "
            f"{c['images']} images each): {'answered' if c['answered'] else 'refused'}"
            for f, c in coverage.items()]


def grid_lines(meta: dict) -> list[str]:
    """What a checkpoint answers, for the jobs' output: its grid, and the measurement behind it."""
    from cvae.model.checkpoint import model_grid

    coverage = {f: c for f, c in (meta.get("coverage") or {}).items() if isinstance(c, dict)}
    return [f"the model answers {model_grid(meta)!r}"] + [f"  {line}" for line in describe_coverage(coverage)]
