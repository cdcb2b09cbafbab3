"""Counterfactual answers measured against exact ground truth, with a readout that cannot
be gamed and controls that show what chance looks like.

dSprites holds every factor combination, so each counterfactual result row has a true
image: the image of the row's own factor columns (the counterfactual world the factor SCM
computed with the abducted noise; under the default SCM, the factual factors with the
intervened ones replaced). Every answer image is also read back to all five factors by
`cvae.data.readout` (the nearest ground-truth image over the whole grid by IoU; pixel-identical
classes count as one answer, any other tie and an empty image read back nothing). Per
intervened factor (and joint intervention) and overall:

- iou, pixel_error, exact: the answer against the true counterfactual image;
- effectiveness: every intervened factor reads back as the value asked for
  (`effectiveness_by_factor`: per intervened factor);
- preservation: every factor that is neither intervened on nor a descendant of an
  intervened one in the factor SCM's DAG reads back as its factual value
  (`preservation_by_factor`: per preserved factor);
- read_nothing: the share of answers that read back no factor at all (empty images,
  images that overlap no ground-truth image, ties on every factor);
- reversibility: a counterfactual of the answer (its image and factors as the factual
  observation) that does the factual values back must return the factual image; run
  in-process with `answer_queries` on the checkpoint's SCM, on a seeded sample of up to
  `reversibility_samples` rows per group;
- the same split into rows that touch held-out factor combinations (their source or their
  counterfactual lies in the manifest's holdout rules) and rows that do not.

Null interventions (every do equal to the factual value) are rows of their own
(`null`), never mixed into an intervened factor's row or the overall row. Composition is
measured two ways: `composition.null_intervention`, the exact SCM's null intervention
(its answer must be the factual image exactly: a correctness check, exact by
construction), and `composition.model`, the model's own: the factual image encoded and
decoded at its factual classes with the most likely pixels, k = 1, 5, 10 times, against
the factual image (a seeded sample of `composition_samples` distinct factual images).
`controls` holds the same metrics for three answer sets built from the same rows that
know nothing: the factual image returned unchanged, a blank image and a random grid image
(seeded by query_id and sample); they show chance level.

Results are read a batch at a time and reduced into sums, so memory does not grow with
the number of results. The intervention of each row comes from the query set (joined on
query_id): the result schema carries the counterfactual and factual worlds, not the do.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cvae import fs
from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTOR_SIZES, FACTORS, SHAPE_NAMES, ModelGrid, classes_to_index
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import decode_image, flatten, pixel_error
from cvae.data.readout import Readout
from cvae.data.shards import MANIFEST, read_manifest
from cvae.errors import CvaeError
from cvae.evaluate.checks import model_composition, reversal_queries, reversibility
from cvae.evaluate.families import FamilyTally, read_families, tv_table
from cvae.evaluate.families import save_figure as save_family_figure
from cvae.evaluate.metrics import add_to_groups, descendants, group_names, int_columns, row_parts, score
from cvae.evaluate.report import make_report, markdown, save_figures
from cvae.model.checkpoint import load_meta, resolve_checkpoint
from cvae.model.factors import FactorSCM
from cvae.rng import hash_parts, row_keys, seed_from_query_id
from cvae.serve.commit import SUCCESS

BATCH_ROWS = 2048


class EvaluationError(CvaeError):
    """Inputs that cannot be evaluated: missing files, or results that match no queries."""



# ----------------------------------------------------------------------------- inputs

def _parquet_files(folder: Path) -> list[Path]:
    """A local Parquet file, or a folder's Parquet files as the query engine lists them."""
    if folder.is_file():
        return [folder]
    root = str(folder.resolve())
    return [folder / p[len(root) + 1:] for p in fs.parquet_files(pafs.LocalFileSystem(), root)]


def _results_files(results: Path) -> list[Path]:
    """The engine's output folder (results/ beside errors/ and _SUCCESS.json) or a bare folder."""
    if (results / "results").is_dir():
        if not (results / SUCCESS).is_file():
            raise EvaluationError(f"{results}: the query run did not commit ({SUCCESS} missing)")
        results = results / "results"
    files = _parquet_files(results)
    if not files:
        raise EvaluationError(f"{results}: no result Parquet files")
    return files


def _interventions(queries: Path) -> pa.Table:
    """query_id, do_* and seed of every query (the only columns the evaluation needs: the
    seed gives the row keys the answers' noise came from)."""
    files = _parquet_files(queries)
    if not files:
        raise EvaluationError(f"{queries}: no query Parquet files")
    dataset = pads.dataset([str(f) for f in files], format="parquet")
    wanted = ["query_id"] + [f"do_{f}" for f in FACTORS] + ["seed"]
    missing = [c for c in wanted if c not in dataset.schema.names]
    table = dataset.to_table(columns=[c for c in wanted if c in dataset.schema.names])
    for c in missing:  # a query file may leave out columns it never uses
        if c == "query_id":
            raise EvaluationError(f"{queries}: the queries have no query_id column")
        table = table.append_column(c, pa.nulls(table.num_rows, pa.int64()))
    return table.select(wanted).cast(pa.schema([("query_id", pa.string())]
                                               + [(c, pa.int64()) for c in wanted[1:]]))


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


# ----------------------------------------------------------------------------- evaluation

@dataclass
class _State:
    """What the batches reduce into: per (answer set, group, part) sums and the samples kept."""
    truth: object
    readout: object
    world: object  # the generating FactorSCM: counterfactual classes of descendants
    reach: np.ndarray  # descendants(edges) of the generating SCM
    holdout: list
    trained: object  # the ModelGrid of the training split, None when it is the whole grid
    figures_per_factor: int
    rev_limit: int
    composition_limit: int
    groups: dict = field(default_factory=dict)  # (answers, group, part) -> Sums
    null: list = field(default_factory=lambda: [0, 0, 0.0])  # null rows: count, exact, pixel error
    figures: dict = field(default_factory=dict)  # group -> {(shape, scale): [(key, images, label)]}
    rev_pool: dict = field(default_factory=dict)  # group -> reversal queries kept so far
    composition_pool: dict = field(default_factory=dict)  # factual index -> key
    read: dict = field(default_factory=dict)  # answers -> [images read, seconds]
    agree: list = field(default_factory=lambda: [0, 0])  # rows, rows whose classes are the true world's


def evaluate(results: str | Path, checkpoint: str | Path, out_dir: str | Path, queries: str | Path,
             data_dir: str | Path | None = None, figures_per_factor: int = 8,
             reversibility_samples: int = 256, max_samples: int = 64,
             composition_samples: int = 256) -> dict:
    """Evaluate the counterfactual results in `results` against ground truth; writes
    report.json, report.md and figures/*.png under `out_dir` (paths or URIs) and returns
    the report. `checkpoint` may be a training run folder: its best checkpoint is used
    (cvae.model.checkpoint.resolve_checkpoint)."""
    checkpoint = resolve_checkpoint(checkpoint)
    with fs.staged(results) as results_local, fs.staged(queries) as queries_local, \
            fs.staged(checkpoint) as ckpt_local, fs.local_output(out_dir) as out_local:
        manifest = _manifest(load_meta(ckpt_local), data_dir, checkpoint)
        truth = GroundTruth.from_manifest(manifest)
        scm = ImageSCM.from_checkpoint(ckpt_local)
        scm.ground_truth = truth
        started = time.perf_counter()
        readout = Readout.of(truth)
        build_seconds = time.perf_counter() - started

        files = _results_files(Path(results_local))
        interventions = _interventions(Path(queries_local))
        world = FactorSCM.of_dataset(manifest, scm.grid.classes)  # dSprites' world on the classes it answers
        trained = ModelGrid.of_manifest(manifest)
        state = _State(truth, readout, world, descendants(world.edges), manifest.get("holdout") or [],
                       None if trained.is_whole() else trained, figures_per_factor, reversibility_samples,
                       composition_samples)
        seen_rows = unmatched = 0
        for table in _batches(files, interventions):
            seen_rows += table.num_rows
            unmatched += _evaluate_batch(table, state)
        asked = read_families(queries_local)
        if seen_rows == 0 and asked is None:
            raise EvaluationError(f"{results}: no counterfactual result rows")
        if seen_rows and unmatched == seen_rows:
            raise EvaluationError(f"{results}: no result row matches a query_id of {queries}")
        refused = {"count": 0, "example": None}
        reversibility(scm, state.rev_pool, truth, state.holdout, state.groups, max_samples, refused)
        composition = model_composition(scm, truth, state.composition_pool, composition_samples)

        report = make_report(state, seen_rows, unmatched, results, checkpoint, queries)
        report["composition"]["model"] = composition
        if asked is not None:
            report["families"] = _family_table(files, asked, readout, world)
            save_family_figure(out_local / "figures" / "families.png", report["families"])
        report["readout"]["build_seconds"] = round(build_seconds, 1)
        report["reversal_queries_refused"] = refused
        report["figures"] = save_figures(out_local, state.figures, figures_per_factor)
        if asked is not None:
            report["figures"].append("figures/families.png")
        fs.write_text_atomic(out_local / "report.md", markdown(report))
        fs.write_text_atomic(out_local / "report.json", json.dumps(report, indent=2))  # last
    return report


def _manifest(meta: dict, data_dir, checkpoint) -> dict:
    """The data manifest: the dataset's own when `data_dir` is given, else the checkpoint's copy."""
    manifest = meta.get("manifest")
    if data_dir is not None:
        with fs.staged(data_dir, only=[MANIFEST]) as data_local:
            manifest = read_manifest(data_local)
    if not manifest:
        raise EvaluationError(f"{checkpoint}: the checkpoint has no data manifest; give --data")
    return manifest


def _family_table(files: list[Path], asked: tuple, readout, world) -> list[dict]:
    """Read back the family rows' answers (query_ids `family...`) and tabulate their TV."""
    families, _ = asked
    tally = FamilyTally(families)
    dataset = pads.dataset([str(f) for f in files], format="parquet")
    columns = ["query_id", "image"] + list(FACTORS)
    for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS,
                                    filter=pc.starts_with(pc.field("query_id"), "family")):
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch])
        classes = int_columns(table, list(FACTORS))
        images = np.stack([decode_image(b) for b in table["image"].to_pylist()])
        tally.add(table["query_id"].to_pylist(), classes, readout.read(images, classes_to_index(classes)[:, None]))
    return tv_table(tally, world)


def _evaluate_batch(table: pa.Table, st: _State) -> int:
    do = int_columns(table, [f"do_{f}" for f in FACTORS])
    # A row without a matching query (or a query without any do) cannot be grouped: skip it.
    keep = (do >= 0).any(1)
    unmatched = int((~keep).sum())
    if not keep.any():
        return unmatched
    table, do = table.filter(pa.array(keep)), do[keep]
    n = table.num_rows
    factual = int_columns(table, [f"factual_{f}" for f in FACTORS])
    samples = table["sample"].to_numpy()
    query_ids = table["query_id"].to_pylist()
    # The true counterfactual world: the generating SCM run on the factual's abducted noise,
    # drawn with the row keys the answer's own noise came from (the query's seed, else its
    # id's hash; cvae.serve.queries). Under independent factors: the factual with the do applied.
    cf = _true_world(st.world, table, factual, do)
    own = int_columns(table, list(FACTORS))  # the world the model's SCM answered in
    st.agree[0] += n
    st.agree[1] += int((own == cf).all(1).sum())
    answer = np.stack([decode_image(b) for b in table["image"].to_pylist()])
    at_cf, at_factual = classes_to_index(cf), classes_to_index(factual)
    true_cf, true_factual = st.truth.images(at_cf), st.truth.images(at_factual)
    null = ((do < 0) | (do == factual)).all(1)
    names = group_names(do)
    names[null] = ["null:" + name for name in names[null]]
    parts = row_parts(cf, factual, st.holdout, st.trained)
    intervened = do >= 0
    below = (intervened.astype(int) @ st.reach.astype(int)) > 0
    preserved, downstream = ~intervened & ~below, ~intervened & below
    keys = hash_parts(np.array([seed_from_query_id(q) for q in query_ids], dtype=np.uint64), samples)

    # The model's answers and the controls, all read back and scored against the same rows.
    random_at = st.readout.indices[hash_parts(keys, 1) % np.uint64(len(st.readout.indices))]
    answer_sets = {"model": (answer, np.stack([at_cf, at_factual], 1)),
                   "factual": (true_factual, at_factual[:, None]),
                   "blank": (np.zeros_like(answer), None),
                   "random": (st.truth.images(random_at), random_at[:, None])}
    for name, (images, hints) in answer_sets.items():
        started = time.perf_counter()
        readback = st.readout.read(images, hints)
        counter = st.read.setdefault(name, [0, 0.0])
        counter[0] += n
        counter[1] += time.perf_counter() - started
        scores = score(images, true_cf, do, factual, preserved, readback, downstream, cf)
        add_to_groups(st.groups, name, names, parts if name == "model" else {"all": np.ones(n, dtype=bool)},
                      lambda s, mask: s.add(scores, mask, do, preserved, downstream))  # noqa: B023 (called at once)
    _composition(st, null, answer, true_factual, at_factual)
    if st.figures_per_factor:
        _keep_figures(st, ~null & (samples == 0), names, factual, do, keys,
                      (true_factual, answer, true_cf))
    _keep_reversals(st, table, np.flatnonzero(~null), names, (own, factual, do), answer)
    return unmatched


def _keep_reversals(st: _State, table: pa.Table, rows: np.ndarray, names: np.ndarray, classes: tuple,
                    answer: np.ndarray) -> None:
    """The reversibility sample: per group, the rows with the smallest hash of (query_id,
    sample), a seeded uniform sample that does not depend on file or row order. `classes`:
    the rows' own (answered), factual and do classes."""
    if st.rev_limit and len(rows):
        fresh = reversal_queries(table, rows, *classes, answer)
        for name in set(names[rows]):
            mine = fresh.filter(pc.equal(fresh["_group"], name))
            pool = pa.concat_tables([st.rev_pool[name], mine]) if name in st.rev_pool else mine
            st.rev_pool[name] = pool.sort_by("_key").slice(0, st.rev_limit)


def _true_world(world, table: pa.Table, factual: np.ndarray, do: np.ndarray) -> np.ndarray:
    """The true counterfactual classes (n, 5): the generating SCM run on the factual's
    abducted noise, drawn with the row keys the answer's own noise came from (the query's
    seed, else its id's hash; cvae.serve.queries). Under independent factors: the factual with the
    do applied."""
    seeds = [seed_from_query_id(q) if s is None else s % 2**64
             for q, s in zip(table["query_id"].to_pylist(), table["seed"].to_pylist())]
    keys = row_keys(np.array(seeds, dtype=np.uint64), table["sample"].to_numpy())
    return world.forward(world.abduct_gumbels(factual, keys), do)


def _composition(st: _State, null: np.ndarray, answer: np.ndarray, true_factual: np.ndarray,
                 at_factual: np.ndarray) -> None:
    """The SCM's composition (a null intervention returns the factual image exactly), and the
    pool of distinct factual images the model's own composition runs on later (seeded)."""
    st.null[0] += int(null.sum())
    st.null[1] += int((flatten(answer[null]) == flatten(true_factual[null])).all(1).sum())
    st.null[2] += float(pixel_error(answer[null], true_factual[null]).sum())
    if st.composition_limit:
        for index in np.unique(at_factual).tolist():
            st.composition_pool.setdefault(index, seed_from_query_id(f"composition:{index}"))
        if len(st.composition_pool) > 4 * st.composition_limit:
            kept = sorted(st.composition_pool.items(), key=lambda kv: kv[1])[:st.composition_limit]
            st.composition_pool = dict(kept)


def _keep_figures(st: _State, eligible: np.ndarray, names: np.ndarray, factual: np.ndarray,
                  do: np.ndarray, keys: np.ndarray, images: tuple) -> None:
    """Per group and per stratum (factual shape, scale), keep the figures_per_factor rows
    with the smallest keys: a seeded sample that does not depend on file or row order."""
    rows = np.flatnonzero(eligible)
    if not len(rows):
        return
    group_ids = np.unique(names[rows], return_inverse=True)[1].reshape(-1)
    stratum = factual[rows, 0] * FACTOR_SIZES["scale"] + factual[rows, 1]
    order = np.lexsort((keys[rows], stratum, group_ids))
    rows, cell = rows[order], group_ids[order] * 1000 + stratum[order]
    first = np.r_[0, np.flatnonzero(np.diff(cell)) + 1]
    rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
    for i in rows[rank < st.figures_per_factor]:
        kept = st.figures.setdefault(names[i], {}).setdefault((int(factual[i, 0]), int(factual[i, 1])), [])
        if len(kept) == st.figures_per_factor and keys[i] >= kept[-1][0]:
            continue
        kept.append((int(keys[i]), tuple(im[i] for im in images), _figure_label(factual[i], do[i])))
        kept.sort(key=lambda k: k[0])
        del kept[st.figures_per_factor:]


def _figure_label(factual: np.ndarray, do: np.ndarray) -> str:
    """'ellipse→heart' for shape, 'scale 2→5' for the other factors; one line per do."""
    lines = []
    for j, f in enumerate(FACTORS):
        if do[j] >= 0:
            lines.append(f"{SHAPE_NAMES[factual[j]]}→{SHAPE_NAMES[do[j]]}" if f == "shape"
                         else f"{f} {factual[j]}→{do[j]}")
    return "\n".join(lines)



