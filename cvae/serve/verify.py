"""Verified rows: every answer read back over the whole grid, in the query actors.

`jobs.query --verify` (`run_query_job(verify=True)`) hands each query actor a `Verifier`:
the evaluation's readout (`cvae.data.readout.Readout`, the nearest ground-truth image
by IoU among every image the ground truth has, exact) built once per actor. Each answer is
read back before it is encoded, and its result row gains VERIFY_FIELDS (cvae.serve.schema):

- `read_<factor>`: the class the answer reads back as. Classes whose images are
  pixel-identical (a square a quarter turn apart) are one answer, so several may read back;
  the row's own class is given when it is among them, else the lowest. -1: the factor reads
  back nothing (an empty image, no overlap with any grid image, or a tie between different
  images that disagree on it);
- `read_iou`: IoU with the nearest grid image (1.0: the answer is a grid image; 0.0: empty);
- `verified`: every factor reads back as the row's own class (its `shape` .. `pos_y`, the
  world the answer was generated in), as the evaluation counts effectiveness and
  preservation (`ReadBack.hits`). A blank image reads back nothing and is never verified;
  an image of another world is verified only if it is pixel-identical to the row's own.

`--keep verified` (`keep="verified"`) writes the verified rows to `results/` and the others
to `rejected/`, with the same schema; `_SUCCESS.json` counts both (`split_rows`, `counts`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvae.data.grid import FACTORS, classes_to_index
from cvae.data.readout import Readout
from cvae.serve.schema import ERROR_SCHEMA, result_schema

KEEP = ("all", "verified")  # --keep: every answered row in results/, or only the verified ones
REJECTED = "rejected"  # the folder of unverified rows under --keep verified


class Verifier:
    """Reads answers back over a readout's candidates (the whole grid for rendered data)."""

    def __init__(self, readout):
        self.readout = readout

    @classmethod
    def of(cls, scm) -> Verifier:
        """The verifier of an ImageSCM's ground truth (its data manifest's); the readout index
        (about 440 MB for the whole grid) is built once per process."""
        if scm.ground_truth is None:
            raise ValueError("verifying answers needs the checkpoint's ground truth (its data manifest)")
        return cls(Readout.of(scm.ground_truth))

    def columns(self, images: np.ndarray, classes: np.ndarray, factual: np.ndarray) -> dict[str, np.ndarray]:
        """The VERIFY_FIELDS of (m, 64, 64) answers generated in worlds `classes` (m, 5);
        `factual` (m, 5), -1 for rows without a factual world, is a hint only (a failed
        intervention reads back near its factual image), which never changes the result."""
        classes = np.asarray(classes, dtype=np.int64)
        factual = np.asarray(factual, dtype=np.int64)
        has_factual = (factual >= 0).all(1)
        hints = np.stack([classes_to_index(classes),
                          np.where(has_factual, classes_to_index(np.maximum(factual, 0)), -1)], axis=1)
        back = self.readout.read(images, hints)
        hits = back.hits(classes)
        read = np.where(hits, classes, back.classes())
        out = {f"read_{f}": read[:, j] for j, f in enumerate(FACTORS)}
        out["read_iou"] = back.iou.astype(np.float64)
        out["verified"] = hits.all(1) & (back.iou > 0)
        return out


def check_keep(keep: str, verify: bool) -> bool:
    """Whether to verify: `keep="verified"` implies it. ValueError naming a bad `keep`."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    return verify or keep == "verified"


def folders(keep: str) -> tuple[str, ...]:
    """The output folders a job writes: results/ and errors/, and rejected/ under keep=verified."""
    return ("results", "errors", REJECTED) if keep == "verified" else ("results", "errors")


def split_rows(table: pa.Table, verify: bool, keep: str) -> list[tuple[str, pa.Table]]:
    """A combined block (result and error rows, told apart by `error`) split into
    (folder, rows in that folder's schema)."""
    is_error = pc.is_valid(table.column("error"))
    schema = result_schema(verify)
    answered = table.filter(pc.invert(is_error)).select(schema.names).cast(schema)
    parts = [("errors", table.filter(is_error).select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA))]
    if keep == "verified":
        verified = pc.fill_null(answered.column("verified"), False)
        parts += [("results", answered.filter(verified)), (REJECTED, answered.filter(pc.invert(verified)))]
    else:
        parts.append(("results", answered))
    return parts


def verified_count(folder: str, part: pa.Table) -> int:
    """Verified rows of a written part (0 for errors and for unverified output)."""
    if folder == "errors" or "verified" not in part.column_names:
        return 0
    return int(pc.sum(pc.fill_null(part.column("verified"), False)).as_py() or 0)


def counts(reported: list, verify: bool, keep: str) -> dict:
    """The summary's row and file counts from the write tasks' (file, rows, off_grid, verified)."""
    out = {}
    for folder in folders(keep):
        mine = [item for item in reported if item[0].startswith(f"{folder}/")]
        key = folder.rstrip("s")  # results -> result, errors -> error, rejected -> rejected
        out[f"{key}_rows"] = sum(item[1] for item in mine)
        out[f"{key}_files"] = len(mine)
    out["off_grid_rows"] = sum(item[2] for item in reported)
    if verify:
        out["verified_rows"] = sum(item[3] for item in reported)
        answered = out["result_rows"] + out.get("rejected_rows", 0)
        out["verified_share"] = round(out["verified_rows"] / answered, 6) if answered else None
    out["verify"], out["keep"] = verify, keep
    return out
