"""Which classes a trained model answers, measured: its training grid, plus every class of a
factor it draws right although it never saw it.

A model trained on a strided grid (every 8th orientation, every 2nd position) saw only those
classes. Whether it draws the others is a property of its decoder, so it is measured, not
assumed. For each factor with classes the training split lacks, z is abducted from
ground-truth images and the most likely image is drawn with that factor's class changed (a
counterfactual without pixel noise), then compared with the true image by IoU: from a
training-grid image to an unseen class (a `do` naming it), from an image of an unseen class
to a seen one (a factual image of it), and, beside them, from seen to seen. Changing the
class is the point: a reconstruction at the image's own classes is passed by a model that
carries the image through z whatever it does with the classes. The factor's whole range is
declared answered when the worse unseen direction reaches IoU >= `MIN_IOU` and no more than
`MAX_DROP` below seen-to-seen; otherwise its classes stay the training grid's, and queries
naming the others are refused as before (cvae.data.grid.ModelGrid).

The warp decoder (cvae.model.networks) draws orientations and positions as functions of
their values and passes; a one-hot decoder (sprite, conv, mlp) draws an unseen class from
an untrained code and fails, so its grid stays the training grid.
"""
from __future__ import annotations

import numpy as np
import torch

from cvae.data.grid import FACTOR_SIZES, FACTORS, ModelGrid, classes_to_index
from cvae.model.checkpoint import model_grid

MIN_IOU = 0.95
MAX_DROP = 0.02
IMAGES = 256  # per factor and direction


def changed_class_iou(model, ground_truth, source: np.ndarray, target: np.ndarray, device) -> np.ndarray:
    """(n,) IoU with the true image of `target` (n, 5) classes of the most likely image the model
    draws there from z abducted from the `source` rows' images: a counterfactual without pixel
    noise. Not a reconstruction at the image's own classes, which a model that carries the
    image through z passes whatever it does with the classes."""
    images = ground_truth.images(classes_to_index(source))
    with torch.no_grad():
        x = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float32, device=device)
        loc, _ = model.encode(x, torch.as_tensor(source, dtype=torch.long, device=device))
        drawn = (model.decode(loc, torch.as_tensor(target, dtype=torch.long, device=device)) > 0).cpu().numpy()
    truth = ground_truth.images(classes_to_index(target)).reshape(len(target), -1) > 0
    union = (drawn | truth).sum(1)
    return np.where(union > 0, (drawn & truth).sum(1) / np.maximum(union, 1), 1.0)


def _rows(grid: ModelGrid, factor: str | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random class rows on `grid`, except `factor` (if given) drawn from its unseen classes."""
    rows = np.stack([rng.choice(grid.classes[f], n) for f in FACTORS], axis=1)
    if factor is not None:
        unseen = np.setdiff1d(np.arange(FACTOR_SIZES[factor]), grid.classes[factor])
        rows[:, FACTORS.index(factor)] = rng.choice(unseen, n)
    return rows


def _factor_iou(model, trained: ModelGrid, ground_truth, device, factor: str, n: int,
                rng: np.random.Generator) -> tuple[float, float]:
    """(unseen, seen): mean IoU of the images drawn after changing `factor`, the worse of
    seen -> unseen class and unseen -> seen class, and seen -> seen beside them."""
    j = FACTORS.index(factor)
    on, off = _rows(trained, None, n, rng), _rows(trained, factor, n, rng)
    to_unseen, to_seen, back = on.copy(), on.copy(), off.copy()
    to_unseen[:, j] = off[:, j]
    to_seen[:, j] = rng.choice(trained.classes[factor], n)
    back[:, j] = on[:, j]
    unseen = min(changed_class_iou(model, ground_truth, on, to_unseen, device).mean(),
                 changed_class_iou(model, ground_truth, off, back, device).mean())
    return float(unseen), float(changed_class_iou(model, ground_truth, on, to_seen, device).mean())


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
    classes, why, coverage = dict(trained.classes), dict(trained.why), {}
    try:
        for f in thinned:
            unseen, seen = _factor_iou(module, trained, ground_truth, device, f, images, rng)
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
    return [f"{f}: unseen classes reconstruct at IoU {c['unseen_iou']:.3f} (seen {c['seen_iou']:.3f}; "
            f"{c['images']} images each way, to and from other classes): "
            f"{'answered' if c['answered'] else 'refused'}"
            for f, c in coverage.items()]


def grid_lines(meta: dict) -> list[str]:
    """What a checkpoint answers, for the jobs' output: its grid, and the measurement behind it."""
    coverage = {f: c for f, c in (meta.get("coverage") or {}).items() if isinstance(c, dict)}
    return [f"the model answers {model_grid(meta)!r}"] + [f"  {line}" for line in describe_coverage(coverage)]
