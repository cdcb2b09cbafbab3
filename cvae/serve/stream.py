"""Stream (factual image, counterfactual image, intervention) triples from a dataset folder
into a PyTorch training loop.

    from torch.utils.data import DataLoader
    from cvae.serve.stream import CounterfactualPairs

    pairs = CounterfactualPairs("runs/any/answers", verified_only=True)
    for batch in DataLoader(pairs, batch_size=256, num_workers=2):
        batch["factual"], batch["counterfactual"]   # (256, 1, 64, 64) float32 0/1
        batch["do"]                                 # (256, 5) int64: the class done per factor, -1: none

`CounterfactualPairs` is an `IterableDataset` over the committed Parquet parts of a
`jobs.query` output (the files its `_SUCCESS.json` lists, so never a half-written output):
each DataLoader worker reads its own share of the parts (part k goes to worker k mod
workers), one row group at a time, so no row is read twice and memory stays at one row
group per worker. Only counterfactual rows are pairs (the others have no factual world).
The factual image is the ground truth of the row's `factual_*` classes (the renderer's);
the counterfactual is the row's `image`. The intervention `do` comes from the query set
when `queries` is given (joined on query_id, the do_* columns: exact, null interventions
included), else it is read off the two worlds: every factor whose class differs (a null
intervention reads as none).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cvae import fs as cfs
from cvae.data.grid import FACTORS, classes_to_index
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import decode_image

SUCCESS = "_SUCCESS.json"


def committed_parts(folder: str) -> list[str]:
    """The result parts a committed output lists (FileNotFoundError naming the folder otherwise)."""
    marker = cfs.join(folder, SUCCESS)
    try:
        summary = json.loads(cfs.read_bytes(marker))
    except (FileNotFoundError, OSError):
        raise FileNotFoundError(f"{folder}: no committed query output ({SUCCESS} missing)") from None
    names = (summary.get("committed") or {}).get("results")
    if names is None:
        raise FileNotFoundError(f"{marker}: lists no committed results (written by an older cvae?)")
    return [cfs.join(folder, "results", name) for name in names]


class CounterfactualPairs(IterableDataset):
    """Counterfactual rows of a dataset folder as dicts of tensors: `factual`, `counterfactual`
    ((1, 64, 64) float32), `do`, `factual_classes`, `classes` ((5,) int64)."""

    def __init__(self, folder: str, queries: str | None = None, verified_only: bool = False):
        self.parts = committed_parts(str(folder))
        self.verified_only = verified_only
        self.do = None
        if queries is not None:  # query_id -> do_* (about 60 bytes a query)
            fs, path = cfs.resolve(queries)
            self.do = pq.read_table(path, filesystem=fs, columns=["query_id"] + [f"do_{f}" for f in FACTORS])

    def my_parts(self) -> list[str]:
        """This DataLoader worker's share of the parts (all of them in the main process)."""
        info = get_worker_info()
        return self.parts if info is None else self.parts[info.id::info.num_workers]

    def __iter__(self):
        truth = GroundTruth("render")
        for part in self.my_parts():
            fs, path = cfs.resolve(part)
            with fs.open_input_file(path) as fh:
                reader = pq.ParquetFile(fh)
                for group in range(reader.num_row_groups):
                    yield from self._rows(reader.read_row_group(group), truth)

    def _rows(self, table: pa.Table, truth):
        keep = pc.is_valid(table.column("factual_shape"))
        if self.verified_only:
            if "verified" not in table.column_names:
                raise ValueError("verified_only: this output was not verified (run jobs.query --verify)")
            keep = pc.and_(keep, pc.fill_null(table.column("verified"), False))
        table = table.filter(keep)
        if not table.num_rows:
            return
        factual = np.stack([table.column(f"factual_{f}").to_numpy() for f in FACTORS], 1)
        classes = np.stack([table.column(f).to_numpy() for f in FACTORS], 1)
        do = self._interventions(table, factual, classes)
        factual_images = truth.images(classes_to_index(factual))
        for i, png in enumerate(table.column("image").to_pylist()):
            yield {"factual": torch.from_numpy(factual_images[i][None].astype(np.float32)),
                   "counterfactual": torch.from_numpy(decode_image(png)[None].astype(np.float32)),
                   "do": torch.from_numpy(do[i]), "factual_classes": torch.from_numpy(factual[i]),
                   "classes": torch.from_numpy(classes[i])}

    def _interventions(self, table: pa.Table, factual: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(n, 5) int64 do values, -1 where a factor is not intervened on."""
        if self.do is None:
            return np.where(classes != factual, classes, -1).astype(np.int64)
        joined = table.select(["query_id"]).append_column("_row", pa.array(np.arange(table.num_rows)))
        joined = joined.join(self.do, "query_id", join_type="left outer").sort_by("_row")
        return np.stack([pc.fill_null(joined.column(f"do_{f}"), -1).to_numpy() for f in FACTORS], 1).astype(np.int64)
