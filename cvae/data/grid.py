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


def strided_classes(factor: str, strides: dict | None = None) -> np.ndarray:
    """The classes of `factor` a strided grid keeps: every k-th, k = strides[factor] (all
    of them when the factor is not named)."""
    return np.arange(0, FACTOR_SIZES[factor], int((strides or {}).get(factor, 1)), dtype=np.int64)


def factor_order(edges) -> list[str]:
    """FACTORS in causal order, each after its parents (`edges`: (parent, child) factor
    names), ties in FACTORS' order. Edges with a cycle are a ValueError naming the factors
    that cannot be placed. The config's check and the factor SCM's sampling order alike."""
    parents = {f: {p for p, c in edges if c == f} for f in FACTORS}
    order: list[str] = []
    while len(order) < len(FACTORS):
        ready = [f for f in FACTORS if f not in order and parents[f] <= set(order)]
        if not ready:
            raise ValueError(f"the factor graph has a cycle through {sorted(set(FACTORS) - set(order))}")
        order.append(ready[0])
    return order


def factor_classes(strides: dict[str, int] | None = None) -> np.ndarray:
    """All (n, 5) factor-class rows of the grid, in official order, optionally thinned.

    `strides` keeps every k-th class of a factor (for example {"orientation": 4}),
    which gives the reduced grids used by local and benchmark configs.
    """
    strides = strides or {}
    unknown = set(strides) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown factor(s) in strides: {sorted(unknown)}")
    axes = [strided_classes(f, strides) for f in FACTORS]
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


# --------------------------------------------------------------------------- a model's grid

OFF_GRID = "is not on this model's grid"  # in every refusal's text, so jobs can count them


class ModelGrid:
    """The classes of each factor a model answers: the ones it was trained on (a strided or
    held-out dataset trains on fewer than the whole grid), or more where a measurement showed
    that it answers others right. A checkpoint declares it (`checkpoint.json` "grid");
    queries naming any other class are refused with `refusal`, never answered from a class
    code the model never trained.

    `why` says, per factor that lacks classes, where the restriction comes from (for
    example "data.strides.orientation: 8"), for the refusal's text.
    """

    def __init__(self, classes: dict, why: dict | None = None):
        self.classes = {f: np.unique(np.asarray(classes.get(f, np.arange(FACTOR_SIZES[f])), dtype=np.int64))
                        for f in FACTORS}
        for f, c in self.classes.items():
            if not len(c) or c[0] < 0 or c[-1] >= FACTOR_SIZES[f]:
                raise ValueError(f"grid: {f} classes must be a non-empty subset of 0..{FACTOR_SIZES[f] - 1}")
        self.why = {f: str(w) for f, w in (why or {}).items() if f in FACTORS}
        self._member = {f: np.isin(np.arange(FACTOR_SIZES[f]), c) for f, c in self.classes.items()}

    @classmethod
    def whole(cls) -> ModelGrid:
        return cls({})

    @classmethod
    def of_manifest(cls, manifest: dict) -> ModelGrid:
        """The classes a dataset trains on: its manifest's `train_classes` (counted from the
        training split when the shards were written), else, for manifests from before that,
        the strided grid less the classes that held-out rules remove entirely."""
        strides = {f: int(s) for f, s in ((manifest.get("grid") or {}).get("strides") or {}).items()}
        if manifest.get("train_classes"):
            grid = cls(manifest["train_classes"])
        elif manifest.get("generator") == "scm":
            return cls.whole()  # the SCM's own zero-probability checks cover what it never drew
        else:
            rows = factor_classes(strides)
            rows = rows[~rule_mask(rows, manifest.get("holdout") or [])]
            grid = cls({f: rows[:, i] for i, f in enumerate(FACTORS)})
        for f in FACTORS:
            strided = strided_classes(f, strides)
            reasons = [f"data.strides.{f}: {strides[f]}"] if strides.get(f, 1) > 1 else []
            if len(np.setdiff1d(strided, grid.classes[f])):
                reasons.append("data.holdout" if manifest.get("holdout") else "absent from the training split")
            if reasons:
                grid.why[f] = " and ".join(reasons)
        return grid

    @classmethod
    def from_dict(cls, data: dict) -> ModelGrid:
        return cls(data.get("classes") or {}, data.get("why") or {})

    def to_dict(self) -> dict:
        return {"classes": {f: c.tolist() for f, c in self.classes.items()}, "why": dict(self.why)}

    def is_whole(self, factor: str | None = None) -> bool:
        factors = [factor] if factor else FACTORS
        return all(len(self.classes[f]) == FACTOR_SIZES[f] for f in factors)

    def contains(self, factor: str, values: np.ndarray) -> np.ndarray:
        """(n,) bool: which of the classes `values` (in range) the model answers."""
        return self._member[factor][np.asarray(values, dtype=np.int64)]

    def off(self, classes: np.ndarray, named: np.ndarray | None = None) -> np.ndarray:
        """(n, 5) bool: which of the (n, 5) factor classes are off the grid, counting only
        the cells `named` marks (default: every cell; the others may hold anything, -1 too)."""
        classes = np.asarray(classes, dtype=np.int64)
        named = np.ones(classes.shape, dtype=bool) if named is None else named
        return np.stack([named[:, i] & ~self._member[f][np.where(named[:, i], classes[:, i], 0)]
                         for i, f in enumerate(FACTORS)], axis=1)

    def contains_rows(self, classes: np.ndarray) -> np.ndarray:
        """(n,) bool: which (n, 5) factor-class rows have every factor on the grid."""
        return ~self.off(classes).any(axis=1)

    def indices(self) -> np.ndarray:
        """The official indices of every image on the grid, ascending: the source_index
        values a counterfactual may name."""
        mesh = np.meshgrid(*[self.classes[f] for f in FACTORS], indexing="ij")
        return classes_to_index(np.stack([m.ravel() for m in mesh], axis=1))

    def size(self) -> int:
        return int(np.prod([len(c) for c in self.classes.values()]))

    def describe(self, factor: str) -> str:
        """The factor's classes, short (describe_classes)."""
        return describe_classes(self.classes[factor])

    def refusal(self, name: str, factor: str, value: int) -> str:
        """The error text for a query naming `value` of `factor` as column `name`."""
        why = self.why.get(factor)
        return (f"{name}={value} {OFF_GRID} (trained on {factor} {self.describe(factor)} of "
                f"0..{FACTOR_SIZES[factor] - 1}{': ' + why if why else ''}); ask for one of those, "
                f"or use a model of the whole grid such as the pretrained one (--checkpoint pretrained)")

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelGrid) and all(
            np.array_equal(self.classes[f], other.classes[f]) for f in FACTORS)

    def __repr__(self) -> str:
        if self.is_whole():
            return "ModelGrid(whole grid: 737,280 images)"
        parts = [f"{f} {self.describe(f)}" for f in FACTORS if not self.is_whole(f)]
        return f"ModelGrid({self.size():,} images: {'; '.join(parts)}; other factors whole)"


def describe_classes(classes) -> str:
    """Classes, short: "0, 8, 16, 24, 32", "0, 2, 4, ..., 30 (every 2nd)" or "0, 1, 2, ..., 39"."""
    c = [int(v) for v in classes]
    steps = np.diff(c)
    if len(c) > 6 and len(set(steps.tolist())) == 1:
        every = f" (every {_ordinal(int(steps[0]))})" if steps[0] > 1 else ""
        return f"{c[0]}, {c[1]}, {c[2]}, ..., {c[-1]}{every}"
    return ", ".join(map(str, c)) if c else "no class"


def _ordinal(n: int) -> str:
    return f"{n}{'tsnrhtdd'[(n // 10 % 10 != 1) * (n % 10 < 4) * n % 10::4]}"
