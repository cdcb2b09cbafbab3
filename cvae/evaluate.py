"""Counterfactual answers measured against exact ground truth.

dSprites holds every factor combination, so each counterfactual result row has a true
image: the image of the row's own factor columns (the counterfactual world the factor
SCM computed with the abducted noise; under the default SCM, the factual factors with
the intervened one replaced). Per intervened factor (and joint intervention) and overall:

- iou, pixel_error, exact: the answer against the true counterfactual image;
- effectiveness: the intervened factor read back from the answer by nearest ground-truth
  match along that factor's axis (the other factors held at the counterfactual's). A tie
  with the do value counts as read back, since some classes draw the same image (the
  square every 90 degrees, orientation 0 and 2*pi);
- composition: a null intervention (do equal to the factual value) must return the factual
  image exactly;
- reversibility: a counterfactual of the answer (its image and factors as the factual
  observation) that does the factual values back must return the factual image; run
  in-process with `answer_queries` on the checkpoint's SCM, on a seeded sample of up to
  `reversibility_samples` rows per group;
- the same split into rows that touch held-out factor combinations (their source or their
  counterfactual lies in the manifest's holdout rules) and rows that do not.

Results are read a batch at a time and reduced into sums, so memory does not grow with
the number of results. The intervention of each row comes from the query set (joined on
query_id): the result schema carries the counterfactual and factual worlds, not the do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cvae import fs
from cvae.grid import FACTOR_SIZES, FACTORS, classes_to_index
from cvae.images import decode_image, encode_pngs
from cvae.scm import seed_from_query_id

BATCH_ROWS = 2048
EFFECT_CHUNK = 256  # rows whose candidate images are compared at once (bounded memory)


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated: missing files, or results that match no queries."""


# ----------------------------------------------------------------------------- metrics

def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image intersection over union of (n, 64, 64) binary images; 1 when both are empty."""
    a, b = a.reshape(len(a), -1).astype(bool), b.reshape(len(b), -1).astype(bool)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def pixel_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image fraction of pixels that differ."""
    return (a.reshape(len(a), -1) != b.reshape(len(b), -1)).mean(1)


def read_back(images: np.ndarray, classes: np.ndarray, factor: str, ground_truth) -> np.ndarray:
    """(n, size) bool: which classes of `factor` are nearest to each image.

    The candidates are the true images of `classes` with `factor` set to each of its
    classes; nearest is the smallest number of differing pixels (ties all marked).
    """
    col, size = FACTORS.index(factor), FACTOR_SIZES[factor]
    out = np.zeros((len(images), size), dtype=bool)
    flat = images.reshape(len(images), -1).astype(np.uint8)
    for start in range(0, len(images), EFFECT_CHUNK):
        c = classes[start:start + EFFECT_CHUNK]
        cand = np.repeat(c, size, axis=0)
        cand[:, col] = np.tile(np.arange(size), len(c))
        truth = ground_truth.images(classes_to_index(cand)).reshape(len(c), size, -1)
        dist = (truth != flat[start:start + EFFECT_CHUNK, None, :]).sum(-1)
        out[start:start + len(c)] = dist == dist.min(axis=1, keepdims=True)
    return out


@dataclass
class Sums:
    """Running sums of one group's metrics."""
    count: int = 0
    iou: float = 0.0
    pixel_error: float = 0.0
    exact: int = 0
    effective: int = 0
    effect_by_factor: dict = field(default_factory=dict)  # factor -> [hits, tries]
    null_count: int = 0
    null_exact: int = 0
    null_pixel_error: float = 0.0
    rev_count: int = 0
    rev_exact: int = 0
    rev_iou: float = 0.0

    def summary(self) -> dict:
        def mean(total, n):
            return None if n == 0 else round(float(total) / n, 6)

        return {
            "count": self.count,
            "iou": mean(self.iou, self.count),
            "pixel_error": mean(self.pixel_error, self.count),
            "exact": mean(self.exact, self.count),
            "effectiveness": mean(self.effective, self.count),
            "effectiveness_by_factor": {f: mean(h, n) for f, (h, n) in sorted(self.effect_by_factor.items())},
            "composition": {"count": self.null_count, "exact": mean(self.null_exact, self.null_count),
                            "pixel_error": mean(self.null_pixel_error, self.null_count)},
            "reversibility": {"count": self.rev_count, "exact": mean(self.rev_exact, self.rev_count),
                              "iou": mean(self.rev_iou, self.rev_count)},
        }


# ----------------------------------------------------------------------------- inputs

def _parquet_files(folder: Path) -> list[Path]:
    """Parquet files under a folder, skipping hidden, staging and marker files ('.', '_')."""
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*.parquet")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))


def _results_files(results: Path) -> list[Path]:
    """The engine's output folder (results/ beside errors/ and _SUCCESS.json) or a bare folder."""
    from cvae.engine import SUCCESS

    if (results / "results").is_dir():
        if not (results / SUCCESS).is_file():
            raise EvaluationError(f"{results}: the query run did not commit ({SUCCESS} missing)")
        results = results / "results"
    files = _parquet_files(results)
    if not files:
        raise EvaluationError(f"{results}: no result Parquet files")
    return files


def _interventions(queries: Path) -> pa.Table:
    """query_id and do_* of every query (the only columns the evaluation needs)."""
    files = _parquet_files(queries)
    if not files:
        raise EvaluationError(f"{queries}: no query Parquet files")
    dataset = pads.dataset([str(f) for f in files], format="parquet")
    missing = [c for c in ["query_id"] + [f"do_{f}" for f in FACTORS] if c not in dataset.schema.names]
    columns = [c for c in ["query_id"] + [f"do_{f}" for f in FACTORS] if c in dataset.schema.names]
    table = dataset.to_table(columns=columns)
    for c in missing:  # a query file may leave out do columns it never uses
        if c == "query_id":
            raise EvaluationError(f"{queries}: the queries have no query_id column")
        table = table.append_column(c, pa.nulls(table.num_rows, pa.int64()))
    return table.cast(pa.schema([("query_id", pa.string())] + [(f"do_{f}", pa.int64()) for f in FACTORS]))


def _batches(files: list[Path], interventions: pa.Table) -> Iterator[pa.Table]:
    """Counterfactual result rows with their do_* columns, BATCH_ROWS at a time.

    Per file, the query set is first cut down to that file's query_ids (a semi join that
    hashes the file's ids and scans the queries once), so each batch then joins a small
    table: the cost grows with queries x files, not queries x batches.
    """
    for path in files:
        parquet = pq.ParquetFile(path)
        ids = parquet.read(columns=["query_id"])["query_id"].unique()
        wanted = interventions.join(pa.table({"query_id": ids}), keys="query_id", join_type="left semi")
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.equal(table["kind"], "counterfactual"))
            if table.num_rows:
                # Arrow's hash join keeps the order of neither side: restore the results' order.
                table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
                joined = table.join(wanted, keys="query_id", join_type="left outer")
                yield joined.sort_by("_row")


def _ints(table: pa.Table, names: list[str]) -> np.ndarray:
    return np.stack([pc.fill_null(table[n], -1).to_numpy() for n in names], axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- evaluation

def evaluate(results: str | Path, checkpoint: str | Path, out_dir: str | Path, queries: str | Path,
             data_dir: str | Path | None = None, figures_per_factor: int = 8,
             reversibility_samples: int = 256, max_samples: int = 64) -> dict:
    """Evaluate the counterfactual results in `results` against ground truth; writes
    report.json, report.md and figures/*.png under `out_dir` (paths or URIs) and returns
    the report."""
    from cvae.checkpoint import load_meta
    from cvae.groundtruth import GroundTruth
    from cvae.scm import ImageSCM

    with fs.staged(results) as results_local, fs.staged(queries) as queries_local, \
            fs.staged(checkpoint) as ckpt_local, fs.local_output(out_dir) as out_local:
        meta = load_meta(ckpt_local)
        manifest = meta.get("manifest")
        if data_dir is not None:
            from cvae.shards import MANIFEST, read_manifest

            with fs.staged(data_dir, only=[MANIFEST]) as data_local:
                manifest = read_manifest(data_local)
        if not manifest:
            raise EvaluationError(f"{checkpoint}: the checkpoint has no data manifest; give --data")
        truth = GroundTruth.from_manifest(manifest)
        holdout = manifest.get("holdout") or []
        scm = ImageSCM.from_checkpoint(ckpt_local)
        scm.ground_truth = truth

        files = _results_files(Path(results_local))
        interventions = _interventions(Path(queries_local))
        groups: dict[tuple[str, str], Sums] = {}
        figures: dict[str, list] = {}
        rev_pool: dict[str, pa.Table] = {}  # per group: the reversal queries kept so far
        seen_rows = unmatched = 0
        for table in _batches(files, interventions):
            seen_rows += table.num_rows
            unmatched += _evaluate_batch(table, truth, holdout, groups, figures, figures_per_factor,
                                         rev_pool, reversibility_samples)
        if seen_rows == 0:
            raise EvaluationError(f"{results}: no counterfactual result rows")
        if unmatched == seen_rows:
            raise EvaluationError(f"{results}: no result row matches a query_id of {queries}")
        refused = {"count": 0, "example": None}
        _reversibility(scm, rev_pool, truth, holdout, groups, max_samples, refused)

        report = _report(groups, holdout, seen_rows, unmatched, results, checkpoint, queries)
        report["reversal_queries_refused"] = refused
        report["figures"] = _save_figures(out_local, figures)
        fs.write_text_atomic(out_local / "report.md", markdown(report))
        fs.write_text_atomic(out_local / "report.json", json.dumps(report, indent=2))  # last
    return report


def _group_names(do: np.ndarray) -> np.ndarray:
    """'shape', or 'scale+shape'-style names (factor order) for joint interventions."""
    names = np.full(len(do), "", dtype=object)
    for j, f in enumerate(FACTORS):
        on = do[:, j] >= 0
        names[on] = np.where(names[on] == "", f, names[on] + "+" + f)
    return names


def _parts(classes_cf: np.ndarray, factual: np.ndarray, holdout: list) -> dict[str, np.ndarray]:
    from cvae.shards import holdout_mask

    if not holdout:
        return {"all": np.ones(len(classes_cf), dtype=bool)}
    held = holdout_mask(classes_cf, holdout) | holdout_mask(factual, holdout)
    return {"all": np.ones(len(held), dtype=bool), "holdout": held, "seen": ~held}


def _add(groups: dict, names: np.ndarray, parts: dict, fn) -> None:
    """Call fn(sums, mask) for every (group, part) and for ('overall', part)."""
    for part, pmask in parts.items():
        for name in ["overall"] + sorted(set(names)):
            mask = pmask & (names == name) if name != "overall" else pmask
            if mask.any():
                fn(groups.setdefault((name, part), Sums()), mask)


def _evaluate_batch(table: pa.Table, truth, holdout: list, groups: dict, figures: dict,
                    figures_per_factor: int, rev_pool: dict, rev_limit: int) -> int:
    do = _ints(table, [f"do_{f}" for f in FACTORS])
    # A row without a matching query (or a query without any do) cannot be grouped: skip it.
    keep = (do >= 0).any(1)
    unmatched = int((~keep).sum())
    if not keep.any():
        return unmatched
    table, do = table.filter(pa.array(keep)), do[keep]
    cf = _ints(table, list(FACTORS))
    factual = _ints(table, [f"factual_{f}" for f in FACTORS])
    answer = np.stack([decode_image(b) for b in table["image"].to_pylist()])
    true_cf = truth.images(classes_to_index(cf))
    true_factual = truth.images(classes_to_index(factual))
    names = _group_names(do)
    parts = _parts(cf, factual, holdout)

    row_iou, row_err = iou(answer, true_cf), pixel_error(answer, true_cf)
    row_exact = (answer.reshape(len(answer), -1) == true_cf.reshape(len(true_cf), -1)).all(1)
    # Effectiveness per intervened factor; a row is effective when every one reads back.
    effect = {}
    for j, f in enumerate(FACTORS):
        rows = np.flatnonzero(do[:, j] >= 0)
        if len(rows):
            nearest = read_back(answer[rows], cf[rows], f, truth)
            effect[f] = (rows, nearest[np.arange(len(rows)), do[rows, j]])
    row_effective = np.ones(len(do), dtype=bool)
    for rows, hit in effect.values():
        row_effective[rows] &= hit
    null = ((do < 0) | (do == factual)).all(1)
    null_exact = (answer.reshape(len(answer), -1) == true_factual.reshape(len(answer), -1)).all(1)
    null_err = pixel_error(answer, true_factual)

    def accumulate(s: Sums, mask: np.ndarray) -> None:
        s.count += int(mask.sum())
        s.iou += float(row_iou[mask].sum())
        s.pixel_error += float(row_err[mask].sum())
        s.exact += int(row_exact[mask].sum())
        s.effective += int(row_effective[mask].sum())
        for f, (rows, hit) in effect.items():
            m = mask[rows]
            h = s.effect_by_factor.setdefault(f, [0, 0])
            h[0] += int(hit[m].sum())
            h[1] += int(m.sum())
        nm = mask & null
        s.null_count += int(nm.sum())
        s.null_exact += int(null_exact[nm].sum())
        s.null_pixel_error += float(null_err[nm].sum())

    _add(groups, names, parts, accumulate)

    # Figures: the first sample of the first queries of each group.
    first_sample = table["sample"].to_numpy() == 0
    for i in np.flatnonzero(first_sample):
        shown = figures.setdefault(names[i], [])
        if len(shown) < figures_per_factor:
            label = ",".join(f"{f}={do[i, j]}" for j, f in enumerate(FACTORS) if do[i, j] >= 0)
            shown.append((true_factual[i], answer[i], true_cf[i], label))

    # Reversibility sample: per group, the rows with the smallest hash of (query_id, sample),
    # a seeded uniform sample that does not depend on file or row order.
    rows = np.flatnonzero(~null)
    if rev_limit and len(rows):
        fresh = _reversal_queries(table, rows, cf, factual, do, answer)
        for name in set(names[rows]):
            mine = fresh.filter(pc.equal(fresh["_group"], name))
            pool = pa.concat_tables([rev_pool[name], mine]) if name in rev_pool else mine
            rev_pool[name] = pool.sort_by("_key").slice(0, rev_limit)
    return unmatched


def _reversal_queries(table: pa.Table, rows: np.ndarray, cf: np.ndarray, factual: np.ndarray,
                      do: np.ndarray, answer: np.ndarray) -> pa.Table:
    """Counterfactual queries that observe the answer and do the factual values back."""
    back = np.where(do[rows] >= 0, factual[rows], -1)
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
    cols["_group"] = pa.array(_group_names(do[rows]).tolist(), pa.string())
    cols["_key"] = pa.array([seed_from_query_id(i) for i in ids], pa.uint64())
    return pa.table(cols)


def _reversibility(scm, pool: dict, truth, holdout: list, groups: dict, max_samples: int,
                   refused: dict) -> None:
    from cvae.queries import answer_queries

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
    factual = _ints(table, [f"_factual_{f}" for f in FACTORS])[at]
    want = truth.images(classes_to_index(factual))
    row_iou = iou(back, want)
    row_exact = (back.reshape(len(back), -1) == want.reshape(len(want), -1)).all(1)
    names = np.array(table["_group"].to_pylist(), dtype=object)[at]
    cf = _ints(table, list(FACTORS))[at]

    def accumulate(s: Sums, mask: np.ndarray) -> None:
        s.rev_count += int(mask.sum())
        s.rev_exact += int(row_exact[mask].sum())
        s.rev_iou += float(row_iou[mask].sum())

    _add(groups, names, _parts(cf, factual, holdout), accumulate)


# ----------------------------------------------------------------------------- outputs

def _report(groups: dict, holdout: list, rows: int, unmatched: int, results, checkpoint, queries) -> dict:
    names = sorted({g for g, _ in groups if g != "overall"}, key=lambda g: (g.count("+"), FACTORS.index(g.split("+")[0])))
    report = {
        "results": str(results), "checkpoint": str(checkpoint), "queries": str(queries),
        "rows": rows, "rows_without_intervention": unmatched,
        "overall": groups[("overall", "all")].summary(),
        "by_factor": {g: groups[(g, "all")].summary() for g in names},
        "holdout_rules": holdout,
    }
    if holdout:
        report["holdout"] = {part: {"overall": groups[("overall", part)].summary() if ("overall", part) in groups else None,
                                    "by_factor": {g: groups[(g, part)].summary() for g in names if (g, part) in groups}}
                             for part in ("holdout", "seen")}
    return report


def _save_figures(out: Path, figures: dict) -> list[str]:
    from cvae.figures import save_image_grid

    written = []
    for name, shown in sorted(figures.items()):
        if not shown:
            continue
        path = out / "figures" / f"counterfactuals_{name.replace('+', '_')}.png"
        save_image_grid(path, [np.stack([s[k] for s in shown]) for k in range(3)],
                        row_labels=["factual", "counterfactual", "ground truth"],
                        col_labels=[s[3] for s in shown], title=f"do({name}): answer vs ground truth")
        written.append(str(path.relative_to(out)))
    return written


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as a markdown summary table (plus one for held-out combinations)."""
    def table(rows: dict) -> list[str]:
        lines = ["| intervened | rows | IoU | pixel error | exact | effectiveness | composition (n, exact) | reversibility (n, exact, IoU) |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in rows.items():
            if s is None:
                continue
            c, r = s["composition"], s["reversibility"]
            lines.append(f"| {name} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['pixel_error'], 4)} | "
                         f"{_fmt(s['exact'])} | {_fmt(s['effectiveness'])} | {c['count']}, {_fmt(c['exact'])} | "
                         f"{r['count']}, {_fmt(r['exact'])}, {_fmt(r['iou'])} |")
        return lines

    out = ["# Counterfactual evaluation", "",
           f"{report['rows']} counterfactual result rows from `{report['results']}`, "
           f"checkpoint `{report['checkpoint']}`.", ""]
    out += table({**report["by_factor"], "**overall**": report["overall"]})
    if "holdout" in report:
        for part, title in (("holdout", "Rows touching held-out combinations"), ("seen", "Rows on seen combinations")):
            sect = report["holdout"][part]
            out += ["", f"## {title}", ""]
            out += table({**sect["by_factor"], "**overall**": sect["overall"]})
    if report["figures"]:
        out += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(out) + "\n"
