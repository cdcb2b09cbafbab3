"""A procedural dSprites renderer that draws the official images: square, ellipse and heart
on a binary 64x64 frame.

Geometry, fitted to official frames (`benchmarks/fit_renderer.py`, checked by
`benchmarks/bench_fidelity.py`), in pixel units with pixel (r, c) centred at (c, r):

- position: the shape's centre is at 15.5 + 32/31 * class (pos_x: column, moving right;
  pos_y: row, moving down), so it spans 15.5 .. 47.5 and a step is 32/31 pixel;
- size: each shape is a fixed outline drawn at `size_px = slope * scale + offset`
  (`SHAPES`), so sizes are not proportional to the scale value;
- orientation: the outline turns counter-clockwise on screen about the shape's centre by
  the orientation value; 2π is reduced to 0, so the first and last classes coincide;
- rasterisation: a pixel is on when the outline covers at least `threshold` of its area.

Coverage is exact to 1/961 of a pixel: each (shape, scale, orientation) outline is sampled
once on a grid of 31 x 31 points per pixel. Position centres lie on a 1/31-pixel grid, so
every position is a whole-pixel offset of the tile plus one of 31 x 31 sub-pixel phases,
and the coverage of every pixel at every phase is a box sum of those samples (cumulative
sums, no geometry per image). A sprite's 961 phase tiles (32x32 pixels each, bit-packed)
are drawn once per machine into a file every process maps (`_TileCache`), so rendering
rows of the grid is a gather and a scatter.
"""
from __future__ import annotations

import fcntl
import functools
import getpass
import hashlib
import inspect
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvae.data.grid import FACTOR_SIZES, FACTORS, IMAGE_SIZE, LATENT_VALUES, SHAPE_NAMES

# 2: official geometry (32/31-pixel position steps, fitted sizes and outlines); 1 (manifests
# without a "renderer" field): whole-pixel steps and larger shapes, not dSprites.
RENDERER_VERSION = 2
SUB = 31  # samples per pixel side; position centres step 32/31 px, so phases are k/31 px
PHASES = SUB  # sub-pixel phases per axis: class k sits k/31 px past a whole-pixel offset
TILE = 32  # tile side in pixels: the whole shape at any phase and orientation
ORIGIN = 15.5  # centre of position class 0, in pixel-index units
STEP = 32 / 31  # pixels per position class
NUM_SPRITES = FACTOR_SIZES["shape"] * FACTOR_SIZES["scale"] * FACTOR_SIZES["orientation"]
TILE_BYTES = TILE * TILE // 8


@dataclass(frozen=True)
class ShapeGeometry:
    """One shape's outline and how it is drawn; lengths in pixels at size 1."""
    slope: float  # size_px = slope * scale + offset
    offset: float
    threshold: float  # pixel on when covered by at least this fraction of its area
    params: tuple = ()  # the outline's own parameters (see `_inside`)


# Fitted on the official reference frames by benchmarks/fit_renderer.py; the square and
# ellipse thresholds then set by a scan with this exact renderer (bench_fidelity).
SHAPES = {
    # square: half-side = size_px; upright official squares are 20 * scale pixels wide
    # (10, 16, 18 at 0.5, 0.8, 0.9), edges on pixel borders, so only the threshold is fitted
    "square": ShapeGeometry(10.0, 0.0, 0.91),
    # ellipse: semi-major axis (horizontal at orientation 0) = size_px, semi-minor = ratio * it
    "ellipse": ShapeGeometry(12.5629, 0.2693, 0.5582, (0.5669,)),
    # heart, tip down at orientation 0: a star-shaped outline, its radius (pixels at size 1)
    # at 33 angles from straight up (0) to straight down (π), linear between them, mirrored
    "heart": ShapeGeometry(1.0089, -0.0089, 0.4701, (
        4.567, 6.801, 8.159, 9.226, 9.986, 10.533, 10.959, 11.177, 11.232, 11.244, 10.962,
        10.783, 10.478, 9.849, 9.278, 8.695, 8.073, 7.574, 7.094, 6.734, 6.409, 6.212, 6.019,
        5.904, 5.891, 5.905, 5.948, 6.121, 6.366, 6.68, 7.172, 7.922, 9.127)),
}


# The largest distance from the centre of a shape of size 1.
_RADIUS = {"square": float(np.sqrt(2)), "ellipse": 1.0, "heart": max(SHAPES["heart"].params)}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in a shape of size 1 centred at the origin; (u, v) math axes (v up)."""
    params = SHAPES[shape].params
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "ellipse":
        return u * u + (v / params[0]) ** 2 <= 1
    angle = np.arctan2(np.abs(u), v)  # 0 straight up, π straight down (the tip)
    knots = np.linspace(0, np.pi, len(params))
    return np.hypot(u, v) <= np.interp(angle, knots, params)


def _box_sums(samples: np.ndarray, axis: int, first: int) -> np.ndarray:
    """Per phase p and tile pixel j >= `first`, the sum of `samples` (which start at sample
    31 * first) over pixel j's 31 samples along `axis`; (phase, pixel) replace `axis`."""
    cs = np.cumsum(samples, axis=axis, dtype=np.int16)  # at most 31 * 31 per pixel
    cs = np.concatenate([np.zeros_like(np.take(cs, [0], axis=axis)), cs], axis=axis)
    pixels = (samples.shape[axis] - (SUB - 1)) // SUB
    start = SUB * np.arange(pixels)[None, :] + (SUB - 1) - np.arange(PHASES)[:, None]  # (p, j)
    return np.take(cs, start + SUB, axis=axis) - np.take(cs, start, axis=axis)


def sprite_tiles(shape: int, scale: int, orientation: int) -> np.ndarray:
    """(31, 31, 128) uint8: the bit-packed 32x32 tile of one (shape, scale, orientation) at
    every sub-pixel phase [phase_y, phase_x]; tile pixel (15.5, 15.5) + phase/31 is the centre.

    Pixel j of a tile at phase p covers samples 31 j + 30 - p .. 31 j + 60 - p of an axis
    whose sample i lies (i + 0.5) / 31 - 16 - 30/31 pixels from the centre. Only the pixels
    that the shape's bounding circle can reach are sampled.
    """
    name = SHAPE_NAMES[shape]
    geometry = SHAPES[name]
    size = geometry.slope * LATENT_VALUES["scale"][scale] + geometry.offset
    reach = size * _RADIUS[name] + 1  # bounding circle, plus a pixel
    first = max(0, int(np.floor(TILE / 2 - 1 - reach)))
    last = min(TILE, int(np.ceil(TILE / 2 + 1 + reach)))  # pixels first .. last - 1
    i = np.arange(SUB * first, SUB * last + SUB - 1, dtype=np.float32)
    d = (i + 0.5) / SUB - TILE / 2 - (SUB - 1) / SUB
    angle = np.mod(LATENT_VALUES["orientation"][orientation], 2 * np.pi)  # 2π -> exactly 0
    c, s = np.float32(np.cos(angle) / size), np.float32(np.sin(angle) / size)
    dx, dy = d[None, :], d[:, None]
    # Turning the shape by +angle (counter-clockwise on screen, v up) = sampling it at
    # points turned by -angle.
    inside = _inside(name, c * dx - s * dy, -s * dx - c * dy)
    counts = _box_sums(_box_sums(inside, axis=1, first=first), axis=0, first=first)  # (q, i, p, j)
    on = np.zeros((PHASES, TILE, PHASES, TILE), dtype=bool)
    on[:, first:last, :, first:last] = counts >= np.ceil(geometry.threshold * SUB * SUB)
    return np.packbits(on.transpose(0, 2, 1, 3).reshape(PHASES, PHASES, -1), axis=-1)


class _TileCache:
    """Every sprite's phase tiles: 89 MB for all 720 sprites, drawn in about 7 s of CPU.

    Drawn once per machine and shared through a file (`tile_cache_file`) that every later
    process maps read-only, so query actors, evaluators and data tasks start without
    drawing. Without a usable file (none can be written, or `CVAE_TILE_CACHE=off`) each
    process draws the sprites it needs on first use (about 10 ms each) and keeps them."""

    def __init__(self):
        self.tiles = np.zeros((NUM_SPRITES, PHASES, PHASES, TILE_BYTES), dtype=np.uint8)
        self.ready = np.zeros(NUM_SPRITES, dtype=bool)
        self.lock = threading.Lock()
        self.shared_tried = False

    @staticmethod
    def _draw(sprite: int) -> np.ndarray:
        shape, rest = divmod(int(sprite), FACTOR_SIZES["scale"] * FACTOR_SIZES["orientation"])
        scale, orientation = divmod(rest, FACTOR_SIZES["orientation"])
        return sprite_tiles(shape, scale, orientation)

    def _draw_into(self, tiles: np.ndarray, sprites: np.ndarray) -> None:
        # numpy releases the GIL in the heavy steps, so threads use every core.
        with ThreadPoolExecutor(min(len(sprites), os.cpu_count() or 1)) as pool:
            for s, drawn in zip(sprites, pool.map(self._draw, sprites)):
                tiles[s] = drawn

    def get(self, sprite: np.ndarray) -> np.ndarray:
        missing = np.unique(sprite[~self.ready[sprite]])
        if len(missing):
            with self.lock:
                if not self.shared_tried:
                    self.shared_tried = True
                    self._use_shared_file()
                missing = missing[~self.ready[missing]]
                if len(missing):
                    self._draw_into(self.tiles, missing)
                    self.ready[missing] = True
        return self.tiles

    def _use_shared_file(self) -> None:
        path = tile_cache_file()
        if path is None:
            return
        tiles = self._read(path)
        if tiles is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # one process on the machine draws, the rest wait
                    tiles = self._read(path)
                    if tiles is None:
                        tiles = np.zeros_like(self.tiles)
                        self._draw_into(tiles, np.arange(NUM_SPRITES))
                        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                        with open(partial, "wb") as out:
                            np.save(out, tiles)
                        os.replace(partial, path)  # readers only ever see a whole file
                        tiles = self._read(path)
            except OSError as exc:
                warnings.warn(f"sprite tiles not shared through {path} ({exc}); drawing them in "
                              "this process", stacklevel=3)
                return
        if tiles is not None:
            self.tiles, self.ready[:] = tiles, True

    def _read(self, path) -> np.ndarray | None:
        """The file's tiles, mapped read-only, if the file is whole and draws as we do."""
        try:
            tiles = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if tiles.shape != self.tiles.shape or tiles.dtype != np.uint8:
            return None
        probe = NUM_SPRITES - 1  # a check beyond the key: one sprite drawn again must match
        return tiles if np.array_equal(tiles[probe], self._draw(probe)) else None


def tile_cache_file() -> Path | None:
    """The shared tile file: in the folder $CVAE_TILE_CACHE ("off": none), by default
    $TMPDIR/cvae-<user> (a machine-wide cache, as Ray keeps $TMPDIR/ray). Its name holds a
    hash of the geometry and of the code that draws it, so a renderer change never reads
    old tiles."""
    folder = os.environ.get("CVAE_TILE_CACHE") or str(Path(tempfile.gettempdir()) / f"cvae-{getpass.getuser()}")
    if folder.lower() == "off":
        return None
    code = "".join(inspect.getsource(f) for f in (_inside, _box_sums, sprite_tiles))
    key = hashlib.sha256(repr((RENDERER_VERSION, SUB, TILE, SHAPES, _RADIUS, LATENT_VALUES["scale"].tolist(),
                               LATENT_VALUES["orientation"].tolist(), code)).encode()).hexdigest()[:16]
    return Path(folder) / f"sprite-tiles-{key}.npy"


@functools.lru_cache(maxsize=1)
def _cache() -> _TileCache:
    return _TileCache()


def warm_up() -> None:
    """Have every sprite's tiles now (read from the shared file, or drawn: about 7 s of CPU)
    rather than on first use."""
    _cache().get(np.arange(NUM_SPRITES))


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


def position_offset(position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position classes -> (whole-pixel tile offset, sub-pixel phase in 1/31 px): the centre
    ORIGIN + STEP * k = ORIGIN + offset + phase / 31."""
    phase = position % PHASES
    return position + position // PHASES, phase


_TILE_FLAT = (np.arange(TILE)[:, None] * IMAGE_SIZE + np.arange(TILE)[None, :]).ravel()


def render(classes: np.ndarray) -> np.ndarray:
    """(n, 5) factor classes (shape, scale, orientation, pos_x, pos_y) -> (n, 64, 64) uint8 0/1.

    pos_x moves the shape right (columns), pos_y moves it down (rows).
    """
    classes = check_classes(classes)
    shape, scale, orientation, pos_x, pos_y = classes.T
    sprite = (shape * FACTOR_SIZES["scale"] + scale) * FACTOR_SIZES["orientation"] + orientation
    off_x, phase_x = position_offset(pos_x)
    off_y, phase_y = position_offset(pos_y)
    tiles = np.unpackbits(_cache().get(sprite)[sprite, phase_y, phase_x], axis=-1)
    frames = np.zeros((len(classes), IMAGE_SIZE * IMAGE_SIZE), dtype=np.uint8)
    at = (off_y * IMAGE_SIZE + off_x)[:, None] + _TILE_FLAT[None, :]
    np.put_along_axis(frames, at, tiles, axis=1)
    return frames.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


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
