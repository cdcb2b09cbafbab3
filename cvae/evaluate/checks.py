"""The evaluation's two experiments that ask the model again, beyond scoring its answers:
reversibility (a counterfactual of the answer that does the factual values back must
return the factual image) and the model's own composition (the factual image encoded and
decoded k times at its factual classes)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from cvae.data.grid import FACTORS, classes_to_index, index_to_classes
from cvae.data.images import decode_image, encode_pngs, flatten, iou
from cvae.evaluate.metrics import Sums, add_to_groups, group_names, int_columns, row_parts
from cvae.rng import row_keys, seed_from_query_id
from cvae.serve.queries import answer_queries

COMPOSITION_STEPS = (1, 5, 10)  # encode-decode repetitions reported for the model's composition


def model_composition(scm, truth, pool: dict, limit: int) -> dict:
    """The factual image encoded and decoded at its factual classes (most likely pixels),
    k = 1, 5, 10 times: IoU and exact share against the factual image."""
    chosen = sorted(pool.items(), key=lambda kv: kv[1])[:limit]
    out = {"count": len(chosen), "iou": {}, "exact": {}}
    if not chosen:
        return out
    indices = np.array([i for i, _ in chosen], dtype=np.int64)
    keys = row_keys(np.array([k for _, k in chosen], dtype=np.uint64), np.zeros(len(chosen), np.int64))
    classes = index_to_classes(indices, with_color=False)
    factual = truth.images(indices)
    image = factual
    for k in range(1, max(COMPOSITION_STEPS) + 1):
        image = scm.most_likely_reconstruction(image, classes, keys)
        if k in COMPOSITION_STEPS:
            same = (flatten(image) == flatten(factual)).all(1)
            out["iou"][str(k)] = round(float(iou(image, factual).mean()), 6)
            out["exact"][str(k)] = round(float(same.mean()), 6)
    return out


def reversal_queries(table: pa.Table, rows: np.ndarray, cf: np.ndarray, factual: np.ndarray,
                      do: np.ndarray, answer: np.ndarray) -> pa.Table:
    """Counterfactual queries that observe the answer (at the row's own classes `cf`) and do
    the factual values back: of the intervened factors, and of every factor the intervention
    moved (descendants in a causal world), as Monteiro et al. restore all the parents."""
    back = np.where((do[rows] >= 0) | (cf[rows] != factual[rows]), factual[rows], -1)
    ids = [f"reverse:{q}:{s}" for q, s in zip(table["query_id"].to_numpy(zero_copy_only=False)[rows],
                                              table["sample"].to_numpy()[rows])]
    cols = {"query_id": pa.array(ids, pa.string()),
            "kind": pa.array(["counterfactual"] * len(rows), pa.string()),
            "image": pa.array(encode_pngs(answer[rows]), pa.binary())}
    for j, f in enumerate(FACTORS):
        cols[f] = pa.array(cf[rows, j])
    for j, f in enumerate(FACTORS):
        cols[f"do_{f}"] = pa.array(back[:, j], mask=back[:, j] < 0)
    for j, f in enumerate(FACTORS):  # carried for scoring, dropped before answering
        cols[f"_factual_{f}"] = pa.array(factual[rows, j])
    cols["_group"] = pa.array(group_names(do[rows]).tolist(), pa.string())
    cols["_key"] = pa.array([seed_from_query_id(i) for i in ids], pa.uint64())
    return pa.table(cols)


def reversibility(scm, pool: dict, truth, holdout: list, groups: dict, max_samples: int,
                   refused: dict) -> None:
    if not pool:
        return
    table = pa.concat_tables([pool[name] for name in sorted(pool)])
    hidden = [c for c in table.column_names if c.startswith("_")]
    results, errors = answer_queries(scm, table.drop_columns(hidden), max_samples=max_samples)
    if errors.num_rows:  # e.g. a counterfactual world the factor SCM gives probability zero
        refused["count"] += errors.num_rows
        refused["example"] = errors["error"][0].as_py()
    if not results.num_rows:
        return
    order = {q: i for i, q in enumerate(table["query_id"].to_pylist())}
    at = np.array([order[q] for q in results["query_id"].to_pylist()])
    back = np.stack([decode_image(b) for b in results["image"].to_pylist()])
    factual = int_columns(table, [f"_factual_{f}" for f in FACTORS])[at]
    want = truth.images(classes_to_index(factual))
    row_iou = iou(back, want)
    row_exact = (flatten(back) == flatten(want)).all(1)
    names = np.array(table["_group"].to_pylist(), dtype=object)[at]
    cf = int_columns(table, list(FACTORS))[at]

    def accumulate(s: Sums, mask: np.ndarray) -> None:
        s.rev_count += int(mask.sum())
        s.rev_exact += int(row_exact[mask].sum())
        s.rev_iou += float(row_iou[mask].sum())

    add_to_groups(groups, "model", names, row_parts(cf, factual, holdout), accumulate)
