"""The renderer: official frames, and its properties over shapes, scales, orientations and
every position step."""
import numpy as np
import pytest

from cvae.data.fidelity import fidelity_table, iou, load_reference
from cvae.data.grid import FACTOR_SIZES, factor_classes
from cvae.data.render import STEP, contact_sheet, count_duplicates, render, sprite_tiles

SHAPES, SCALES, ORIENTATIONS, POSITIONS = 3, 6, 40, 32
SQUARE, ELLIPSE, HEART = 0, 1, 2


def every_sprite(pos_x, pos_y, scales=range(SCALES), orientations=range(ORIENTATIONS)):
    """(n, 5) classes: every (shape, scale, orientation) asked for, at one position."""
    return np.array([(s, k, o, pos_x, pos_y) for s in range(SHAPES) for k in scales
                     for o in orientations], dtype=np.int64)


def centroid(images):
    """(n, 2) centre of mass (column, row) of (n, 64, 64) images."""
    ys, xs = np.mgrid[:64, :64]
    mass = images.sum(axis=(1, 2))
    return np.stack([(images * xs).sum(axis=(1, 2)) / mass, (images * ys).sum(axis=(1, 2)) / mass], 1)


def test_official_frames_are_drawn_faithfully():
    # The bound: every reference frame at IoU >= 0.97 with the official image,
    # median >= 0.99, and most of them pixel-exact; for each shape on its own too.
    frames, labels = load_reference()
    table = {row["shape"]: row for row in fidelity_table(frames, labels)}
    for name in ("square", "ellipse", "heart", "all"):
        assert table[name]["min_iou"] >= 0.97, table[name]
        assert table[name]["median_iou"] >= 0.99, table[name]
    assert table["all"]["exact"] >= 50, table["all"]


def test_a_wrong_geometry_fails_the_fidelity_bound():
    # The bound can fail: the same frames one position class off score far below it.
    frames, labels = load_reference()
    moved = labels.copy()
    moved[:, 3] = np.where(moved[:, 3] < 31, moved[:, 3] + 1, moved[:, 3] - 1)
    assert iou(render(moved), frames).min() < 0.9


def test_images_are_binary_uint8_64x64():
    rng = np.random.default_rng(0)
    classes = np.stack([rng.integers(0, FACTOR_SIZES[f], 500) for f in FACTOR_SIZES], axis=1)
    images = render(classes)
    assert images.shape == (500, 64, 64) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 1}
    assert (images.reshape(500, -1).sum(axis=1) > 0).all()  # never an empty frame


def test_nothing_is_clipped():
    # The largest shapes at every third orientation: no tile ever has a pixel on its
    # border at any sub-pixel phase, so no position clips a shape.
    for shape in range(SHAPES):
        for orientation in range(0, ORIENTATIONS, 3):
            tiles = np.unpackbits(sprite_tiles(shape, SCALES - 1, orientation), axis=-1)
            tiles = tiles.reshape(-1, 32, 32)
            border = tiles[:, 0].sum() + tiles[:, -1].sum() + tiles[:, :, 0].sum() + tiles[:, :, -1].sum()
            assert border == 0, (shape, orientation)
    corners = np.concatenate([every_sprite(x, y, scales=[SCALES - 1]) for x in (0, 31) for y in (0, 31)])
    images = render(corners)
    assert images[:, [0, -1], :].sum() == images[:, :, [0, -1]].sum() == 0


def test_positions_step_32_31_pixel_from_15_5_to_47_5():
    # Official frames: the centre runs from 15.5 to 47.5 over the 32 classes.
    squares = np.array([(SQUARE, 5, 0, k, k) for k in range(POSITIONS)])
    centres = centroid(render(squares))  # an upright square snaps to whole pixels
    np.testing.assert_allclose(centres[:, 0], 15.5 + STEP * np.arange(POSITIONS), atol=0.5)
    assert centres[0, 0] == 15.5 and centres[-1, 0] == 47.5
    np.testing.assert_allclose(centres[:, 1], centres[:, 0])


def test_area_grows_with_scale():
    area = render(every_sprite(9, 20)).reshape(SHAPES, SCALES, ORIENTATIONS, -1).sum(-1)
    assert (np.diff(area, axis=1) > 0).all()


def test_every_scale_step_changes_the_image():
    images = render(every_sprite(5, 26)).reshape(SHAPES, SCALES, ORIENTATIONS, -1)
    assert (images[:, 1:] != images[:, :-1]).any(axis=-1).all()


@pytest.mark.parametrize("axis", [3, 4])  # pos_x, pos_y
def test_every_position_step_moves_the_shape(axis):
    base = every_sprite(0, 0, scales=[0, 5], orientations=range(0, ORIENTATIONS, 7))
    other = 4 if axis == 3 else 3
    base[:, other] = np.random.default_rng(axis).integers(0, POSITIONS, len(base))
    prev = render(base)
    for p in range(1, POSITIONS):
        base[:, axis] = p
        cur = render(base)
        assert (cur != prev).any(axis=(1, 2)).all(), f"step to {p} left an image unchanged"
        moved = centroid(cur) - centroid(prev)
        along, across = (0, 1) if axis == 3 else (1, 0)
        assert (np.abs(moved[:, along] - STEP) < 0.5).all()  # about 32/31 px, that way
        assert (np.abs(moved[:, across]) < 0.5).all()
        prev = cur


def test_orientation_zero_and_two_pi_coincide():
    np.testing.assert_array_equal(render(every_sprite(7, 19, orientations=[0])),
                                  render(every_sprite(7, 19, orientations=[ORIENTATIONS - 1])))


def test_orientation_turns_counter_clockwise_on_screen():
    # An ellipse turned by about 46 degrees (class 5) runs from lower left to upper right.
    ellipse = render(np.array([(ELLIPSE, 5, 5, 16, 16)]))
    (cx, cy), = centroid(ellipse)
    ys, xs = np.nonzero(ellipse[0])
    dx, dy = xs - cx, ys - cy
    angle = 0.5 * np.arctan2(2 * (dx * -dy).mean(), (dx**2).mean() - (dy**2).mean())
    assert abs(np.degrees(angle) - 360 * 5 / 39) < 3  # the major axis, v up


def test_shapes_look_like_their_names():
    square, ellipse, heart = render(np.array([(s, 5, 0, 0, 0) for s in range(SHAPES)]))
    rows, cols = np.flatnonzero(square.any(1)), np.flatnonzero(square.any(0))
    assert square[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # a filled axis-aligned square
    assert len(rows) == len(cols) == 20  # side 20 px at scale 1, as in the official frames
    erows, ecols = np.flatnonzero(ellipse.any(1)), np.flatnonzero(ellipse.any(0))
    assert len(ecols) > 1.5 * len(erows)  # a wide ellipse, rounded corners
    assert ellipse[erows[0], ecols[0]] == 0
    # A heart: mirror-symmetric about its centre column, two lobes on top, a tip at the bottom.
    np.testing.assert_array_equal(heart[:, :32], heart[:, 31::-1][:, ::-1][:, :32])
    hrows = np.flatnonzero(heart.any(1))
    top, bottom = heart[hrows[0]], heart[hrows[-1]]
    lobes = np.flatnonzero(np.diff(np.concatenate([[0], top, [0]])) == 1)
    assert len(lobes) == 2, "the top row should cut two separate lobes"
    assert bottom.sum() <= 2  # the tip
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


@pytest.fixture
def six_sprites(tmp_path, monkeypatch):
    """A tile cache of the first six sprites only (drawn in milliseconds), its file in tmp_path."""
    from cvae.data import render as render_module

    monkeypatch.setattr(render_module, "NUM_SPRITES", 6)
    monkeypatch.setenv("CVAE_TILE_CACHE", str(tmp_path))
    return render_module


def _drawn(render_module, sprite):
    return render_module.sprite_tiles(0, 0, sprite)  # sprites 0..5: square, scale 0, orientation 0..5


def test_sprite_tiles_are_drawn_once_and_shared_through_a_file(six_sprites):
    first = six_sprites._TileCache()
    tiles = first.get(np.array([1]))
    path = six_sprites.tile_cache_file()
    assert path.is_file() and first.ready.all()  # the first user draws them all, for every process
    assert not list(path.parent.glob("*.tmp"))
    later = six_sprites._TileCache()
    drawn = []
    later._draw = lambda sprite: drawn.append(sprite) or six_sprites._TileCache._draw(sprite)
    shared = later.get(np.array([4]))
    assert drawn == [5]  # a process that finds the file draws only the one sprite it checks
    assert isinstance(shared, np.memmap) and not shared.flags.writeable
    for s in range(6):
        assert np.array_equal(shared[s], _drawn(six_sprites, s)) and np.array_equal(tiles[s], shared[s])


def test_a_tile_file_that_does_not_draw_as_we_do_is_drawn_again(six_sprites):
    path = six_sprites.tile_cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    for wrong in (np.zeros((6, 31, 31, 128), np.uint8), np.zeros((2, 3), np.uint8)):
        np.save(path, wrong)
        tiles = six_sprites._TileCache().get(np.array([5]))
        assert np.array_equal(tiles[5], _drawn(six_sprites, 5))
        assert np.array_equal(np.load(path)[5], _drawn(six_sprites, 5))  # and the file is mended


def test_without_a_usable_tile_folder_each_process_draws_its_own(six_sprites, tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_TILE_CACHE", "off")
    assert six_sprites.tile_cache_file() is None
    tiles = six_sprites._TileCache().get(np.array([2]))
    assert np.array_equal(tiles[2], _drawn(six_sprites, 2)) and not list(tmp_path.iterdir())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CVAE_TILE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="sprite tiles not shared through"):
        tiles = six_sprites._TileCache().get(np.array([3]))
    assert np.array_equal(tiles[3], _drawn(six_sprites, 3))


def test_the_tile_file_name_changes_with_the_geometry(monkeypatch):
    from cvae.data import render as render_module

    before = render_module.tile_cache_file()
    square = render_module.SHAPES["square"]
    moved = render_module.ShapeGeometry(square.slope, square.offset, square.threshold + 0.01)
    monkeypatch.setitem(render_module.SHAPES, "square", moved)
    assert render_module.tile_cache_file() != before
