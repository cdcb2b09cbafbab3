"""PNG figures people would rather look at than read: image grids and loss curves."""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _import_pyplot():
    """Import pyplot without writing to the home directory.

    Matplotlib creates ~/.config/matplotlib and writes its font list to ~/.cache/matplotlib
    when it is imported; jobs write only to the output folders they are given. Unless the
    user chose a folder (MPLCONFIGDIR), the import runs against a temporary one that is
    removed as soon as the import is done (the font list then lives in memory), so no
    process, however it ends, leaves a folder behind.
    """
    if "MPLCONFIGDIR" in os.environ:
        import matplotlib

        matplotlib.use("Agg")  # no screen on cluster nodes
        import matplotlib.pyplot as plt
        return plt
    # A font list built in memory is the point here: its "building the font cache" warning is not one.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="cvae-mpl-") as folder:
        os.environ["MPLCONFIGDIR"] = folder
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        finally:
            del os.environ["MPLCONFIGDIR"]
    return plt


plt = _import_pyplot()


def save_image_grid(
    path: str | Path,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Each entry of `rows` is (n, 64, 64) images drawn left to right; rows may differ in n."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols + 1.2, 1.1 * n_rows + 0.6),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.axis("off")
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_curves(path: str | Path, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
                xlabel: str = "epoch", ylabel: str = "negative ELBO per image (nats)",
                title: str | None = None) -> Path:
    """`curves` maps a label to (x, y) points; one line each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
