"""Checkpoints: weights that load without unpickling code, plus the JSON to rebuild.

A checkpoint directory holds `model.pt` (a state dict read back with
`torch.load(..., weights_only=True)`, which refuses any pickled code) and
`checkpoint.json` (model spec, config, data manifest summary, epoch, metrics).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from cvae.model import SupervisedVAE

WEIGHTS = "model.pt"
META = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or refused for safety."""


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """Write weights and metadata into `directory`; `meta` must be JSON-serialisable."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    meta = {**meta, "model": module.spec()}
    # Write the JSON atomically: a reader never sees half a file.
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    os.replace(fh.name, directory / META)
    return directory


def load_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[SupervisedVAE, dict]:
    """Rebuild the model from a checkpoint directory; never executes pickled code."""
    directory = Path(directory)
    meta = load_meta(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"not a checkpoint: {weights} is missing")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{weights}: refused to load: it holds objects other than tensors "
            f"(weights_only loading refuses pickled code): {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{weights}: cannot be read as weights: {exc}") from None
    try:
        model = SupervisedVAE(**meta["model"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the model spec: {exc}") from None
    return model.to(device).eval(), meta
