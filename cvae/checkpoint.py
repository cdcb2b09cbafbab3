"""Checkpoints: weights that load without unpickling code, plus the JSON to rebuild.

A checkpoint directory holds `model.pt` (a state dict read back with
`torch.load(..., weights_only=True)`, which refuses any pickled code),
`checkpoint.json` (model spec, config, data manifest summary, epoch, metrics) and,
for checkpoints training can resume from, `optimizer.pt` (the optimizer's state dict:
tensors and plain containers only, so it loads with `weights_only=True` too).
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
OPTIMIZER = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or refused for safety."""


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write weights (and optimizer state) and metadata into `directory`; `meta` must be
    JSON-serialisable."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    if optimizer is not None:
        torch.save(_to_cpu(optimizer.state_dict()), directory / OPTIMIZER)
    meta = {**meta, "model": module.spec()}
    # Write the JSON atomically: a reader never sees half a file.
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    os.replace(fh.name, directory / META)
    return directory


def load_meta(directory: str | Path) -> dict:
    """The checkpoint's JSON, from a local folder or a URI that pyarrow's filesystems handle."""
    from cvae import fs

    path = fs.join(directory, META)
    try:
        text = fs.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"not a checkpoint: {path} is missing") from None
    except (ValueError, OSError) as exc:  # an unknown scheme, no access
        raise CheckpointError(f"not a checkpoint: {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[SupervisedVAE, dict]:
    """Rebuild the model from a checkpoint directory; never executes pickled code."""
    directory = Path(directory)
    meta = load_meta(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"not a checkpoint: {weights} is missing")
    state = _load_tensors(weights, device)
    try:
        model = SupervisedVAE(**meta["model"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the model spec: {exc}") from None
    return model.to(device).eval(), meta


def load_optimizer_state(directory: str | Path, device: str | torch.device = "cpu") -> dict | None:
    """The optimizer state dict saved beside the weights, or None when there is none."""
    path = Path(directory) / OPTIMIZER
    return _load_tensors(path, device) if path.is_file() else None


def _load_tensors(path: Path, device: str | torch.device) -> dict:
    """torch.load with weights_only=True: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors "
            f"(weights_only loading refuses pickled code): {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{path}: cannot be read as weights: {exc}") from None


def _to_cpu(value):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
