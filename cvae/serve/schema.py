"""The Parquet contracts of queries, results and errors (docs/contracts.md), in one place.

Pure: only pyarrow and the factor names, so every module that writes or reads these files
(the query generator, the engine, the families, the API) can import them without pulling
in the SCM.
"""
from __future__ import annotations

import pyarrow as pa

from cvae.data.grid import FACTORS

KINDS = ("condition", "intervene", "counterfactual")
INT_COLUMNS = (["source_index"] + list(FACTORS) + [f"do_{f}" for f in FACTORS]
               + [f"given_{f}" for f in FACTORS] + ["num_samples", "seed"])
QUERY_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("kind", pa.string()), ("source_index", pa.int64()), ("image", pa.binary())]
    + [(c, pa.int64()) for c in INT_COLUMNS if c != "source_index"]
)
RESULT_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("sample", pa.int64()), ("kind", pa.string())]
    + [(f, pa.int64()) for f in FACTORS]
    + [(f"factual_{f}", pa.int64()) for f in FACTORS]
    + [("image", pa.binary())]
)
ERROR_SCHEMA = pa.schema([("query_id", pa.string()), ("error", pa.string())])
# Optional result columns, present only when the job verifies its answers (jobs.query
# --verify, cvae.serve.verify): each answer read back over the whole grid by the evaluation's
# readout. read_<factor>: the class it reads back as (the row's own class when that is among
# them, pixel-identical twins; -1: reads back nothing); read_iou: IoU with the nearest grid
# image; verified: every factor reads back as the row's own class.
VERIFY_FIELDS = ([pa.field(f"read_{f}", pa.int64()) for f in FACTORS]
                 + [pa.field("read_iou", pa.float64()), pa.field("verified", pa.bool_())])
VERIFIED_RESULT_SCHEMA = pa.schema(list(RESULT_SCHEMA) + VERIFY_FIELDS)


def result_schema(verify: bool) -> pa.Schema:
    """The result rows' schema: RESULT_SCHEMA, plus VERIFY_FIELDS when the answers are verified."""
    return VERIFIED_RESULT_SCHEMA if verify else RESULT_SCHEMA
