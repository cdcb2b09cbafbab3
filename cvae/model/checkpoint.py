"""Checkpoints: weights that load without unpickling code, plus the JSON to rebuild.

A checkpoint directory holds `model.pt` (a state dict read back with
`torch.load(..., weights_only=True)`, which refuses any pickled code),
`checkpoint.json` (model spec, config, data manifest summary, epoch, metrics) and,
for checkpoints training can resume from, `optimizer.pt` (the optimizer's state dict:
tensors and plain containers only, so it loads with `weights_only=True` too).

Wherever a checkpoint path is taken (`jobs.query`, `jobs.evaluate`, `run_query_job`,
`evaluate`), `resolve_checkpoint` also accepts a training run folder: one holding
`checkpoint_epoch_*` folders (`runs/local/train/local`), or one whose only run is one level
down (`runs/local/train`). It takes the run's best checkpoint (lowest validation loss, else
lowest test loss, else the latest epoch) and says which in one line. `check_checkpoint`
loads a checkpoint once in the driver, so a missing, corrupt or malicious `model.pt` is
refused with one line before any Ray work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from cvae import fs
from cvae.data.grid import FACTORS, ModelGrid
from cvae.data.groundtruth import GroundTruth
from cvae.errors import CvaeError, DataError
from cvae.model.factors import FactorSCM
from cvae.model.networks import SupervisedVAE

WEIGHTS = "model.pt"
META = "checkpoint.json"
OPTIMIZER = "optimizer.pt"
EPOCH_PREFIX = "checkpoint_epoch_"  # the trainer's checkpoint folders inside a run folder
# The name that stands for the whole-grid model shipped inside the package (cvae/pretrained/,
# written by `python -m jobs.export_pretrained`), wherever a checkpoint is asked for.
PRETRAINED = "pretrained"
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
CHECKSUMS = "SHA256SUMS"  # beside the pretrained files: "<sha256>  <file>" per line


class CheckpointError(CvaeError):
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


def resolve_checkpoint(path: str | Path, say: Callable[[str], None] | None = None) -> str:
    """The checkpoint folder `path` names (path or URI), returned as given; or, for a training
    run folder, its best checkpoint, announced with one line through `say` (default: logged at INFO).

    A run folder holds `checkpoint_epoch_*` folders directly, or one level down (the
    trainer's output folder holding `<run name>/`). The best is the one with the lowest
    `validation_loss` in its checkpoint.json `metrics`, else the lowest `test_loss`, else
    the latest epoch; ties go to the later epoch. Raises CheckpointError naming the path and
    what was expected otherwise.
    """
    if str(path) == PRETRAINED:
        checkpoint = str(pretrained_checkpoint())
        (say or _log)(f"checkpoint: {checkpoint} (the pretrained whole-grid model, checksums verified)")
        return checkpoint
    expected = (f"expected a checkpoint folder (holding {META} and {WEIGHTS}) or a training run "
                f"folder (holding {EPOCH_PREFIX}* folders, directly or one level down)")
    try:
        filesystem, root = fs.resolve(path)
        info = filesystem.get_file_info(root)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"not a checkpoint: {path}: cannot open: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise CheckpointError(f"not a checkpoint: {path}: no such folder; {expected}")
    if info.type != pafs.FileType.Directory:
        raise CheckpointError(f"not a checkpoint: {path}: not a folder; {expected}")
    root = root.rstrip("/")
    if filesystem.get_file_info(f"{root}/{META}").type == pafs.FileType.File:
        return str(path)
    epochs = _epoch_folders(filesystem, root)
    run = str(path)
    if not epochs:
        runs = [(sub.base_name, found) for sub in _subfolders(filesystem, root)
                if (found := _epoch_folders(filesystem, sub.path))]
        if not runs:
            raise CheckpointError(f"not a checkpoint: {path}: no {META} and no {EPOCH_PREFIX}* folders in it or one "
                                  f"level down; {expected}")
        if len(runs) > 1:
            names = ", ".join(name for name, _ in runs)
            raise CheckpointError(f"{path}: holds {len(runs)} training runs ({names}); pass one of "
                                  f"them, or one checkpoint folder")
        run = fs.join(path, runs[0][0])
        epochs = runs[0][1]
    candidates = []
    for name in epochs:
        try:
            candidates.append((fs.join(run, name), load_meta(fs.join(run, name))))
        except CheckpointError:
            continue  # a checkpoint cut short by a crash
    if not candidates:
        raise CheckpointError(f"{run}: none of its {len(epochs)} {EPOCH_PREFIX}* folders holds a "
                              f"readable {META}")
    chosen, why = _best(candidates)
    (say or _log)(f"checkpoint: {chosen} ({why}, of {len(candidates)} in {run})")
    return chosen


def check_checkpoint(path: str | Path) -> dict:
    """Load the checkpoint at `path` (path or URI) once, on the CPU, and return its meta.

    Raises CheckpointError, naming the file, for a missing or malformed checkpoint.json or
    a missing, truncated or malicious model.pt (never executed), and for weights that do
    not fit the model spec: the driver calls this before starting Ray or any actor.
    """
    meta = load_meta(path)  # a missing or broken checkpoint.json, named as given
    _check_world(path, meta)
    if not fs.is_uri(path):
        return load_checkpoint(path)[1]
    weights = fs.join(path, WEIGHTS)
    try:
        with fs.staged(path, only=[WEIGHTS, META]) as local:
            try:
                return load_checkpoint(local)[1]
            except CheckpointError as exc:  # name the URI, not the staged copy
                raise CheckpointError(str(exc).replace(str(local), str(path).rstrip("/"))) from None
    except FileNotFoundError:
        raise CheckpointError(f"not a checkpoint: {weights} is missing") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"not a checkpoint: {weights}: {exc}") from None


def pretrained_checkpoint() -> Path:
    """The pretrained checkpoint's folder, after checking every file against its SHA256SUMS:
    a missing or altered file is a CheckpointError naming it."""
    sums = PRETRAINED_DIR / CHECKSUMS
    if not sums.is_file():
        raise CheckpointError(f"no pretrained model in this installation: {sums} is missing "
                              f"(python -m jobs.export_pretrained writes it)")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = PRETRAINED_DIR / name.strip()
        if not path.is_file():
            raise CheckpointError(f"pretrained model: {path} is missing")
        found = hashlib.sha256(path.read_bytes()).hexdigest()
        if found != digest:
            raise CheckpointError(f"pretrained model: {path} does not match its checksum in {sums} "
                                  f"(sha256 {found}, expected {digest}): reinstall cvae")
    return PRETRAINED_DIR


def model_grid(meta: dict) -> ModelGrid:
    """The classes a checkpoint answers: its declared "grid", else (checkpoints from before
    the declaration) the grid of the data it was trained on, else the whole grid."""
    if meta.get("grid"):
        try:
            return ModelGrid.from_dict(meta["grid"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint.json: 'grid' is malformed: {exc}") from None
    if meta.get("manifest"):
        return ModelGrid.of_manifest(meta["manifest"])
    return ModelGrid.whole()


def checkpoint_scm(meta: dict) -> FactorSCM:
    """A checkpoint's factor SCM, its "scm" (to be limited to the classes it answers, its grid).

    Checkpoints saved before the SCM followed the declared grid (cvae.model.report) hold
    their config's tables limited to the training grid, which gave the classes coverage
    added no mass and refused every counterfactual of a source there. Where the saved SCM
    is exactly that (tables `uniform` or `given`, which need no data), the config's tables
    are returned whole instead; any other saved SCM is returned as it is."""
    saved = FactorSCM.from_dict(meta["scm"]) if meta.get("scm") else FactorSCM.uniform()
    config = (meta.get("config") or {}).get("scm") or {}
    if config.get("tables", "uniform") not in ("uniform", "given") or not meta.get("manifest"):
        return saved
    whole = FactorSCM.from_config(config)
    trained = whole.on_classes(ModelGrid.of_manifest(meta["manifest"]).classes)
    same = saved.edges == trained.edges and all(
        np.allclose(saved.tables[f], trained.tables[f], rtol=0, atol=1e-12) for f in FACTORS)
    return whole if same else saved


def _check_world(path: str | Path, meta: dict) -> None:
    """The checkpoint's data must be ground truth this cvae can draw: a model trained on
    another renderer's images (an older version) is refused, naming both versions."""
    if meta.get("manifest"):
        try:
            GroundTruth.from_manifest(meta["manifest"])
        except DataError as exc:
            raise CheckpointError(f"{path}: {exc}") from None


def _log(line: str) -> None:
    logging.getLogger(__name__).info("%s", line)


def _subfolders(filesystem: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    try:
        found = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    return sorted((f for f in found if f.type == pafs.FileType.Directory), key=lambda f: f.base_name)


def _epoch_folders(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    return [f.base_name for f in _subfolders(filesystem, folder) if f.base_name.startswith(EPOCH_PREFIX)]


def _epoch(checkpoint: str, meta: dict) -> int:
    epoch = meta.get("epoch", (meta.get("metrics") or {}).get("epoch"))
    if isinstance(epoch, int):
        return epoch
    digits = re.findall(r"\d+", checkpoint.rstrip("/").rsplit("/", 1)[-1])
    return int(digits[-1]) if digits else -1


# The best checkpoint, one rule for the trainer (which keeps the best few) and for readers
# (a run folder stands for its best checkpoint): the lowest validation loss, else the lowest
# test loss; a checkpoint that records no such loss ranks after every one that does; ties go
# to the later epoch.
BEST_BY = ("validation_loss", "test_loss")


def score_metric(counts: dict) -> str:
    """The metric a run's checkpoints are ranked on (lower is better): validation loss, or
    test loss when the dataset (its manifest's `counts`) has no validation rows."""
    return BEST_BY[0] if counts.get("validation", 0) > 0 else BEST_BY[1]


def score_key(value, epoch: int) -> tuple[int, float, int]:
    """The rule's sort key, best first: a finite score by its value, then anything else
    (not evaluated that epoch, NaN); ties to the later epoch."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return (1, 0.0, -epoch)
    return (0, float(value), -epoch)


def _best(candidates: list[tuple[str, dict]]) -> tuple[str, str]:
    """(checkpoint, why): lowest validation loss, else lowest test loss, else latest epoch."""
    for metric in BEST_BY:
        key, checkpoint = min((score_key((meta.get("metrics") or {}).get(metric), _epoch(c, meta)), c)
                              for c, meta in candidates)
        if key[0] == 0:
            return checkpoint, f"epoch {-key[2]}: the lowest {metric.replace('_', ' ')}, {key[1]:.4g}"
    checkpoint, meta = max(candidates, key=lambda cm: _epoch(*cm))
    return checkpoint, f"epoch {_epoch(checkpoint, meta)}: the latest; none records a validation or test loss"


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
