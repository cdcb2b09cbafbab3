"""Conditioning versus intervening, measured: query families answered by the model and
compared with the exact distributions of the SCM that generated the data.

A family names a target factor and one value of another factor, for example
`{target: shape, factor: scale, value: 5}`, and is asked two ways: P(shape | scale = 5)
(`condition` queries) and P(shape | do(scale = 5)) (`intervene` queries), `samples` times
each. The rows are ordinary queries (query schema; query_id `family<i>-<kind>-<row>`,
each row at most `max_samples` samples), answered by the same query job as every other
row; `_families.json` beside them in the query folder says what they ask, so
`jobs.evaluate` finds them without being told.

Measured per family and kind (`tv_table`):
- `tv_images`: total variation between the truth and the distribution of the target as
  the answer images read back (`cvae.data.readout`; an answer whose target reads back no class
  puts its mass on no class, so all of it counts as error; pixel-identical classes share
  it). This is what the model's pictures show.
- `tv_classes`: the same for the result rows' own factor columns, which come from the
  exact factor posterior: a correctness check of the sampler (near the noise floor by
  construction when the model's tables are the generating ones).
- `tv_condition_vs_intervene`: between the two exact truths: how far apart the two
  questions are in this world (0 where they coincide, as for a parent's effect on its
  child without confounding).
- `tv_noise`: the mean TV of `samples` exact draws from the truth itself: the floor that
  sampling alone gives at this sample size.

The truth is `FactorSCM.distribution` of the generating SCM (`FactorSCM.of_dataset`), not
the checkpoint's own tables.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvae import fs
from cvae.config import Family, FamilyError, parse_family  # noqa: F401  (the family spec, where the config checks it)
from cvae.data.grid import FACTOR_SIZES, FACTORS, SHAPE_NAMES
from cvae.rng import hash_parts
from cvae.serve.schema import QUERY_SCHEMA

FAMILY_KINDS = ("condition", "intervene")
FAMILIES_FILE = "_families.json"
QUERY_FILE = "families.parquet"
_ID = re.compile(r"^family(\d+)-(condition|intervene)-\d+$")


def family_queries(families: list[Family], samples: int, seed: int, max_samples: int) -> pa.Table:
    """The query rows of every family and kind: `samples` samples each, in rows of at most
    `max_samples` (the query job's cap per row). Seeds are hashed from (seed, family, kind, row)."""
    ids, kinds, nums, seeds = [], [], [], []
    on = {f"{p}_{f}": [] for p in ("given", "do") for f in FACTORS}
    for i, family in enumerate(families):
        for k, kind in enumerate(FAMILY_KINDS):
            for r, start in enumerate(range(0, samples, max_samples)):
                ids.append(f"family{i}-{kind}-{r:04d}")
                kinds.append(kind)
                nums.append(min(max_samples, samples - start))
                seeds.append(int(hash_parts(seed, i, k, r).astype(np.int64)))
                for column, values in on.items():
                    prefix = "given" if kind == "condition" else "do"
                    values.append(family.value if column == f"{prefix}_{family.factor}" else None)
    n = len(ids)
    columns = {"query_id": ids, "kind": kinds, "num_samples": nums, "seed": seeds, **on}
    return pa.table({name: pa.array(columns[name], field.type) if name in columns else pa.nulls(n, field.type)
                     for name, field in zip(QUERY_SCHEMA.names, QUERY_SCHEMA)}, schema=QUERY_SCHEMA)


def write_family_queries(families: list[Family], samples: int, seed: int, max_samples: int,
                         folder: str | Path) -> dict:
    """Write `families.parquet` and `_families.json` into a local query folder (or remove
    both when there are no families, so a folder never holds a stale set)."""
    folder = Path(folder)
    if not families:
        for name in (QUERY_FILE, FAMILIES_FILE):
            (folder / name).unlink(missing_ok=True)
        return {"families": 0, "queries": 0}
    table = family_queries(families, samples, seed, max_samples)
    tmp = folder / f".{QUERY_FILE}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(folder / QUERY_FILE)
    about = {"samples": samples, "families": [f.to_dict() for f in families]}
    fs.write_text_atomic(folder / FAMILIES_FILE, json.dumps(about, indent=2))
    return {"families": len(families), "queries": table.num_rows}


def read_families(folder: str | Path) -> tuple[list[Family], int] | None:
    """The families a local query folder asks (and samples per kind), or None."""
    path = Path(folder) / FAMILIES_FILE
    if not path.is_file():
        return None
    about = json.loads(path.read_text())
    families = [parse_family(e, f"{path}: families[{i}]") for i, e in enumerate(about["families"])]
    return families, int(about["samples"])


# ----------------------------------------------------------------------------- measuring

class FamilyTally:
    """Per (family, kind): the target's classes as read back (mass on no class last) and
    as the result rows give them."""

    def __init__(self, families: list[Family]):
        self.families = families
        self.read = {(i, k): np.zeros(FACTOR_SIZES[f.target] + 1) for i, f in enumerate(families)
                     for k in FAMILY_KINDS}
        self.classes = {key: np.zeros(len(v) - 1) for key, v in self.read.items()}

    def add(self, query_ids: list[str], classes: np.ndarray, readback) -> int:
        """Count a batch of family result rows: (n,) query ids, (n, 5) result classes and
        the answers' `ReadBack`. Returns the number of rows that belong to no family."""
        stray = 0
        for row, qid in enumerate(query_ids):
            match = _ID.match(qid)
            if not match or int(match[1]) >= len(self.families):
                stray += 1
                continue
            i, kind = int(match[1]), match[2]
            t = FACTORS.index(self.families[i].target)
            read = readback.reads[row, t, :FACTOR_SIZES[self.families[i].target]].astype(float)
            counts = self.read[(i, kind)]
            if read.sum() > 0:
                counts[:-1] += read / read.sum()  # pixel-identical classes share the answer
            else:
                counts[-1] += 1
            self.classes[(i, kind)][classes[row, t]] += 1
        return stray


def tv(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation between two distributions over the same classes (a trailing
    'no class' bin on either side counts in full)."""
    size = max(len(p), len(q))
    p, q = np.pad(p, (0, size - len(p))), np.pad(q, (0, size - len(q)))
    return 0.5 * float(np.abs(p - q).sum())


def noise_floor(truth: np.ndarray, samples: int, seed: int = 0, draws: int = 200) -> float:
    """Mean TV between `truth` and the histogram of `samples` draws from it."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(samples, truth, size=draws) / samples
    return float(0.5 * np.abs(counts - truth).sum(1).mean())


def tv_table(tally: FamilyTally, scm) -> list[dict]:
    """One row per family and kind (see the module docstring); `scm` is the generating FactorSCM."""
    rows = []
    for i, family in enumerate(tally.families):
        truths = {"condition": scm.distribution(family.target, given={family.factor: family.value}),
                  "intervene": scm.distribution(family.target, do={family.factor: family.value})}
        apart = tv(truths["condition"], truths["intervene"])
        for kind in FAMILY_KINDS:
            read, classes = tally.read[(i, kind)], tally.classes[(i, kind)]
            n = int(classes.sum())
            rows.append({
                "family": i, "kind": kind, "question": family.question(kind), "target": family.target,
                "samples": n,
                "tv_images": None if n == 0 else round(tv(read / n, truths[kind]), 4),
                "tv_classes": None if n == 0 else round(tv(classes / n, truths[kind]), 4),
                "tv_condition_vs_intervene": round(apart, 4),
                "tv_noise": None if n == 0 else round(noise_floor(truths[kind], n, seed=i), 4),
                "read_nothing": None if n == 0 else round(float(read[-1] / n), 4),
                "truth": [round(float(p), 4) for p in truths[kind]],
                "answered": None if n == 0 else [round(float(p), 4) for p in read[:-1] / n],
            })
    return rows


def markdown_table(rows: list[dict], goal: float = 0.05) -> list[str]:
    lines = ["| question | samples | TV images | TV classes | TV condition vs do (truth) | "
             "sampling floor | read nothing |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mark = "" if r["tv_images"] is None or r["tv_images"] <= goal else " (over goal)"
        question = r["question"].replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| {question} | {r['samples']} | {_fmt(r['tv_images'])}{mark} | "
                     f"{_fmt(r['tv_classes'])} | {_fmt(r['tv_condition_vs_intervene'])} | "
                     f"{_fmt(r['tv_noise'])} | {_fmt(r['read_nothing'])} |")
    return lines


def save_figure(path: str | Path, rows: list[dict]) -> None:
    """Bars per family: the truth and the read-back answers, conditioned and intervened."""
    from cvae.figures import _import_pyplot  # matplotlib only when a figure is drawn

    plt = _import_pyplot()
    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for ax, i in zip(axes[0], families):
        mine = {r["kind"]: r for r in rows if r["family"] == i}
        k = len(mine["condition"]["truth"])
        x = np.arange(k)
        width = 0.2
        for j, (kind, source, color, hatch) in enumerate([
                ("condition", "truth", "#4477aa", ""), ("condition", "answered", "#88bbee", "//"),
                ("intervene", "truth", "#cc6677", ""), ("intervene", "answered", "#ee99aa", "//")]):
            values = mine[kind][source] or [0.0] * k
            ax.bar(x + (j - 1.5) * width, values, width, color=color, hatch=hatch,
                   label=f"{'given' if kind == 'condition' else 'do'}: {source}")
        target = mine["condition"]["target"]
        ax.set_xticks(x, SHAPE_NAMES if target == "shape" else [str(c) for c in range(k)])
        ax.set_title(mine["condition"]["question"].replace("P(", "").replace(")", "")
                     + f"\nTV given {_fmt(mine['condition']['tv_images'])}, "
                     f"do {_fmt(mine['intervene']['tv_images'])}", fontsize=9)
        ax.set_xlabel(target)
    axes[0][0].set_ylabel("probability")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"
