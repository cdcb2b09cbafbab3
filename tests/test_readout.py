"""The nearest-ground-truth readout: exact against brute force, the tie rules, and every
grid image reading back its own classes. Synthetic candidates keep the rule tests
independent of the renderer."""
from __future__ import annotations

import numpy as np
import pytest

from cvae.data.grid import FACTORS, NUM_IMAGES, classes_to_index, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.readout import Readout, _block_any, _block_counts, _pack


def _blobs(n: int, seed: int) -> np.ndarray:
    """n random rectangles and discs on 64x64 frames, of many sizes and places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    images = np.zeros((n, 64, 64), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(8, 56), rng.uniform(8, 56), rng.uniform(2, 9)
        if i % 2:
            images[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            images[i] = (abs(yy - cy) <= r) & (abs(xx - cx) <= r * rng.uniform(0.4, 1.0))
    return images


def _synthetic(images: np.ndarray, indices: np.ndarray) -> Readout:
    lookup = dict(zip(indices.tolist(), images))
    return Readout(indices, lambda ix: np.stack([lookup[i] for i in ix.tolist()]))


def _brute(answers: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, list]:
    a = answers.reshape(len(answers), -1).astype(np.int64)
    b = images.reshape(len(images), -1).astype(np.int64)
    inter = a @ b.T
    score = inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter)
    best = score.max(1)
    return best, [np.flatnonzero(row == m) for row, m in zip(score, best)]


def test_block_features_match_their_definition():
    flat = np.random.default_rng(0).random((50, 4096)) < 0.02
    for side in (8, 4):
        k = 64 // side
        direct = flat.reshape(50, k, side, k, side).sum((2, 4)).reshape(50, -1)
        assert (_block_counts(_pack(flat), side) == direct).all()
        assert (_block_any(_pack(flat), side) == (direct > 0)).all()


def test_nearest_is_exact_against_brute_force():
    images = _blobs(3000, seed=1)
    indices = np.sort(np.random.default_rng(2).choice(NUM_IMAGES, len(images), replace=False))
    readout = _synthetic(images, indices)
    # answers: candidates with flipped pixels, shifted candidates, and fresh blobs
    rng = np.random.default_rng(3)
    noisy = images[:40] ^ (rng.random((40, 64, 64)) < 0.02).astype(np.uint8)
    shifted = np.roll(images[40:80], 1, axis=2)
    answers = np.concatenate([noisy, shifted, _blobs(40, seed=4)])
    best, nearest = _brute(answers, images)
    hints = indices[rng.integers(0, len(indices), (len(answers), 2))]
    for read in (readout.read(answers), readout.read(answers, hints)):
        assert np.array_equal(read.iou, best)
        classes = index_to_classes(indices, with_color=False)
        for i, rows in enumerate(nearest):
            same = len({images[r].tobytes() for r in rows}) == 1
            for j in range(len(FACTORS)):
                values = set(classes[rows, j].tolist())
                expected = values if same or len(values) == 1 else set()
                assert set(np.flatnonzero(read.reads[i, j]).tolist()) == expected, (i, j)


def test_ties_identical_images_and_empty_answers():
    square = np.zeros((64, 64), np.uint8)
    square[10:20, 10:20] = 1
    left, right = np.zeros_like(square), np.zeros_like(square)
    left[40:50, 10:20] = 1
    right[40:50, 12:22] = 1
    classes = np.array([[0, 1, 0, 5, 5],    # the square ...
                        [0, 1, 39, 5, 5],   # ... drawn again by orientation 39: one answer
                        [1, 2, 3, 4, 30],   # left
                        [1, 2, 3, 6, 30]])  # right: ties with left for an image in between
    indices = classes_to_index(classes)
    order = np.argsort(indices)
    readout = _synthetic(np.stack([square, square, left, right])[order], indices[order])
    middle = np.zeros_like(square)
    middle[40:50, 11:21] = 1
    read = readout.read(np.stack([square, middle, np.zeros_like(square)]))

    assert read.images.tolist() == [1, 2, 0]
    # the square reads back both orientations, and every other factor of its class
    assert read.hits(classes[[0, 2, 2]])[0].all() and read.hits(classes[[1, 2, 2]])[0].all()
    # a true tie: pos_x (4 or 6) reads back nothing, the shared factors read back
    assert read.hits(classes[[0, 2, 2]])[1].tolist() == [True, True, True, False, True]
    assert read.hits(classes[[0, 3, 3]])[1].tolist() == [True, True, True, False, True]
    assert not read.reads[1, FACTORS.index("pos_x")].any()
    # an empty image reads back nothing, so it hits no class
    assert not read.reads[2].any() and read.iou[2] == 0.0
    assert read.classes().tolist()[2] == [-1] * 5


def test_grid_images_read_back_their_own_classes():
    truth = GroundTruth("render")
    readout = Readout.of(truth)
    assert len(readout.indices) == NUM_IMAGES
    rng = np.random.default_rng(5)
    classes = index_to_classes(rng.integers(0, NUM_IMAGES, 200), with_color=False)
    classes[0, 2] = 0  # orientation 0 and 2*pi draw the same image
    read = readout.read(truth.images(classes_to_index(classes)))
    assert read.hits(classes).all() and (read.iou == 1.0).all()
    assert read.hits(np.where(np.arange(5) == 2, 39, classes[:1])).all()
    # one pixel off: still exact, and the answer's own classes mostly read back
    moved = truth.images(classes_to_index(classes[:50]))
    moved[:, 0, 0] ^= 1
    off = readout.read(moved, hints=classes_to_index(classes[:50])[:, None])
    assert (off.iou < 1).all() and off.hits(classes[:50]).mean() > 0.9


def test_bad_candidates_are_clear_errors():
    with pytest.raises(ValueError, match="at least one"):
        Readout(np.zeros(0, np.int64), lambda ix: np.zeros((0, 64, 64)))
    with pytest.raises(ValueError, match="unique"):
        Readout(np.array([3, 3]), lambda ix: np.zeros((len(ix), 64, 64)))
