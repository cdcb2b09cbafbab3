"""The dSprites factor grid: names, class counts, values, and index conversions.

The official order is row-major over (color, shape, scale, orientation, posX, posY)
with posY varying fastest, so an official index and a row of class indices are two
spellings of the same image. Every conversion here is vectorised over numpy arrays.
"""
from __future__ import annotations

import numpy as np

# The six official latent columns, in the official order.
LATENTS = ("color", "shape", "scale", "orientation", "pos_x", "pos_y")
LATENT_SIZES = (1, 3, 6, 40, 32, 32)

# The five factors that vary (color is constant): the names used in queries and results.
FACTORS = LATENTS[1:]
FACTOR_SIZES = dict(zip(FACTORS, LATENT_SIZES[1:]))
SHAPE_NAMES = ("square", "ellipse", "heart")

NUM_IMAGES = int(np.prod(LATENT_SIZES))  # 737,280
IMAGE_SIZE = 64

# Strides of the row-major layout: index = sum(classes * STRIDES).
STRIDES = np.array(
    [int(np.prod(LATENT_SIZES[i + 1:])) for i in range(len(LATENT_SIZES))], dtype=np.int64
)

LATENT_VALUES = {
    "color": np.array([1.0]),
    "shape": np.array([1.0, 2.0, 3.0]),
    "scale": np.linspace(0.5, 1.0, 6),
    "orientation": np.linspace(0.0, 2 * np.pi, 40),
    "pos_x": np.linspace(0.0, 1.0, 32),
    "pos_y": np.linspace(0.0, 1.0, 32),
}


def classes_to_index(classes: np.ndarray) -> np.ndarray:
    """(n, 6) latent classes, or (n, 5) factor classes without color, to official indices."""
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim != 2 or classes.shape[1] not in (5, 6):
        raise ValueError(f"classes must have shape (n, 5) or (n, 6), got {classes.shape}")
    sizes = np.array(LATENT_SIZES[-classes.shape[1]:])
    if (classes < 0).any() or (classes >= sizes).any():
        raise ValueError("class index out of range for the dSprites grid")
    return classes @ STRIDES[-classes.shape[1]:]


def index_to_classes(index: np.ndarray, with_color: bool = True) -> np.ndarray:
    """Official indices to (n, 6) latent classes, or (n, 5) factor classes."""
    index = np.asarray(index, dtype=np.int64)
    if (index < 0).any() or (index >= NUM_IMAGES).any():
        raise ValueError(f"official index out of range [0, {NUM_IMAGES})")
    classes = (index[:, None] // STRIDES[None, :]) % np.array(LATENT_SIZES)[None, :]
    return classes if with_color else classes[:, 1:]


def classes_to_values(classes: np.ndarray) -> np.ndarray:
    """(n, 6) latent classes to (n, 6) latent values (float64), as in the official file."""
    classes = np.asarray(classes, dtype=np.int64)
    return np.stack([LATENT_VALUES[name][classes[:, i]] for i, name in enumerate(LATENTS)], axis=1)


def values_to_classes(values: np.ndarray) -> np.ndarray:
    """(n, 6) latent values to the nearest (n, 6) latent classes."""
    values = np.asarray(values, dtype=np.float64)
    return np.stack(
        [np.abs(values[:, i, None] - LATENT_VALUES[name][None, :]).argmin(axis=1)
         for i, name in enumerate(LATENTS)],
        axis=1,
    ).astype(np.int64)


def factor_classes(strides: dict[str, int] | None = None) -> np.ndarray:
    """All (n, 5) factor-class rows of the grid, in official order, optionally thinned.

    `strides` keeps every k-th class of a factor (for example {"orientation": 4}),
    which gives the reduced grids used by local and benchmark configs.
    """
    strides = strides or {}
    unknown = set(strides) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown factor(s) in strides: {sorted(unknown)}")
    axes = [np.arange(0, FACTOR_SIZES[f], int(strides.get(f, 1))) for f in FACTORS]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)


def grid_indices(strides: dict[str, int] | None = None) -> np.ndarray:
    """Official indices of the (optionally thinned) grid, ascending."""
    return classes_to_index(factor_classes(strides))


def rule_mask(classes: np.ndarray, rules: list[dict]) -> np.ndarray:
    """True for (n, 5) factor-class rows that match some rule: a rule maps factor names to
    allowed classes, and a row matches it when every named factor has an allowed class."""
    mask = np.zeros(len(classes), dtype=bool)
    for rule in rules:
        hit = np.ones(len(classes), dtype=bool)
        for name, allowed in rule.items():
            hit &= np.isin(classes[:, FACTORS.index(name)], allowed)
        mask |= hit
    return mask
