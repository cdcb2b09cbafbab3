"""The Parquet contracts of queries, results and errors (../shared/DESIGN.md), in one place.

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
