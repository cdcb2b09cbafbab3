"""The output folder's README.md: a Hugging Face dataset card, written with every commit.

    ---                                  YAML: configs (results/ as the train split; rejected/
    license, task_categories, ...        as a config of its own), features (`image` as Image),
    configs: [...]                       license, task category, size category
    dataset_info: {features: [...]}
    ---
    # provenance, counts, schema         for people

So `datasets.load_dataset(FOLDER)` loads the results with decoded images and no further
arguments, while pyarrow, pandas, polars and DuckDB read `FOLDER/results` as before (the
card is beside the Parquet folders, never in them). `provenance` gathers, in the driver
before the job starts, what the card says about where the rows come from: the checkpoint's
SHA-256 and its model card, the git commit of the code, the query set's spec and seed
(its `_summary.json`, written by jobs.make_queries) and the command.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pyarrow as pa

from cvae import fs as cfs
from cvae.serve.schema import result_schema

CARD = "README.md"
NO_CARD = "none (a training checkpoint: its checkpoint.json holds the config and history)"
LICENSE = "apache-2.0"  # dSprites' own license (github.com/deepmind/dsprites-dataset)
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool",
          pa.binary(): "image"}
ABOUT = {
    "query_id": "the query's id (jobs.make_queries: `<source_index>-do_<factor>=<class>`)",
    "sample": "0 .. num_samples - 1: one row per sample of a query",
    "kind": "counterfactual, intervene or condition",
    "image": "the answer: a 64x64 1-bit PNG (decoded by `datasets` as a PIL image)",
    "read_iou": "IoU of the answer with its nearest grid image (--verify)",
    "verified": "every factor of the answer reads back as the row's own class (--verify)",
}


def provenance(checkpoint: str, pretrained: bool, queries: str, command: str | None) -> dict:
    """Where the rows come from, for the card and _SUCCESS.json."""
    # Here, not at the top: the write tasks import this module (through cvae.serve.commit),
    # and cvae.model.checkpoint would cost each of them torch's 1.5 s import.
    from cvae.model.checkpoint import META, WEIGHTS

    out = {"checkpoint": "pretrained" if pretrained else str(checkpoint),
           "checkpoint_sha256": {name: _sha256(cfs.join(checkpoint, name)) for name in (WEIGHTS, META)},
           "model_card": _model_card(checkpoint, pretrained), "commit": _commit(),
           "queries": str(queries), "command": command}
    try:
        summary = json.loads(cfs.read_bytes(cfs.join(queries, "_summary.json")))
        out["query_spec"] = summary.get("spec")
    except (OSError, ValueError):
        out["query_spec"] = None  # not a jobs.make_queries folder (or a single file)
    return out


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(cfs.read_bytes(path)).hexdigest()
    except (OSError, ValueError):
        return None


def _model_card(checkpoint: str, pretrained: bool) -> str | None:
    if pretrained:
        return "cvae/pretrained/MODEL_CARD.md (the pretrained whole-grid model shipped with cvae)"
    card = cfs.join(checkpoint, "MODEL_CARD.md")
    try:
        cfs.read_bytes(card)
        return card
    except (OSError, ValueError):
        return None


def _commit() -> str | None:
    """The git commit of this code (with `-dirty` for uncommitted changes), if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def size_category(rows: int) -> str:
    return next((name for limit, name in SIZES if rows < limit), "n>1T")


def header(summary: dict) -> str:
    """The card's YAML header: configs, features, license, task and size categories."""
    features = "".join(f"    - name: {field.name}\n      dtype: {DTYPES[field.type]}\n"
                       for field in result_schema(bool(summary.get("verify"))))
    configs = "  - config_name: default\n    data_files:\n      - split: train\n        path: results/*.parquet\n"
    if summary.get("keep") == "verified":
        configs += ("  - config_name: rejected\n    data_files:\n      - split: train\n"
                    "        path: rejected/*.parquet\n")
    rows = summary.get("result_rows", 0)
    return (f"---\nlicense: {LICENSE}\ntask_categories:\n  - image-to-image\ntags:\n  - counterfactual\n"
            f"  - causal-inference\n  - dsprites\n  - synthetic\nsize_categories:\n  - {size_category(rows)}\n"
            f"configs:\n{configs}dataset_info:\n  features:\n{features}---\n")


def dataset_card(summary: dict, about: dict | None) -> str:
    """The whole README.md of an output folder with this _SUCCESS.json `summary`."""
    about = about or {}
    return header(summary) + "\n".join(_body(summary, about) + _schema(summary)) + "\n"


def _body(summary: dict, about: dict) -> list[str]:
    verify = summary.get("verify")
    lines = ["# Counterfactual dSprites pairs", "",
             "Answers of cvae's structural causal model (a causal VAE of dSprites) to the queries below, "
             "one row per sample: the factual world (`factual_*`, null except for counterfactuals), the "
             "world the answer was generated in (`shape` .. `pos_y`) and the answer image.", "",
             "```python", "from datasets import load_dataset", "",
             'pairs = load_dataset("THIS_FOLDER", split="train")   # images decoded as PIL images',
             "```", "", "## Provenance", "",
             f"- command: `{about.get('command') or 'cvae.serve.engine.run_query_job'}`",
             f"- checkpoint: `{about.get('checkpoint')}`; SHA-256 of its files: "
             + ", ".join(f"`{k}` {v}" for k, v in (about.get("checkpoint_sha256") or {}).items()),
             f"- model card: {about.get('model_card') or NO_CARD}",
             f"- code: git commit {about.get('commit') or 'unknown (not a git checkout)'}",
             f"- queries: `{about.get('queries')}`"]
    spec = about.get("query_spec")
    if spec:
        lines.append(f"- query spec (jobs.make_queries, seed {spec.get('seed')}): `{json.dumps(spec)}`")
    else:
        lines.append("- query spec: unknown (not written by jobs.make_queries); per-query seeds are in the queries")
    lines += ["", "## Counts", "", f"- queries: {summary.get('queries', 0):,}",
              f"- result rows (`results/`): {summary.get('result_rows', 0):,}",
              f"- refused queries (`errors/`, each with its reason): {summary.get('error_rows', 0):,}"]
    if verify:
        answered = summary.get("result_rows", 0) + summary.get("rejected_rows", 0)
        share = summary.get("verified_share")
        lines.append(f"- verified: {summary.get('verified_rows', 0):,} of {answered:,} answered rows"
                     + (f" ({share:.1%})" if share is not None else "") + ": each read back over the whole "
                     "737,280-image grid (nearest image by IoU, exact) as its own classes")
        if summary.get("keep") == "verified":
            lines.append(f"- rejected (`rejected/`, config `rejected`, same schema): "
                         f"{summary.get('rejected_rows', 0):,} rows that did not read back as their own classes; "
                         "`results/` holds only verified rows")
    else:
        lines.append("- verified: not checked (`jobs.query --verify` reads every answer back)")
    return lines


def _schema(summary: dict) -> list[str]:
    lines = ["", "## Schema", "", "| column | type | meaning |", "| --- | --- | --- |"]
    for field in result_schema(bool(summary.get("verify"))):
        name = field.name
        if name in ABOUT:
            meaning = ABOUT[name]
        elif name.startswith("factual_"):
            meaning = f"the factual world's {name[8:]} class (null except for counterfactuals)"
        elif name.startswith("read_"):
            meaning = f"the {name[5:]} class the answer reads back as (-1: none; --verify)"
        else:
            meaning = f"the {name} class of the world the answer was generated in"
        lines.append(f"| `{name}` | {DTYPES[field.type]} | {meaning} |")
    lines += ["", "Class codes follow dSprites: shape 0 square, 1 ellipse, 2 heart; scale 0..5; orientation "
              "0..39; pos_x, pos_y 0..31. The whole record of the run: `_SUCCESS.json`."]
    return lines
