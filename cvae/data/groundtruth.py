"""The true image of any official grid index, from the renderer or the official file.

A dataset's manifest says which: rendered and SCM-sampled datasets are drawn by
`cvae.data.render`; imported ones come from the official file, read once on first use.
"""
from __future__ import annotations

import numpy as np

from cvae.data.grid import NUM_IMAGES, index_to_classes
from cvae.data.official import load_official
from cvae.data.render import RENDERER_VERSION, render
from cvae.errors import DataError


class GroundTruth:
    def __init__(self, generator: str = "render", official_path: str | None = None):
        if generator not in ("render", "import"):
            raise ValueError(f"generator must be 'render' or 'import', got {generator!r}")
        if generator == "import" and not official_path:
            raise ValueError("generator 'import' needs official_path")
        self.generator, self.official_path = generator, official_path
        self._imgs: np.ndarray | None = None  # the official file's images, once read
        self._sorted_index: np.ndarray | None = None  # its rows' official indices, sorted
        self._rows: np.ndarray | None = None  # row of each sorted index

    @classmethod
    def from_manifest(cls, manifest: dict) -> GroundTruth:
        generator = manifest.get("generator")
        if generator == "import":
            return cls("import", manifest.get("official_path"))
        if generator in ("render", "scm"):  # scm samples classes; their images are rendered
            drawn_by = manifest.get("renderer", 1)
            if drawn_by != RENDERER_VERSION:
                raise DataError(
                    f"manifest: the dataset was drawn by renderer version {drawn_by}, this cvae "
                    f"draws version {RENDERER_VERSION} (official dSprites geometry), so its "
                    "ground truth differs; prepare the data again and retrain")
            return cls("render")
        raise DataError(f"manifest: unknown generator {generator!r}")

    def _load(self) -> None:
        official = load_official(self.official_path)
        index = official.index
        self._rows = np.argsort(index, kind="stable")
        self._sorted_index = index[self._rows]
        self._imgs = official.imgs

    def indices(self) -> np.ndarray:
        """The official indices this ground truth has an image for, ascending: the whole
        grid when rendered, the file's rows when imported."""
        if self.generator == "render":
            return np.arange(NUM_IMAGES, dtype=np.int64)
        if self._imgs is None:
            self._load()
        return self._sorted_index.copy()

    def images(self, indices: np.ndarray) -> np.ndarray:
        """(n,) official indices -> (n, 64, 64) uint8 0/1 images."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.generator == "render":
            return render(index_to_classes(indices, with_color=False))
        if self._imgs is None:
            self._load()
        if indices.size and (indices.min() < 0 or indices.max() >= NUM_IMAGES):
            raise ValueError(f"official index out of range [0, {NUM_IMAGES})")
        at = np.searchsorted(self._sorted_index, indices)
        at = np.minimum(at, len(self._sorted_index) - 1)
        missing = self._sorted_index[at] != indices if len(self._sorted_index) else np.ones_like(indices, bool)
        if missing.any():
            raise DataError(f"{self.official_path}: has no row for official index "
                            f"{int(indices[missing][0])}")
        return self._imgs[self._rows[at]]

