"""Queries in, answers out: the query schema, validation, and `answer_queries` (pure, no Ray).

Two levels of checks:
- the whole file (`check_schema`): a missing required column, a wrong column type or an
  unknown column is a `QuerySchemaError` before any work;
- each row (`answer_queries`): a bad row becomes an error row (query_id, readable error)
  and never stops the others.

Duplicates: every row whose query_id occurs more than once in the input is an error row
(none of them is answered), so the outcome never depends on which rows share a batch. The
pure function sees the rows it is given; the engine counts query_ids over the whole input
first and passes the duplicated ones in `duplicate_ids`.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvae.causal.image import ImageSCM
from cvae.data.grid import FACTOR_SIZES, FACTORS, NUM_IMAGES, index_to_classes
from cvae.data.images import decode_image, encode_pngs
from cvae.errors import CvaeError
from cvae.rng import row_keys, seed_from_query_id
from cvae.serve.schema import (  # noqa: F401 (re-exported)
    ERROR_SCHEMA,
    INT_COLUMNS,
    KINDS,
    QUERY_SCHEMA,
    RESULT_SCHEMA,
    result_schema,
)

REQUIRED = ("query_id", "kind")
# Sample rows answered at once: bounds memory (4096 float64 pixel uniforms per row). At 512
# rows those arrays are 16 MiB, under glibc's 32 MiB mmap ceiling, so freed ones are reused
# (cvae.malloc); at 1,024 they were 32 MiB and a few bytes, over it, and came back as fresh
# pages: 60,000 to 86,000 page faults per 4,096 answers against 150, at the same speed.
ANSWER_CHUNK = 512


class QuerySchemaError(CvaeError):
    """A query file that cannot be used at all (missing or mistyped columns)."""


def check_schema(schema: pa.Schema, where: str = "queries") -> None:
    """Raise QuerySchemaError naming every column problem of a query file's schema."""
    problems = []
    names = schema.names
    for name in REQUIRED:
        if name not in names:
            problems.append(f"missing required column {name!r}")
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"column {name!r} appears more than once")
    for field in schema:
        t = field.type
        if field.name not in QUERY_SCHEMA.names:
            problems.append(f"unknown column {field.name!r} (expected columns: {', '.join(QUERY_SCHEMA.names)})")
        elif pa.types.is_null(t):
            continue  # an all-null column: fine for every optional column, bad rows otherwise
        elif field.name in ("query_id", "kind") and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            problems.append(f"column {field.name!r} must be a string, got {t}")
        elif field.name == "image" and not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            problems.append(f"column 'image' must be binary (PNG or 4096 raw bytes), got {t}")
        elif field.name in INT_COLUMNS and not pa.types.is_integer(t):
            problems.append(f"column {field.name!r} must be an integer type, got {t}")
    if problems:
        raise QuerySchemaError(f"{where}: " + "; ".join(problems))


def normalize(table: pa.Table) -> pa.Table:
    """Check the schema, then cast to QUERY_SCHEMA (missing optional columns become nulls)."""
    check_schema(table.schema)
    columns = []
    for field in QUERY_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        try:
            columns.append(pc.cast(table.column(field.name), field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise QuerySchemaError(f"queries: column {field.name!r} cannot be read as {field.type}: {exc}") from None
    return pa.Table.from_arrays(columns, schema=QUERY_SCHEMA)


def _ints(table: pa.Table, name: str) -> np.ndarray:
    """An int64 column as numpy with -1 for null (valid values are never negative; negatives are checked first)."""
    return pc.fill_null(table.column(name), -1).to_numpy()


def _present(table: pa.Table, name: str) -> np.ndarray:
    return pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)


@dataclasses.dataclass
class _Rows:
    """A normalised batch of query rows, parsed once, with the problems found per row."""
    table: pa.Table
    ids: list
    kinds: np.ndarray  # str per row, "" for null
    num_samples: np.ndarray
    present: dict  # prefix ("", "do_", "given_") -> (n, 5) bool
    values: dict  # prefix -> (n, 5) int64, -1 for null
    has_source: np.ndarray
    source: np.ndarray
    has_image: np.ndarray
    problems: dict = dataclasses.field(default_factory=lambda: defaultdict(list))

    @classmethod
    def parse(cls, table: pa.Table) -> _Rows:
        kinds = np.array([k if k is not None else "" for k in table.column("kind").to_pylist()], dtype=object)
        groups = {"": list(FACTORS), "do_": [f"do_{f}" for f in FACTORS], "given_": [f"given_{f}" for f in FACTORS]}
        return cls(table, table.column("query_id").to_pylist(), kinds,
                   pc.fill_null(table.column("num_samples"), 1).to_numpy(),
                   {p: np.stack([_present(table, c) for c in cols], axis=1) for p, cols in groups.items()},
                   {p: np.stack([_ints(table, c) for c in cols], axis=1) for p, cols in groups.items()},
                   _present(table, "source_index"), _ints(table, "source_index"), _present(table, "image"))

    def ok(self) -> np.ndarray:
        return np.array([i not in self.problems for i in range(len(self.ids))], dtype=bool)


def answer_queries(scm: ImageSCM, queries: pa.Table, max_samples: int = 64,
                   duplicate_ids: frozenset | set | None = None, verifier=None) -> tuple[pa.Table, pa.Table]:
    """Answer every valid query row: (results, errors) as Arrow tables (RESULT_SCHEMA, ERROR_SCHEMA).

    With a `verifier` (cvae.serve.verify.Verifier) every answer is read back before it is
    encoded and the results gain its columns (VERIFIED_RESULT_SCHEMA).
    Raises QuerySchemaError for a batch whose columns are unusable; bad rows are error rows.
    """
    rows = _Rows.parse(normalize(queries))
    _check_identity(rows, duplicate_ids or frozenset())
    _check_numbers(rows, max_samples)
    _check_kinds(rows)
    factual, images = _observations(scm, rows)
    _check_grid(scm, rows, factual)
    _check_evidence(scm, rows, factual)
    problems = rows.problems
    errors = pa.table({"query_id": pa.array([rows.ids[i] for i in sorted(problems)], pa.string()),
                       "error": pa.array(["; ".join(problems[i]) for i in sorted(problems)], pa.string())},
                      schema=ERROR_SCHEMA)
    valid = np.flatnonzero(rows.ok())
    if not len(valid):
        return result_schema(verifier is not None).empty_table(), errors
    return _answer(scm, rows, valid, factual, images, verifier), errors


def _check_identity(rows: _Rows, duplicate_ids: frozenset | set) -> None:
    counts = defaultdict(int)
    for qid in rows.ids:
        counts[qid] += 1
    for i, qid in enumerate(rows.ids):
        if qid is None:
            rows.problems[i].append("query_id is null (required)")
        elif qid == "":
            rows.problems[i].append("query_id is empty")
        elif counts[qid] > 1 or qid in duplicate_ids:
            rows.problems[i].append(f"query_id {qid!r} appears more than once in the input "
                                    "(duplicates are not answered)")
        kind = rows.kinds[i]
        if kind == "":
            rows.problems[i].append(f"kind is null (required: one of {', '.join(KINDS)})")
        elif kind not in KINDS:
            rows.problems[i].append(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


def _check_numbers(rows: _Rows, max_samples: int) -> None:
    problems, num_samples = rows.problems, rows.num_samples
    for i in np.flatnonzero(num_samples < 1):
        problems[i].append(f"num_samples must be >= 1, got {num_samples[i]}")
    for i in np.flatnonzero(num_samples > max_samples):
        problems[i].append(f"num_samples {num_samples[i]} exceeds the limit of {max_samples} (query.max_samples)")
    for prefix in ("", "do_", "given_"):
        present, values = rows.present[prefix], rows.values[prefix]
        for j, f in enumerate(FACTORS):
            bad = present[:, j] & ((values[:, j] < 0) | (values[:, j] >= FACTOR_SIZES[f]))
            for i in np.flatnonzero(bad):
                problems[i].append(f"{prefix}{f}={values[i, j]} is out of range [0, {FACTOR_SIZES[f]})")
    for i in np.flatnonzero(rows.has_source & ((rows.source < 0) | (rows.source >= NUM_IMAGES))):
        problems[i].append(f"source_index={rows.source[i]} is out of range [0, {NUM_IMAGES})")


def _check_kinds(rows: _Rows) -> None:
    """What each kind takes."""
    problems, kinds, present = rows.problems, rows.kinds, rows.present
    has_source, has_image = rows.has_source, rows.has_image
    cf = kinds == "counterfactual"
    fwd = (kinds == "condition") | (kinds == "intervene")
    for i in np.flatnonzero(fwd & (has_source | has_image | present[""].any(axis=1))):
        problems[i].append(f"a {kinds[i]} query takes no factual observation (source_index, image, "
                           "factor columns); use kind 'counterfactual'")
    for i in np.flatnonzero((kinds == "condition") & present["do_"].any(axis=1)):
        problems[i].append("do_* columns need kind 'intervene' or 'counterfactual'")
    for i in np.flatnonzero(cf & present["given_"].any(axis=1)):
        problems[i].append("given_* columns are for condition and intervene, not counterfactual "
                           "(the factual observation is the evidence)")
    for i in np.flatnonzero(cf & has_source & has_image):
        problems[i].append("give either image or source_index, not both")
    for i in np.flatnonzero(cf & ~has_source & ~has_image):
        problems[i].append("a counterfactual needs a factual observation: source_index or image")
    for i in np.flatnonzero(cf & has_image & ~has_source & ~present[""].all(axis=1)):
        missing = [f for j, f in enumerate(FACTORS) if not present[""][i, j]]
        problems[i].append(f"image needs its factor columns beside it; missing: {', '.join(missing)}")


def _observations(scm: ImageSCM, rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """The factual classes (n, 5) and images (n, 4096) of the counterfactual rows fine so far."""
    n, problems, values, present = len(rows.ids), rows.problems, rows.values[""], rows.present[""]
    factual = np.full((n, len(FACTORS)), -1, dtype=np.int64)
    images = np.zeros((n, 64 * 64), dtype=np.uint8)
    cf = rows.ok() & (rows.kinds == "counterfactual")
    image_column = rows.table.column("image")
    for i in np.flatnonzero(cf & rows.has_image):
        try:
            images[i] = decode_image(image_column[int(i)].as_py()).reshape(-1)
            factual[i] = values[i]
        except ValueError as exc:
            problems[i].append(f"image: {exc}")
    source_rows = np.flatnonzero(cf & rows.has_source)
    if not len(source_rows):
        return factual, images
    factual[source_rows] = index_to_classes(rows.source[source_rows], with_color=False)
    for i in source_rows:
        clash = [f"{f}={values[i, j]}" for j, f in enumerate(FACTORS)
                 if present[i, j] and values[i, j] != factual[i, j]]
        if clash:
            problems[i].append(f"factor columns {', '.join(clash)} disagree with source_index "
                               f"{rows.source[i]} (classes {factual[i].tolist()})")
    if scm.ground_truth is None:
        for i in source_rows:
            problems[i].append("source_index needs the true images, but the checkpoint has no data manifest")
    else:
        _true_images(scm, rows.source, source_rows, images, problems)
    return factual, images


def _check_grid(scm: ImageSCM, rows: _Rows, factual: np.ndarray) -> None:
    """Every class a row names (factual, do_*, given_*) must be on the model's grid: the
    classes it was trained on (or measured to answer). Any other would be drawn from a class
    code the model never trained: a silent wrong answer, so the row is refused instead."""
    grid = scm.grid
    if grid.is_whole():
        return
    ok = rows.ok()
    cf = ok & (rows.kinds == "counterfactual")
    for prefix in ("", "do_", "given_"):
        values = factual if prefix == "" else rows.values[prefix]
        named = cf[:, None] & (factual >= 0) if prefix == "" else ok[:, None] & rows.present[prefix]
        for i, j in zip(*np.nonzero(grid.off(values, named))):
            f = FACTORS[j]
            name = f"source_index {rows.source[i]}: {f}" if prefix == "" and rows.has_source[i] else f"{prefix}{f}"
            rows.problems[i].append(grid.refusal(name, f, int(values[i, j])))


def _check_evidence(scm: ImageSCM, rows: _Rows, factual: np.ndarray) -> None:
    """Evidence the SCM can explain: factual classes, and given_* under the do_*."""
    ok = rows.ok()
    cf = np.flatnonzero(ok & (rows.kinds == "counterfactual"))
    if len(cf):
        for i in cf[~np.isfinite(scm.factors.log_prob(factual[cf]))]:
            rows.problems[i].append("the factual factors have probability zero under the SCM: "
                                    + scm.factors.why_impossible(factual[i]))
    fwd = np.flatnonzero(ok & ((rows.kinds == "condition") | (rows.kinds == "intervene")))
    if len(fwd):
        given = np.where(rows.present["given_"][fwd], rows.values["given_"][fwd], -1)
        do = np.where(rows.present["do_"][fwd], rows.values["do_"][fwd], -1)
        for i in fwd[~scm.factors.evidence_possible(given, do)]:
            rows.problems[i].append("the evidence (given_*) has probability zero under the SCM"
                                    + (" with this intervention" if rows.kinds[i] == "intervene" else ""))


def _answer(scm: ImageSCM, rows: _Rows, valid: np.ndarray, factual: np.ndarray, images: np.ndarray,
            verifier=None) -> pa.Table:
    """Expand the valid rows to sample rows and answer them a chunk at a time."""
    table, kinds = rows.table, rows.kinds
    seeds, has_seed = _ints(table, "seed"), _present(table, "seed")
    seed = np.array([seeds[i] if has_seed[i] else seed_from_query_id(rows.ids[i]) for i in valid], dtype=np.uint64)
    per_query = rows.num_samples[valid]
    query_of = np.repeat(np.arange(len(valid)), per_query)
    sample = np.arange(len(query_of)) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    rows_of = valid[query_of]
    keys = row_keys(seed[query_of], sample)
    given_all = np.where(rows.present["given_"], rows.values["given_"], -1)
    do_all = np.where(rows.present["do_"], rows.values["do_"], -1)
    classes, pngs, read = [], [], []
    for start in range(0, len(rows_of), ANSWER_CHUNK):
        r = rows_of[start:start + ANSWER_CHUNK]
        answer = scm.answer(kinds[r].astype(str), given_all[r], do_all[r], factual[r], images[r],
                            keys[start:start + ANSWER_CHUNK])
        classes.append(answer.classes)
        pngs.extend(encode_pngs(answer.images))
        if verifier is not None:  # kept to read back before encoding: no PNG to decode
            read.append(np.asarray(answer.images, dtype=bool))
    classes = np.concatenate(classes)
    is_cf = kinds[rows_of] == "counterfactual"
    columns = {
        "query_id": table.column("query_id").take(pa.array(rows_of)),
        "sample": pa.array(sample, pa.int64()),
        "kind": pa.array(kinds[rows_of].astype(str), pa.string()),
    }
    for j, f in enumerate(FACTORS):
        columns[f] = pa.array(classes[:, j], pa.int64())
    for j, f in enumerate(FACTORS):
        columns[f"factual_{f}"] = pa.array(factual[rows_of, j], pa.int64(), mask=~is_cf)
    columns["image"] = pa.array(pngs, pa.binary())
    if verifier is not None:  # the whole call's answers at once: the readout batches them by size
        for name, values in verifier.columns(np.concatenate(read), classes, factual[rows_of]).items():
            columns[name] = pa.array(values)
    return pa.table(columns, schema=result_schema(verifier is not None))


def _true_images(scm: ImageSCM, source: np.ndarray, rows: np.ndarray, images: np.ndarray,
                 problems: dict) -> None:
    """The true image of each source_index row (once per query, not per sample).

    An index the ground truth lacks (an imported file without that row) fails only its row.
    """
    rows = np.asarray([i for i in rows if i not in problems], dtype=np.int64)
    if not len(rows):
        return
    try:
        images[rows] = np.asarray(scm.ground_truth.images(source[rows])).reshape(len(rows), -1)
    except ValueError:
        for i in rows:
            try:
                images[i] = np.asarray(scm.ground_truth.images(source[i:i + 1])).reshape(-1)
            except ValueError as exc:
                problems[i].append(f"source_index {source[i]}: no true image: {exc}")
