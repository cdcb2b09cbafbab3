"""A model's declared grid widens past its training grid only where it is measured to draw
the unseen classes right (cvae.model.coverage), checked on models whose answers are known:
one that draws every image exactly, one that draws unseen classes as the nearest seen one,
one that draws nothing, and an untrained network."""
from __future__ import annotations

import numpy as np
import torch

from cvae.data.grid import FACTORS, ModelGrid
from cvae.data.groundtruth import GroundTruth
from cvae.data.render import render
from cvae.model.coverage import describe_coverage, measure_coverage
from cvae.model.networks import SupervisedVAE

TRAINED = ModelGrid({"orientation": np.arange(0, 40, 8), "pos_x": np.arange(0, 32, 2),
                     "pos_y": np.arange(0, 32, 2)}, {"orientation": "data.strides.orientation: 8"})


class Drawer(torch.nn.Module):
    """A stand-in model whose decoder draws ground truth at the classes `draw_at` gives."""

    def __init__(self, draw_at):
        super().__init__()
        self.draw_at = draw_at
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x, y):
        return torch.zeros(len(x), 2), torch.ones(len(x), 2)

    def decode(self, z, y):
        images = render(self.draw_at(y.numpy())).reshape(len(y), -1)
        return torch.as_tensor(images, dtype=torch.float32) * 20 - 10


def nearest_seen(classes: np.ndarray) -> np.ndarray:
    out = classes.copy()
    for j, f in enumerate(FACTORS):
        seen = TRAINED.classes[f]
        out[:, j] = seen[np.abs(classes[:, j, None] - seen[None]).argmin(1)]
    return out


def measure(model):
    return measure_coverage(model, TRAINED, GroundTruth(), torch.device("cpu"), images=64)


def test_a_model_that_draws_every_class_right_is_declared_the_whole_grid():
    grid, coverage = measure(Drawer(lambda c: c))
    assert grid.is_whole() and not grid.why
    assert set(coverage) == {"orientation", "pos_x", "pos_y"}
    assert all(c["answered"] and c["unseen_iou"] == 1.0 for c in coverage.values())
    assert "answered" in describe_coverage(coverage)[0]


def test_unseen_classes_drawn_as_seen_ones_stay_refused():
    grid, coverage = measure(Drawer(nearest_seen))
    assert grid == TRAINED
    assert coverage["orientation"]["seen_iou"] == 1.0 and coverage["orientation"]["unseen_iou"] < 0.9
    assert not any(c["answered"] for c in coverage.values())
    assert grid.why["orientation"].startswith("data.strides.orientation: 8; unseen classes measured at")
    assert "refused" in describe_coverage(coverage)[0]


def test_blank_and_untrained_models_are_not_declared():
    blank = Drawer(lambda c: c)
    blank.decode = lambda z, y: torch.full((len(y), 4096), -10.0)
    for model in (blank, SupervisedVAE("warp", z_dim=4)):
        grid, coverage = measure(model)
        assert grid == TRAINED and not any(c["answered"] for c in coverage.values())


def test_a_model_that_copies_the_image_through_z_is_not_declared():
    """It reconstructs every image exactly at its own classes, so a reconstruction passes it
    by construction; drawn at changed classes it returns the source image, and fails."""
    copier = Drawer(lambda c: c)
    copier.encode = lambda x, y: (x, torch.ones_like(x))
    copier.decode = lambda z, y: z * 20 - 10
    grid, coverage = measure(copier)
    assert grid == TRAINED and not any(c["answered"] for c in coverage.values())
    assert all(c["unseen_iou"] < 0.9 for c in coverage.values())


def test_a_whole_training_grid_needs_no_measurement():
    grid, coverage = measure_coverage(None, ModelGrid.whole(), GroundTruth(), torch.device("cpu"))
    assert grid.is_whole() and coverage == {}


def test_the_measured_images_are_off_the_training_grid_in_one_factor_only():
    from cvae.model.coverage import _rows

    rows = _rows(TRAINED, "pos_x", 500, np.random.default_rng(0))
    assert (rows[:, 3] % 2 == 1).all()
    others = np.delete(rows, 3, axis=1)
    assert TRAINED.contains_rows(np.insert(others, 3, 0, axis=1)).all()


def test_the_report_scores_counterfactuals_at_unseen_classes_apart():
    from cvae.evaluate.metrics import row_parts

    factual = np.array([[0, 1, 8, 4, 6], [0, 1, 8, 4, 6], [0, 1, 8, 4, 6]])
    cf = np.array([[2, 1, 8, 4, 6], [0, 1, 13, 4, 6], [0, 1, 8, 5, 6]])  # on, orientation 13, pos_x 5
    parts = row_parts(cf, factual, [], TRAINED)
    assert parts["unseen"].tolist() == [False, True, True]
    assert parts["trained"].tolist() == [True, False, False]
    assert "unseen" not in row_parts(cf, factual, [], None)
