"""A procedural dSprites renderer: square, ellipse and heart on a binary 64x64 frame.

Each (shape, scale, orientation) is rasterised once into a 33x33 sprite (720 sprites):
a pixel is on when its centre lies in the exact shape, which keeps squares' corners crisp.
A position is an integer pixel offset of that sprite (32 offsets = 32 one-pixel steps),
so rendering any rows of the grid is a gather of 64x64 windows from padded sprites:
no geometry per image, and every posX / posY step moves the shape by exactly one pixel.

Geometry, in pixels: a shape rotates about its centre, which sits at pixel 16 of its
sprite; its circumradius about that centre is 15.5 * scale, so it stays inside the sprite
(and the frame) at every orientation. Orientation 2π is reduced to 0, so the first and
last orientation classes give identical images, as in the official data.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cvae.grid import FACTOR_SIZES, FACTORS, IMAGE_SIZE, LATENT_VALUES, SHAPE_NAMES

SPRITE = 33  # sprite side: 31 one-pixel steps + 33 = 64, so every offset stays in frame
CENTRE = 16  # the rotation centre inside a sprite (a pixel centre)
RADIUS = 15.5  # circumradius at scale 1, in pixels: the sprite's border pixels stay empty
ELLIPSE_MINOR = 0.55  # ellipse semi-minor axis relative to its semi-major axis
NUM_OFFSETS = IMAGE_SIZE - SPRITE + 1  # 32 = FACTOR_SIZES["pos_x"] = FACTOR_SIZES["pos_y"]
PAD = NUM_OFFSETS - 1
assert NUM_OFFSETS == FACTOR_SIZES["pos_x"] == FACTOR_SIZES["pos_y"]


@functools.lru_cache(maxsize=1)
def _heart_frame() -> tuple[float, float]:
    """Centre (bounding-box middle, y) and circumradius of the implicit heart, so it can
    be shifted to rotate about its middle and scaled to unit circumradius."""
    t = np.linspace(-1.5, 1.5, 1201)
    u, v = np.meshgrid(t, t, indexing="xy")
    inside = (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    vs = v[inside]
    centre_v = 0.5 * (vs.min() + vs.max())
    radius = np.sqrt(u[inside] ** 2 + (v[inside] - centre_v) ** 2).max()
    return float(centre_v), float(radius)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in a unit-circumradius shape centred at the origin; (u, v) math axes (v up)."""
    if shape == 0:  # square: half-side 1/sqrt(2)
        h = 1 / np.sqrt(2)
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == 1:  # ellipse, major axis horizontal at orientation 0
        return u**2 + (v / ELLIPSE_MINOR) ** 2 <= 1
    # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, tip down, shifted to its middle, unit radius
    centre_v, radius = _heart_frame()
    x, y = u * radius, v * radius + centre_v
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


@functools.lru_cache(maxsize=1)
def sprites() -> np.ndarray:
    """(3, 6, 40, 33, 33) uint8 0/1: every (shape, scale, orientation) drawn once."""
    # Pixel centres relative to the sprite's centre, in pixels (x right, y down).
    coords = np.arange(SPRITE, dtype=np.float64) - CENTRE
    dy, dx = np.meshgrid(coords, coords, indexing="ij")
    u0, v0 = dx, -dy  # math axes: v points up, so positive angles turn counter-clockwise
    scales = LATENT_VALUES["scale"]
    angles = np.mod(LATENT_VALUES["orientation"], 2 * np.pi)  # 2π -> exactly 0
    out = np.zeros((3, len(scales), len(angles), SPRITE, SPRITE), dtype=np.uint8)
    for o, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        # Rotating the shape by +angle = sampling it at points rotated by -angle.
        u, v = c * u0 + s * v0, -s * u0 + c * v0
        for k, scale in enumerate(scales):
            r = RADIUS * scale
            for shape in range(3):
                out[shape, k, o] = _inside(shape, u / r, v / r)
    return out


@functools.lru_cache(maxsize=1)
def _windows() -> np.ndarray:
    """A view (720, 32, 32, 64, 64): the frame of sprite s at offset (y, x) is
    [s, PAD - y, PAD - x], a window of the sprite padded by 31 pixels on each side."""
    flat = sprites().reshape(-1, SPRITE, SPRITE)
    size = IMAGE_SIZE + PAD
    padded = np.zeros((flat.shape[0], size, size), dtype=np.uint8)
    padded[:, PAD:PAD + SPRITE, PAD:PAD + SPRITE] = flat
    return sliding_window_view(padded, (IMAGE_SIZE, IMAGE_SIZE), axis=(1, 2))


def check_classes(classes: np.ndarray) -> np.ndarray:
    """(n, 5) factor classes as int64, or a ValueError naming what is wrong."""
    classes = np.asarray(classes)
    if classes.ndim != 2 or classes.shape[1] != len(FACTORS):
        raise ValueError(f"classes must have shape (n, {len(FACTORS)}) "
                         f"({', '.join(FACTORS)}), got {classes.shape}")
    if classes.size and not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be integers, got dtype {classes.dtype}")
    classes = classes.astype(np.int64, copy=False)
    for i, name in enumerate(FACTORS):
        col = classes[:, i]
        if col.size and (col.min() < 0 or col.max() >= FACTOR_SIZES[name]):
            raise ValueError(f"{name} classes must be in [0, {FACTOR_SIZES[name]}), "
                             f"got values in [{col.min()}, {col.max()}]")
    return classes


def render(classes: np.ndarray) -> np.ndarray:
    """(n, 5) factor classes (shape, scale, orientation, pos_x, pos_y) -> (n, 64, 64) uint8 0/1.

    pos_x moves the shape right (columns), pos_y moves it down (rows).
    """
    classes = check_classes(classes)
    shape, scale, orientation, pos_x, pos_y = classes.T
    sprite = (shape * FACTOR_SIZES["scale"] + scale) * FACTOR_SIZES["orientation"] + orientation
    return _windows()[sprite, PAD - pos_y, PAD - pos_x]


def count_duplicates(classes: np.ndarray, batch: int = 16384) -> dict:
    """Render `classes` in batches and count images equal to an earlier one (by blake2b).

    Returns {"images", "distinct", "duplicates"}: duplicates = images - distinct.
    """
    classes = check_classes(classes)
    seen: set[bytes] = set()
    for start in range(0, len(classes), batch):
        images = np.ascontiguousarray(render(classes[start:start + batch]))
        for row in images.reshape(len(images), -1):
            seen.add(hashlib.blake2b(row.data, digest_size=16).digest())
    return {"images": len(classes), "distinct": len(seen), "duplicates": len(classes) - len(seen)}


def contact_sheet(path: str | Path, orientations: tuple = (0, 3, 6, 10, 13, 20, 26, 39),
                  positions: tuple = ((0, 0), (31, 0), (0, 31), (31, 31))) -> Path:
    """A PNG: one row per (shape, scale); columns are orientations at the centre position,
    then the shape at orientation 0 in the four corner positions (pos_x, pos_y)."""
    from cvae.figures import save_image_grid  # matplotlib only when a figure is drawn

    rows, labels = [], []
    for shape in range(3):
        for scale in range(FACTOR_SIZES["scale"]):
            classes = [(shape, scale, o, 16, 16) for o in orientations]
            classes += [(shape, scale, 0, x, y) for x, y in positions]
            rows.append(render(np.array(classes)))
            labels.append(f"{SHAPE_NAMES[shape]} s{scale}")
    cols = [f"or {o}" for o in orientations] + [f"x{x} y{y}" for x, y in positions]
    return save_image_grid(path, rows, row_labels=labels, col_labels=cols)
