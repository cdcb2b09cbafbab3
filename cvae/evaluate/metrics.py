"""The evaluation's metrics: per-row scores of an answer set against the true images and
their read-back classes (`score`), the running sums they reduce into per group (`Sums`),
and the groups and parts a row counts in (its intervened factors; all, held-out, unseen or
trained classes, each scale). What each metric means: cvae.evaluate.scores and docs/bulk.md."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvae.data.grid import FACTOR_SIZES, FACTORS
from cvae.data.images import flatten, iou, pixel_error
from cvae.data.shards import holdout_mask

CONTROLS = ("factual", "blank", "random")  # answer sets that know nothing, beside the model's


def descendants(edges: list) -> np.ndarray:
    """(5, 5) bool: [j, k] when FACTORS[k] is a descendant of FACTORS[j] in the DAG `edges`."""
    reach = np.zeros((len(FACTORS), len(FACTORS)), dtype=bool)
    for parent, child in edges:
        reach[FACTORS.index(parent), FACTORS.index(child)] = True
    for _ in FACTORS:  # transitive closure: paths are at most 4 edges long
        reach |= (reach.astype(int) @ reach.astype(int)) > 0
    return reach


@dataclass
class Scores:
    """Per-row scores of one answer set against n result rows."""
    iou: np.ndarray  # (n,) against the true counterfactual
    pixel_error: np.ndarray
    exact: np.ndarray
    effect: np.ndarray  # (n, 5) bool, the asked value read back (False where not intervened)
    preserve: np.ndarray  # (n, 5) bool, the factual value read back (False where not preserved)
    follow: np.ndarray  # (n, 5) bool, a descendant reads back as its true counterfactual value
    read_nothing: np.ndarray  # (n,) bool


def score(answer: np.ndarray, true_cf: np.ndarray, do: np.ndarray, factual: np.ndarray,
          preserved: np.ndarray, readback, downstream: np.ndarray | None = None,
          cf_classes: np.ndarray | None = None) -> Scores:
    """Scores of (n, 64, 64) answers; `preserved` (n, 5) bool marks the factors that must keep
    their factual value, `downstream` (n, 5) bool the descendants of an intervened factor,
    which must read back as their true counterfactual classes `cf_classes` (n, 5);
    `readback` is the answers' `cvae.data.readout.ReadBack`."""
    flat, want = flatten(answer), flatten(true_cf)
    if downstream is None:
        downstream, cf_classes = np.zeros_like(preserved), factual
    return Scores(iou=iou(answer, true_cf), pixel_error=pixel_error(answer, true_cf),
                  exact=(flat == want).all(1), effect=readback.hits(do),
                  preserve=readback.hits(np.where(preserved, factual, -1)),
                  follow=readback.hits(np.where(downstream, cf_classes, -1)),
                  read_nothing=~readback.reads.any((1, 2)))


@dataclass
class Sums:
    """Running sums of one group's metrics."""
    count: int = 0
    iou: float = 0.0
    pixel_error: float = 0.0
    exact: int = 0
    effective: int = 0
    preserved: int = 0
    preserve_rows: int = 0  # rows with at least one factor to preserve
    read_nothing: int = 0
    effect_by_factor: dict = field(default_factory=dict)  # factor -> [hits, tries]
    preserve_by_factor: dict = field(default_factory=dict)
    followed: int = 0
    follow_rows: int = 0  # rows with at least one descendant of an intervened factor
    follow_by_factor: dict = field(default_factory=dict)
    rev_count: int = 0
    rev_exact: int = 0
    rev_iou: float = 0.0

    def add(self, s: Scores, mask: np.ndarray, do: np.ndarray, preserved: np.ndarray,
            downstream: np.ndarray) -> None:
        self.count += int(mask.sum())
        self.iou += float(s.iou[mask].sum())
        self.pixel_error += float(s.pixel_error[mask].sum())
        self.exact += int(s.exact[mask].sum())
        asked, kept = do[mask] >= 0, preserved[mask]
        self.effective += int((s.effect[mask] | ~asked).all(1).sum())
        self.preserved += int(((s.preserve[mask] | ~kept).all(1) & kept.any(1)).sum())
        self.preserve_rows += int(kept.any(1).sum())
        self.read_nothing += int(s.read_nothing[mask].sum())
        below = downstream[mask]
        self.followed += int(((s.follow[mask] | ~below).all(1) & below.any(1)).sum())
        self.follow_rows += int(below.any(1).sum())
        for j, f in enumerate(FACTORS):
            for table, hit, tried in ((self.effect_by_factor, s.effect[mask, j], asked[:, j]),
                                      (self.preserve_by_factor, s.preserve[mask, j], kept[:, j]),
                                      (self.follow_by_factor, s.follow[mask, j], below[:, j])):
                if tried.any():
                    h = table.setdefault(f, [0, 0])
                    h[0] += int(hit[tried].sum())
                    h[1] += int(tried.sum())

    def summary(self) -> dict:
        def mean(total, n):
            return None if n == 0 else round(float(total) / n, 6)

        def by_factor(table):
            return {f: mean(*table[f]) for f in FACTORS if f in table}

        return {
            "count": self.count,
            "iou": mean(self.iou, self.count),
            "pixel_error": mean(self.pixel_error, self.count),
            "exact": mean(self.exact, self.count),
            "effectiveness": mean(self.effective, self.count),
            "effectiveness_by_factor": by_factor(self.effect_by_factor),
            "preservation": mean(self.preserved, self.preserve_rows),
            "preservation_by_factor": by_factor(self.preserve_by_factor),
            "descendants": mean(self.followed, self.follow_rows),
            "descendants_by_factor": by_factor(self.follow_by_factor),
            "read_nothing": mean(self.read_nothing, self.count),
            "reversibility": {"count": self.rev_count, "exact": mean(self.rev_exact, self.rev_count),
                              "iou": mean(self.rev_iou, self.rev_count)},
        }


def int_columns(table: pa.Table, names: list[str]) -> np.ndarray:
    return np.stack([pc.fill_null(table[n], -1).to_numpy() for n in names], axis=1).astype(np.int64)


def group_names(do: np.ndarray) -> np.ndarray:
    """'shape', or 'scale+shape'-style names (factor order) for joint interventions."""
    names = np.full(len(do), "", dtype=object)
    for j, f in enumerate(FACTORS):
        on = do[:, j] >= 0
        names[on] = np.where(names[on] == "", f, names[on] + "+" + f)
    return names


def row_parts(classes_cf: np.ndarray, factual: np.ndarray, holdout: list, trained=None) -> dict[str, np.ndarray]:
    """The row subsets each group is also scored on: all rows; held-out combinations and the
    rest; counterfactuals with a class the training split lacks ("unseen": a model that
    answers more than its training grid, cvae.model.coverage) and the rest ("trained"); and
    each scale of the true counterfactual image ("scale=k": small shapes are where a model
    misses most, so the report breaks quality down by the scale it had to draw)."""
    parts = {"all": np.ones(len(classes_cf), dtype=bool)}
    if trained is not None:
        unseen = trained.off(classes_cf).any(1) | trained.off(factual).any(1)
        parts.update({"unseen": unseen, "trained": ~unseen})
    if holdout:
        held = holdout_mask(classes_cf, holdout) | holdout_mask(factual, holdout)
        parts.update({"holdout": held, "seen": ~held})
    scale = classes_cf[:, FACTORS.index("scale")]
    parts.update({f"scale={k}": scale == k for k in range(FACTOR_SIZES["scale"])})
    return parts


def add_to_groups(groups: dict, answers: str, names: np.ndarray, parts: dict, fn) -> None:
    """Call fn(sums, mask) for every (group, part), for ('overall', part) over the intervened
    rows and for ('null', part) over the null rows (named 'null:<factor>')."""
    null = np.array([n.startswith("null:") for n in names], dtype=bool)
    for part, pmask in parts.items():
        masks = [("overall", pmask & ~null), ("null", pmask & null)]
        masks += [(name, pmask & (names == name)) for name in sorted(set(names[pmask]))]
        for name, mask in masks:
            if mask.any():
                fn(groups.setdefault((answers, name, part), Sums()), mask)
