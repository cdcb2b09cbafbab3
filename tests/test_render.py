"""The renderer's properties, over every (shape, scale, orientation) and every position step."""
import numpy as np
import pytest

from cvae.grid import FACTOR_SIZES, factor_classes
from cvae.render import CENTRE, contact_sheet, count_duplicates, render, sprites

SHAPES, SCALES, ORIENTATIONS, POSITIONS = 3, 6, 40, 32
SQUARE, ELLIPSE, HEART = 0, 1, 2


def every_sprite(pos_x, pos_y):
    """(720, 5) classes: every (shape, scale, orientation) at one position."""
    c = factor_classes({"pos_x": 32, "pos_y": 32})
    c[:, 3], c[:, 4] = pos_x, pos_y
    return c


def test_images_are_binary_uint8_64x64():
    rng = np.random.default_rng(0)
    classes = np.stack([rng.integers(0, FACTOR_SIZES[f], 500) for f in FACTOR_SIZES], axis=1)
    images = render(classes)
    assert images.shape == (500, 64, 64) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 1}
    assert (images.reshape(500, -1).sum(axis=1) > 0).all()  # never an empty frame


def test_every_shape_is_inside_the_frame():
    # A shape never touches its sprite's border, so nothing is clipped there, and every
    # corner position shows the whole shape (same pixel count as at the centre).
    s = sprites()
    assert s[..., 0, :].sum() == s[..., -1, :].sum() == s[..., :, 0].sum() == s[..., :, -1].sum() == 0
    centre = render(every_sprite(16, 16)).sum(axis=(1, 2))
    for x, y in [(0, 0), (31, 0), (0, 31), (31, 31)]:
        np.testing.assert_array_equal(render(every_sprite(x, y)).sum(axis=(1, 2)), centre)


def test_area_grows_with_scale():
    area = sprites().sum(axis=(3, 4))  # (shape, scale, orientation)
    assert (np.diff(area, axis=1) > 0).all()


def test_every_scale_step_changes_the_image():
    s = sprites()
    differs = (s[:, 1:] != s[:, :-1]).any(axis=(3, 4))
    assert differs.all()


@pytest.mark.parametrize("axis", [3, 4])  # pos_x, pos_y
def test_every_position_step_changes_the_image(axis):
    base = every_sprite(0, 0)
    other = 4 if axis == 3 else 3
    base[:, other] = np.random.default_rng(axis).integers(0, POSITIONS, len(base))
    prev = render(base)
    for p in range(1, POSITIONS):
        base[:, axis] = p
        cur = render(base)
        assert (cur != prev).any(axis=(1, 2)).all(), f"step to {p} left an image unchanged"
        # The shape moves by exactly one pixel per step.
        shift = (0, 1) if axis == 3 else (1, 0)
        np.testing.assert_array_equal(np.roll(prev, shift, axis=(1, 2)), cur)
        prev = cur


def test_orientation_zero_and_two_pi_coincide():
    s = sprites()
    np.testing.assert_array_equal(s[:, :, 0], s[:, :, ORIENTATIONS - 1])


def test_rotation_is_about_the_shapes_centre():
    s = sprites().astype(float)
    ys, xs = np.mgrid[:s.shape[-2], :s.shape[-1]]
    mass = s.sum(axis=(3, 4))
    cy = (s * ys).sum(axis=(3, 4)) / mass - CENTRE
    cx = (s * xs).sum(axis=(3, 4)) / mass - CENTRE
    dist = np.hypot(cx, cy)  # (shape, scale, orientation)
    # Square and ellipse are symmetric about their centre; the heart's centroid circles it.
    assert dist[:2].max() < 0.5
    spread = dist[HEART].max(axis=1) - dist[HEART].min(axis=1)
    assert spread.max() < 0.5
    # Turning by a quarter moves the heart's centroid by a quarter turn about the centre.
    angle = np.arctan2(-cy[HEART, 5], cx[HEART, 5])
    turn = np.angle(np.exp(1j * (angle[10] - angle[0])))
    assert abs(turn - 2 * np.pi * 10 / 39) < 0.1


def test_shapes_look_like_their_names():
    s = sprites()
    square, ellipse, heart = s[SQUARE, 5, 0], s[ELLIPSE, 5, 0], s[HEART, 5, 0]
    rows, cols = np.flatnonzero(square.any(1)), np.flatnonzero(square.any(0))
    assert square[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # a filled axis-aligned square
    assert len(rows) == len(cols)
    erows, ecols = np.flatnonzero(ellipse.any(1)), np.flatnonzero(ellipse.any(0))
    assert len(ecols) > 1.5 * len(erows)  # a wide ellipse, rounded corners
    assert ellipse[erows[0], ecols[0]] == 0
    # A heart: mirror-symmetric left to right, two lobes on top, a tip at the bottom.
    np.testing.assert_array_equal(heart, heart[:, ::-1])
    hrows = np.flatnonzero(heart.any(1))
    top, bottom = heart[hrows[0]], heart[hrows[-1]]
    lobes = np.flatnonzero(np.diff(np.concatenate([[0], top, [0]])) == 1)
    assert len(lobes) == 2, "the top row should cut two separate lobes"
    assert bottom.sum() < 5  # the tip
    widths = heart.sum(axis=1)[hrows]
    assert widths[: len(widths) // 3].max() > 3 * widths[-2:].max()


def test_count_duplicates():
    ellipse = factor_classes({"shape": 3, "scale": 6, "pos_x": 32, "pos_y": 32})
    ellipse[:, 0], ellipse[:, 1] = ELLIPSE, 5
    counts = count_duplicates(ellipse)  # 40 orientations: only 0 and 2π coincide
    assert counts == {"images": 40, "distinct": 39, "duplicates": 1}
    positions = factor_classes({"shape": 3, "scale": 6, "orientation": 40})
    assert count_duplicates(positions)["duplicates"] == 0


def test_bad_classes_name_the_factor():
    with pytest.raises(ValueError, match="orientation"):
        render(np.array([[0, 0, 40, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        render(np.zeros((2, 6), np.int64))


def test_contact_sheet(tmp_path):
    path = contact_sheet(tmp_path / "sheet.png", orientations=(0, 20), positions=((31, 31),))
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[:4] == b"\x89PNG"
