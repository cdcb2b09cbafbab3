"""Counterfactuals of official dSprites frames, scored against official frames.

The 80 reference frames (`cvae.data.fidelity.REFERENCE`) hold pairs that differ in one
factor only (the animation traverses one factor at a time). For each such pair (a, b) the
model is asked the counterfactual of frame a, given as an image with its classes, under
do(factor = b's class); the answer is compared with official frame b. Neither the source
nor the target is a rendered image, so this checks the model against official dSprites,
not against our renderer.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from cvae.data.grid import FACTORS
from cvae.data.images import decode_image, iou
from cvae.serve.queries import answer_queries
from cvae.serve.schema import QUERY_SCHEMA


def one_factor_pairs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(source, target, factor column) for every ordered pair of frames whose classes differ
    in exactly one factor."""
    differ = labels[:, None, :] != labels[None, :, :]
    pairs = []
    for a, b in zip(*np.nonzero(differ.sum(axis=2) == 1)):
        pairs.append((int(a), int(b), int(np.flatnonzero(differ[a, b])[0])))
    return pairs


def official_queries(frames: np.ndarray, labels: np.ndarray, pairs: list[tuple[int, int, int]]) -> pa.Table:
    """The counterfactual query rows of `pairs`: frame a as a raw 0/1 image with its classes."""
    rows = []
    for a, b, j in pairs:
        row = {name: None for name in QUERY_SCHEMA.names}
        row.update({"query_id": f"official-{a}-to-{b}", "kind": "counterfactual", "seed": 0,
                    "image": frames[a].astype(np.uint8).tobytes(),
                    **{f: int(labels[a, i]) for i, f in enumerate(FACTORS)},
                    f"do_{FACTORS[j]}": int(labels[b, j])})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=QUERY_SCHEMA)


def score_official(scm, frames: np.ndarray, labels: np.ndarray) -> dict:
    """Answer every one-factor pair and score each answer against the official target frame:
    IoU and exact frames, overall and per intervened factor; refused rows are counted."""
    pairs = one_factor_pairs(labels)
    results, errors = answer_queries(scm, official_queries(frames, labels, pairs))
    answers = {q: decode_image(png) for q, png in zip(results.column("query_id").to_pylist(),
                                                       results.column("image").to_pylist())}
    per_factor: dict[str, list] = {}
    for a, b, j in pairs:
        answer = answers.get(f"official-{a}-to-{b}")
        if answer is None:
            continue
        score = float(iou(answer[None], frames[b][None])[0])
        per_factor.setdefault(FACTORS[j], []).append((score, bool((answer == frames[b]).all())))

    def summary(scores: list) -> dict:
        values = np.array([s for s, _ in scores])
        return {"pairs": len(scores), "mean_iou": round(float(values.mean()), 4),
                "min_iou": round(float(values.min()), 4), "exact": sum(e for _, e in scores)}

    every = [s for scores in per_factor.values() for s in scores]
    return {"frames": int(len(frames)), "pairs": len(pairs), "refused": int(errors.num_rows),
            "overall": summary(every) if every else None,
            "by_factor": {f: summary(per_factor[f]) for f in FACTORS if f in per_factor}}


def save_official_figure(scm, frames: np.ndarray, labels: np.ndarray, path, per_factor: int = 2):
    """A PNG of `per_factor` pairs per intervened factor (spread over the pairs): the official
    source frame, the model's counterfactual, and the official target frame, one column each."""
    from cvae.figures import save_image_grid  # matplotlib only when a figure is drawn

    pairs = one_factor_pairs(labels)
    shown = []
    for j, _ in enumerate(FACTORS):
        mine = [p for p in pairs if p[2] == j]
        shown += [mine[k * len(mine) // per_factor] for k in range(per_factor) if mine]
    results, _ = answer_queries(scm, official_queries(frames, labels, shown))
    answers = dict(zip(results.column("query_id").to_pylist(), results.column("image").to_pylist()))
    answer_images = [decode_image(answers[f"official-{a}-to-{b}"]) for a, b, _ in shown]
    return save_image_grid(path, [frames[[a for a, _, _ in shown]], np.stack(answer_images),
                                  frames[[b for _, b, _ in shown]]],
                           row_labels=["official", "answer", "official\ntarget"],
                           col_labels=[f"do({FACTORS[j]}={labels[b, j]})" for _, b, j in shown],
                           title="counterfactuals of official dSprites frames (pretrained model)")
