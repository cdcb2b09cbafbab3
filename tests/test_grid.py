"""Index conversions of the dSprites grid: official order, posY fastest."""
import numpy as np
import pytest

from cvae.data.grid import (
    FACTORS,
    LATENT_SIZES,
    LATENT_VALUES,
    NUM_IMAGES,
    classes_to_index,
    classes_to_values,
    factor_classes,
    grid_indices,
    index_to_classes,
    values_to_classes,
)


def test_full_grid_round_trip():
    index = np.arange(NUM_IMAGES)
    classes = index_to_classes(index)
    assert classes.shape == (NUM_IMAGES, 6)
    np.testing.assert_array_equal(classes_to_index(classes), index)
    np.testing.assert_array_equal(classes_to_index(classes[:, 1:]), index)
    np.testing.assert_array_equal(values_to_classes(classes_to_values(classes)), classes)


def test_official_order_pos_y_fastest():
    c = index_to_classes(np.array([0, 1, 31, 32, 1024, 40 * 1024, 6 * 40 * 1024, NUM_IMAGES - 1]))
    np.testing.assert_array_equal(c, [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1],  # posY first
        [0, 0, 0, 0, 0, 31],
        [0, 0, 0, 0, 1, 0],  # then posX
        [0, 0, 0, 1, 0, 0],  # then orientation
        [0, 0, 1, 0, 0, 0],  # scale
        [0, 1, 0, 0, 0, 0],  # shape
        [0, 2, 5, 39, 31, 31],
    ])
    # factor_classes lists the grid in official order.
    np.testing.assert_array_equal(classes_to_index(factor_classes()), np.arange(NUM_IMAGES))


def test_values_match_the_official_file():
    c = np.array([[0, 2, 5, 39, 31, 0]])
    np.testing.assert_allclose(classes_to_values(c), [[1.0, 3.0, 1.0, 2 * np.pi, 1.0, 0.0]])
    assert LATENT_SIZES == (1, 3, 6, 40, 32, 32)
    assert len(LATENT_VALUES["orientation"]) == 40


def test_strides_thin_the_grid():
    strides = {"orientation": 10, "pos_x": 4, "pos_y": 4}
    classes = factor_classes(strides)
    assert len(classes) == 3 * 6 * 4 * 8 * 8
    assert set(classes[:, FACTORS.index("orientation")]) == {0, 10, 20, 30}
    index = grid_indices(strides)
    assert (np.diff(index) > 0).all()
    np.testing.assert_array_equal(index_to_classes(index, with_color=False), classes)


@pytest.mark.parametrize("bad", [np.array([[3, 0, 0, 0, 0]]), np.array([[0, 0, 0, 0, -1]]),
                                 np.array([[0, 0, 0]])])
def test_bad_classes_are_errors(bad):
    with pytest.raises(ValueError):
        classes_to_index(bad)


def test_bad_index_and_strides_are_errors():
    with pytest.raises(ValueError, match="out of range"):
        index_to_classes(np.array([NUM_IMAGES]))
    with pytest.raises(ValueError, match="colour"):
        factor_classes({"colour": 2})
