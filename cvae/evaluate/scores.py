"""Counterfactual answers measured against exact ground truth, with a readout that cannot
be gamed and controls that show what chance looks like.

dSprites holds every factor combination, so each counterfactual result row has a true
image: the image of the row's own factor columns (the counterfactual world the factor SCM
computed with the abducted noise; under the default SCM, the factual factors with the
intervened ones replaced). Every answer image is also read back to all five factors by
`cvae.evaluate.readout` (the nearest ground-truth image over the whole grid by IoU; pixel-identical
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
from cvae.causal.families import FamilyTally, read_families, tv_table
from cvae.causal.families import markdown_table as family_markdown
from cvae.causal.families import save_figure as save_family_figure
from cvae.data.grid import FACTOR_SIZES, FACTORS, SHAPE_NAMES, ModelGrid, classes_to_index, index_to_classes
from cvae.data.images import decode_image, encode_pngs, flatten, iou, pixel_error  # noqa: F401 (iou, pixel_error: the scores)
from cvae.rng import hash_parts, row_keys, seed_from_query_id

BATCH_ROWS = 2048
CONTROLS = ("factual", "blank", "random")  # answer sets that know nothing, beside the model's
COMPOSITION_STEPS = (1, 5, 10)  # encode-decode repetitions reported for the model's composition


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated: missing files, or results that match no queries."""


# ----------------------------------------------------------------------------- metrics

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
    `readback` is the answers' `cvae.evaluate.readout.ReadBack`."""
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


# ----------------------------------------------------------------------------- inputs

def _parquet_files(folder: Path) -> list[Path]:
    """A local Parquet file, or a folder's Parquet files as the query engine lists them."""
    if folder.is_file():
        return [folder]
    root = str(folder.resolve())
    return [folder / p[len(root) + 1:] for p in fs.parquet_files(pafs.LocalFileSystem(), root)]


def _results_files(results: Path) -> list[Path]:
    """The engine's output folder (results/ beside errors/ and _SUCCESS.json) or a bare folder."""
    from cvae.serve.engine import SUCCESS

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


def _ints(table: pa.Table, names: list[str]) -> np.ndarray:
    return np.stack([pc.fill_null(table[n], -1).to_numpy() for n in names], axis=1).astype(np.int64)


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
    from cvae.causal.factors import FactorSCM
    from cvae.causal.image import ImageSCM
    from cvae.data.groundtruth import GroundTruth
    from cvae.evaluate.readout import Readout
    from cvae.model.checkpoint import load_meta, resolve_checkpoint

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
        world = FactorSCM.of_dataset(manifest)
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
        _reversibility(scm, state.rev_pool, truth, state.holdout, state.groups, max_samples, refused)
        model_composition = _model_composition(scm, truth, state.composition_pool, composition_samples)

        report = _report(state, seen_rows, unmatched, results, checkpoint, queries)
        report["composition"]["model"] = model_composition
        if asked is not None:
            report["families"] = _family_table(files, asked, readout, world)
            save_family_figure(out_local / "figures" / "families.png", report["families"])
        report["readout"]["build_seconds"] = round(build_seconds, 1)
        report["reversal_queries_refused"] = refused
        report["figures"] = _save_figures(out_local, state.figures, figures_per_factor)
        if asked is not None:
            report["figures"].append("figures/families.png")
        fs.write_text_atomic(out_local / "report.md", markdown(report))
        fs.write_text_atomic(out_local / "report.json", json.dumps(report, indent=2))  # last
    return report


def _manifest(meta: dict, data_dir, checkpoint) -> dict:
    """The data manifest: the dataset's own when `data_dir` is given, else the checkpoint's copy."""
    manifest = meta.get("manifest")
    if data_dir is not None:
        from cvae.data.shards import MANIFEST, read_manifest

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
        classes = _ints(table, list(FACTORS))
        images = np.stack([decode_image(b) for b in table["image"].to_pylist()])
        tally.add(table["query_id"].to_pylist(), classes, readout.read(images, classes_to_index(classes)[:, None]))
    return tv_table(tally, world)


def _group_names(do: np.ndarray) -> np.ndarray:
    """'shape', or 'scale+shape'-style names (factor order) for joint interventions."""
    names = np.full(len(do), "", dtype=object)
    for j, f in enumerate(FACTORS):
        on = do[:, j] >= 0
        names[on] = np.where(names[on] == "", f, names[on] + "+" + f)
    return names


def _parts(classes_cf: np.ndarray, factual: np.ndarray, holdout: list, trained=None) -> dict[str, np.ndarray]:
    """The row subsets each group is also scored on: all rows; held-out combinations and the
    rest; counterfactuals with a class the training split lacks ("unseen": a model that
    answers more than its training grid, cvae.model.coverage) and the rest ("trained"); and
    each scale of the true counterfactual image ("scale=k": small shapes are where a model
    misses most, so the report breaks quality down by the scale it had to draw)."""
    from cvae.data.shards import holdout_mask

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


def _add(groups: dict, answers: str, names: np.ndarray, parts: dict, fn) -> None:
    """Call fn(sums, mask) for every (group, part), for ('overall', part) over the intervened
    rows and for ('null', part) over the null rows (named 'null:<factor>')."""
    null = np.array([n.startswith("null:") for n in names], dtype=bool)
    for part, pmask in parts.items():
        masks = [("overall", pmask & ~null), ("null", pmask & null)]
        masks += [(name, pmask & (names == name)) for name in sorted(set(names[pmask]))]
        for name, mask in masks:
            if mask.any():
                fn(groups.setdefault((answers, name, part), Sums()), mask)


def _evaluate_batch(table: pa.Table, st: _State) -> int:
    do = _ints(table, [f"do_{f}" for f in FACTORS])
    # A row without a matching query (or a query without any do) cannot be grouped: skip it.
    keep = (do >= 0).any(1)
    unmatched = int((~keep).sum())
    if not keep.any():
        return unmatched
    table, do = table.filter(pa.array(keep)), do[keep]
    n = table.num_rows
    factual = _ints(table, [f"factual_{f}" for f in FACTORS])
    samples = table["sample"].to_numpy()
    query_ids = table["query_id"].to_pylist()
    # The true counterfactual world: the generating SCM run on the factual's abducted noise,
    # drawn with the row keys the answer's own noise came from (the query's seed, else its
    # id's hash; cvae.serve.queries). Under independent factors: the factual with the do applied.
    cf = _true_world(st.world, table, factual, do)
    own = _ints(table, list(FACTORS))  # the world the model's SCM answered in
    st.agree[0] += n
    st.agree[1] += int((own == cf).all(1).sum())
    answer = np.stack([decode_image(b) for b in table["image"].to_pylist()])
    at_cf, at_factual = classes_to_index(cf), classes_to_index(factual)
    true_cf, true_factual = st.truth.images(at_cf), st.truth.images(at_factual)
    null = ((do < 0) | (do == factual)).all(1)
    names = _group_names(do)
    names[null] = ["null:" + name for name in names[null]]
    parts = _parts(cf, factual, st.holdout, st.trained)
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
        _add(st.groups, name, names, parts if name == "model" else {"all": np.ones(n, dtype=bool)},
             lambda s, mask: s.add(scores, mask, do, preserved, downstream))  # noqa: B023 (called at once)
    _composition(st, null, answer, true_factual, at_factual)
    if st.figures_per_factor:
        _keep_figures(st, ~null & (samples == 0), names, factual, do, keys,
                      (true_factual, answer, true_cf))

    # Reversibility sample: per group, the rows with the smallest hash of (query_id, sample),
    # a seeded uniform sample that does not depend on file or row order.
    rows = np.flatnonzero(~null)
    if st.rev_limit and len(rows):
        fresh = _reversal_queries(table, rows, own, factual, do, answer)
        for name in set(names[rows]):
            mine = fresh.filter(pc.equal(fresh["_group"], name))
            pool = pa.concat_tables([st.rev_pool[name], mine]) if name in st.rev_pool else mine
            st.rev_pool[name] = pool.sort_by("_key").slice(0, st.rev_limit)
    return unmatched


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


def _model_composition(scm, truth, pool: dict, limit: int) -> dict:
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


def _reversal_queries(table: pa.Table, rows: np.ndarray, cf: np.ndarray, factual: np.ndarray,
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
    cols["_group"] = pa.array(_group_names(do[rows]).tolist(), pa.string())
    cols["_key"] = pa.array([seed_from_query_id(i) for i in ids], pa.uint64())
    return pa.table(cols)


def _reversibility(scm, pool: dict, truth, holdout: list, groups: dict, max_samples: int,
                   refused: dict) -> None:
    from cvae.serve.queries import answer_queries

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
    row_exact = (flatten(back) == flatten(want)).all(1)
    names = np.array(table["_group"].to_pylist(), dtype=object)[at]
    cf = _ints(table, list(FACTORS))[at]

    def accumulate(s: Sums, mask: np.ndarray) -> None:
        s.rev_count += int(mask.sum())
        s.rev_exact += int(row_exact[mask].sum())
        s.rev_iou += float(row_iou[mask].sum())

    _add(groups, "model", names, _parts(cf, factual, holdout), accumulate)


# ----------------------------------------------------------------------------- outputs

def _group_order(name: str) -> tuple:
    return name.count("+"), FACTORS.index(name.split("+")[0])


def _section(groups: dict, answers: str, part: str) -> dict:
    """{"overall", "by_factor", "null": {"overall", "by_factor"}} of one answer set and part."""
    def get(name):
        return groups[(answers, name, part)].summary() if (answers, name, part) in groups else None

    names = sorted({g for a, g, p in groups if a == answers and p == part and g not in ("overall", "null")
                    and not g.startswith("null:")}, key=_group_order)
    nulls = sorted({g[5:] for a, g, p in groups if a == answers and p == part and g.startswith("null:")},
                   key=_group_order)
    return {"overall": get("overall"), "by_factor": {g: get(g) for g in names},
            "null": {"overall": get("null"), "by_factor": {g: get("null:" + g) for g in nulls}}}


def _report(st: _State, rows: int, unmatched: int, results, checkpoint, queries) -> dict:
    def speed(name):
        n, seconds = st.read.get(name, [0, 0.0])
        return {"answers": n, "seconds": round(seconds, 2),
                "per_second": round(n / seconds, 1) if seconds > 0 else None}

    model = _section(st.groups, "model", "all")
    count, exact, error = st.null
    report = {
        "results": str(results), "checkpoint": str(checkpoint), "queries": str(queries),
        "rows": rows, "rows_without_intervention": unmatched,
        "readout": {"candidates": int(len(st.readout.indices)), "distinct_images": st.readout.distinct_images,
                    "speed": {name: speed(name) for name in ("model",) + CONTROLS}},
        "overall": model["overall"], "by_factor": model["by_factor"], "null": model["null"],
        "composition": {"null_intervention": {"count": count,
                                              "exact": None if not count else round(exact / count, 6),
                                              "pixel_error": None if not count else round(error / count, 6)}},
        "controls": {name: _section(st.groups, name, "all") for name in CONTROLS},
        "holdout_rules": st.holdout,
        "world": {"edges": [list(e) for e in st.world.edges],
                  "classes_agree": None if not st.agree[0] else round(st.agree[1] / st.agree[0], 6)},
    }
    if st.holdout:
        report["holdout"] = {part: _section(st.groups, "model", part) for part in ("holdout", "seen")}
    if st.trained is not None:
        report["training_grid"] = {"classes": st.trained.to_dict()["classes"],
                                   **{part: _section(st.groups, "model", part) for part in ("unseen", "trained")}}
    report["by_scale"] = {str(k): _section(st.groups, "model", f"scale={k}")["overall"]
                          for k in range(FACTOR_SIZES["scale"])}
    return report


# Strata (factual shape, scale) in an order whose first six cover every shape and every scale.
STRATA = [(j % 3, (j + j // 6) % 6) for j in range(18)]


def stratified(strata: dict, count: int) -> list:
    """`count` items from {(shape, scale): [items, best first]}, round-robin over the strata
    in STRATA order: the first of every stratum before any second one."""
    shown = []
    for rank in range(count):
        shown += [strata[s][rank] for s in STRATA if s in strata and len(strata[s]) > rank]
    return shown[:count]


def _save_figures(out: Path, figures: dict, per_figure: int) -> list[str]:
    """One grid per intervened group: columns drawn round-robin over the (shape, scale)
    strata of their factual images, rows factual | answer | ground truth."""
    from cvae.figures import save_image_grid

    written = []
    for name in sorted(figures, key=_group_order):
        shown = stratified(figures[name], per_figure)
        if not shown:
            continue
        path = out / "figures" / f"counterfactuals_{name.replace('+', '_')}.png"
        save_image_grid(path, [np.stack([images[k] for _, images, _ in shown]) for k in range(3)],
                        row_labels=["factual", "answer", "ground truth"],
                        col_labels=[label for *_, label in shown],
                        title=f"do({name}): sources stratified over shape x scale")
        written.append(str(path.relative_to(out)))
    return written


def headline(report: dict) -> list[str]:
    """The report's headline numbers, one line each (printed by jobs.evaluate and jobs.pipeline)."""
    lines = []
    o = report.get("overall")
    if o:
        lines.append(f"{o['count']} intervened: IoU {_fmt(o['iou'])}, effectiveness {_fmt(o['effectiveness'])}, "
                     f"preservation {_fmt(o['preservation'])}, "
                     f"reversibility exact {_fmt(o['reversibility']['exact'])}")
    null = (report.get("null") or {}).get("overall")
    if null:
        lines.append(f"{null['count']} null interventions: exact {_fmt(null['exact'])}, "
                     f"effectiveness {_fmt(null['effectiveness'])}, preservation {_fmt(null['preservation'])}")
    own = report["composition"].get("model") or {}
    if own.get("count"):
        lines.append("model composition (encode-decode, IoU with the factual image): "
                     + ", ".join(f"k={k} {_fmt(v)}" for k, v in own["iou"].items()))
    families = [r for r in report.get("families") or [] if r["tv_images"] is not None]
    if families:
        worst = max(families, key=lambda r: r["tv_images"])
        lines.append(f"condition/intervene families: TV of read-back answers max {_fmt(worst['tv_images'])} "
                     f"({worst['question']}), mean {_fmt(float(np.mean([r['tv_images'] for r in families])))}"
                     f" over {len(families)} questions (goal <= 0.05)")
    parts = []
    for name, section in report["controls"].items():
        c = section["overall"] or {}
        parts.append(f"{name} {_fmt(c.get('effectiveness'))} / {_fmt(c.get('preservation'))}")
    lines.append("controls (effectiveness / preservation): " + ", ".join(parts))
    return lines


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(section: dict, null_label: str = "null: do({}) = factual") -> list[str]:
    lines = ["| intervened | rows | IoU | pixel error | exact | effectiveness | preservation | descendants | "
             "read nothing | reversibility (n, exact, IoU) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = {**section["by_factor"], "**overall**": section["overall"]}
    rows.update({null_label.format(g): s for g, s in section["null"]["by_factor"].items()})
    for name, s in rows.items():
        if s is None:
            continue
        r = s["reversibility"]
        lines.append(f"| {name} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['pixel_error'], 4)} | "
                     f"{_fmt(s['exact'])} | {_fmt(s['effectiveness'])} | {_fmt(s['preservation'])} | "
                     f"{_fmt(s['descendants'])} | "
                     f"{_fmt(s['read_nothing'])} | {r['count']}, {_fmt(r['exact'])}, {_fmt(r['iou'])} |")
    return lines


def markdown(report: dict) -> str:
    """The report as markdown tables: per group, per factor, composition, controls, holdout."""
    model = {"overall": report["overall"], "by_factor": report["by_factor"], "null": report["null"]}
    readout = report["readout"]
    out = ["# Counterfactual evaluation", "",
           f"{report['rows']} counterfactual result rows from `{report['results']}`, "
           f"checkpoint `{report['checkpoint']}`. Each answer is read back to all five factors as "
           f"its nearest ground-truth image by IoU, among {readout['candidates']} ground-truth images "
           f"({readout['distinct_images']} distinct). Null interventions are rows of their own, "
           "outside **overall**.", ""]
    world = report.get("world") or {}
    if world.get("edges"):
        out += [f"The data's factors come from an SCM with edges "
                f"{', '.join(f'{p} -> {c}' for p, c in world['edges'])}. The true counterfactual of a "
                "descendant of an intervened factor is that SCM run on the factual's abducted noise "
                "(the same noise draw the answer used); **descendants** is the share of rows whose "
                "every such descendant reads back as that value, and preservation covers the other "
                f"factors only. Result rows whose own classes are that world: "
                f"{_fmt(world.get('classes_agree'))}.", ""]
    out += _table(model)

    o = report["overall"] or {}
    random = report["controls"]["random"]["overall"] or {}
    out += ["", "## Read back per factor (intervened rows)", "",
            "| factor | effectiveness | preservation | random control: effectiveness | preservation |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for f in FACTORS:
        out.append(f"| {f} | {_fmt(o.get('effectiveness_by_factor', {}).get(f))} | "
                   f"{_fmt(o.get('preservation_by_factor', {}).get(f))} | "
                   f"{_fmt(random.get('effectiveness_by_factor', {}).get(f))} | "
                   f"{_fmt(random.get('preservation_by_factor', {}).get(f))} |")

    out += _md_by_scale(report) + _md_composition(report) + _md_controls(report, model)
    if report.get("families"):
        out += ["", "## Conditioning versus intervening", "",
                "Each question asked `samples` times through the query job; the answer images read "
                "back give the answered distribution of the target, compared by total variation with "
                "the generating SCM's exact one (**TV images**; goal <= 0.05). **TV classes**: the "
                "result rows' own classes (the exact factor sampler). **TV condition vs do**: between "
                "the two exact truths, how different the two questions are. **Sampling floor**: the "
                "mean TV of that many exact draws.", ""] + family_markdown(report["families"])
    if "holdout" in report:
        for part, title in (("holdout", "Rows touching held-out combinations"),
                            ("seen", "Rows on seen combinations")):
            out += ["", f"## {title}", ""] + _table(report["holdout"][part])
    if "training_grid" in report:
        for part, title in (("unseen", "Counterfactuals with a class the training split lacks"),
                            ("trained", "Counterfactuals on the training grid")):
            if report["training_grid"][part]["overall"] or report["training_grid"][part]["null"]["overall"]:
                out += ["", f"## {title}", ""] + _table(report["training_grid"][part])
    if report["figures"]:
        out += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(out) + "\n"


def _md_by_scale(report: dict) -> list[str]:
    """Intervened rows by the scale class of the true counterfactual image."""
    rows = {k: s for k, s in (report.get("by_scale") or {}).items() if s}
    if not rows:
        return []
    out = ["", "## By scale of the counterfactual image (intervened rows)", "",
           "| scale | rows | IoU | effectiveness | preservation | " + " | ".join(
               f"{f} eff. / pres." for f in FACTORS) + " |",
           "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(FACTORS)]
    for k, s in rows.items():
        cells = [f"{_fmt(s['effectiveness_by_factor'].get(f))} / {_fmt(s['preservation_by_factor'].get(f))}"
                 for f in FACTORS]
        out.append(f"| {k} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['effectiveness'])} | "
                   f"{_fmt(s['preservation'])} | " + " | ".join(cells) + " |")
    return out


def _md_composition(report: dict) -> list[str]:
    null, own = report["composition"]["null_intervention"], report["composition"].get("model") or {}
    out = ["", "## Composition", "",
            "The SCM's null intervention (a correctness check, exact by construction): "
            f"{null['count']} rows, exact {_fmt(null['exact'])}, pixel error {_fmt(null['pixel_error'], 4)}.", "",
            f"The model's own, on {own.get('count', 0)} factual images: encoded and decoded at the "
            "factual classes with the most likely pixels, k times, against the factual image:", "",
            "| k | IoU | exact |", "| ---: | ---: | ---: |"]
    for k in own.get("iou", {}):
        out.append(f"| {k} | {_fmt(own['iou'][k])} | {_fmt(own['exact'][k])} |")
    return out


def _md_controls(report: dict, model: dict) -> list[str]:
    out = ["", "## Controls", "",
            "The same metrics for answer sets that know nothing, built from the same rows "
            "(intervened rows):", "",
            "| answers | rows | IoU | pixel error | effectiveness | preservation | read nothing |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    labels = {"model": "the model", "factual": "factual image unchanged", "blank": "blank image",
              "random": "random grid image"}
    sections = {"model": model, **report["controls"]}
    for name, label in labels.items():
        s = sections[name]["overall"]
        if s is not None:
            out.append(f"| {label} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['pixel_error'], 4)} | "
                       f"{_fmt(s['effectiveness'])} | {_fmt(s['preservation'])} | "
                       f"{_fmt(s['read_nothing'])} |")
    return out
