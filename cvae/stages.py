"""Stage records: which pipeline stages are finished, and from which inputs.

Each stage of the main job writes `_stage.json` into its output folder when it finishes:
`{"stage", "inputs", "fingerprint", "result"}`. A rerun reuses a stage when the record's
fingerprint equals that of the inputs the stage would use now and the stage's own
completion marker (manifest.json, _SUCCESS.json, ...) is there; otherwise it redoes it.
The fingerprint is a SHA-256 of the inputs' canonical JSON, and a stage's inputs hold the
fingerprints of the stages it reads, so a change anywhere redoes what depends on it and
nothing else. Files starting with `_` are skipped by every Parquet reader here, so the
record can live beside the stage's output.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cvae import fs

RECORD = "_stage.json"


def fingerprint(inputs: dict) -> str:
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_record(folder: str | Path) -> dict | None:
    """The stage record in `folder` (path or URI), or None when there is none or it is unreadable."""
    path = fs.join(folder, RECORD)
    try:
        if not fs.exists(path):
            return None
        record = json.loads(fs.read_bytes(path))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def write_record(folder: str | Path, stage: str, inputs: dict, result: dict | None = None) -> str:
    """Record `stage` in `folder` as made from `inputs` (result None: started, not finished);
    returns the inputs' fingerprint."""
    digest = fingerprint(inputs)
    record = {"stage": stage, "inputs": inputs, "fingerprint": digest, "result": result}
    with fs.local_output(folder) as local:  # a URI: only the record is uploaded
        fs.write_text_atomic(Path(local) / RECORD, json.dumps(record, indent=2, default=str))
    return digest


def finished(folder: str | Path, inputs: dict, marker: str) -> dict | None:
    """The record of a finished stage in `folder` made from exactly `inputs` whose marker
    file is still there, else None."""
    record = read_record(folder)
    if record is None or record.get("result") is None or record["fingerprint"] != fingerprint(inputs):
        return None
    return record if fs.exists(fs.join(folder, marker)) else None


def changed_keys(old: dict, new: dict) -> list[str]:
    """The top-level keys whose values differ between two input dicts."""
    return sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), sort_keys=True, default=str)
                  != json.dumps(new.get(k), sort_keys=True, default=str))


def file_digest(path: str | Path) -> str:
    """SHA-256 of one file (path or URI): what identifies a checkpoint's checkpoint.json."""
    return hashlib.sha256(fs.read_bytes(path)).hexdigest()
