"""A training run's settings and its records: `LoopConfig`, what the driver checked and every
worker gets; the metrics (JSON, CSV), the loss curve and the reconstructions written beside
the checkpoints; and in local mode, where Ray Train keeps no checkpoint state, the run
folder's checkpoints found, resumed from and pruned by hand."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cvae import fs
from cvae.data.reader import ShardReader
from cvae.model.checkpoint import CheckpointError, load_checkpoint, load_meta, score_key
from cvae.model.networks import SupervisedVAE


@dataclass
class LoopConfig:
    """What every training worker needs, checked by the driver first (cvae.model.train); it
    is pickled to each worker, so it holds plain data and the typed Config itself (workers
    get what the driver validated; checkpoints store its dict)."""
    config: object  # the run's cvae.config.Config
    data_dir: str  # the dataset folder: an absolute path or a URI
    manifest: dict  # the dataset's manifest
    manifest_counts: dict  # rows per split
    scm: dict  # the factor SCM of the config (fitted to the training rows), before a grid limits it
    grid: dict  # the classes the training split holds (ModelGrid.to_dict)
    score: str  # the metric the best checkpoint is chosen by (checkpoint.score_metric)
    out: str  # the output folder: an absolute path or a URI
    remote: bool  # `out` is a URI
    local_mode: bool  # train.num_workers 0: the loop runs in the driver's process
    run_dir: str  # out/<run_name>: the checkpoints
    run_name: str
    progress_dir: str | None  # per-epoch metrics and curve, refreshed by rank 0 (a local folder only)
    placement: list = field(default_factory=list)  # every rank's node and files, set by each worker
    step_hook: Callable | None = None  # run_training's step_hook
    log_level: str = "WARNING"  # the driver's level for the `cvae` loggers, which each worker takes


EVAL_SPLITS = ("validation", "test", "holdout")  # evaluated every train.eval_every epochs


METRICS_JSON, METRICS_CSV = "metrics.json", "metrics.csv"


CURVE_PNG, RECON_PNG = "loss_curve.png", "reconstructions.png"


def local_checkpoints(run_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(run_dir.glob("checkpoint_epoch_*")):
        try:
            found.append((path, load_meta(path)))
        except CheckpointError:
            continue  # a checkpoint cut short by a crash: not one to resume from
    return found


def latest_local_checkpoint(run_dir: Path) -> Path | None:
    found = local_checkpoints(run_dir)
    return max(found, key=lambda pm: pm[1]["epoch"])[0] if found else None


def prune_local(run_dir: Path, keep: int, score: str) -> None:
    """Ray's policy, by hand for local mode: keep the best `keep` and always the latest."""
    found = local_checkpoints(run_dir)
    if len(found) <= keep:
        return
    latest = max(found, key=lambda pm: pm[1]["epoch"])[0]
    ranked = sorted(found, key=lambda pm: score_key(pm[1]["metrics"].get(score), pm[1]["metrics"]["epoch"]))
    for path, _ in ranked[keep:]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def json_safe(value):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_metrics(out_dir: Path, history: list[dict]) -> dict[str, str]:
    """metrics.json, metrics.csv and the loss-curve PNG from the epoch records."""
    from cvae.figures import save_curves  # matplotlib only when a figure is drawn

    out_dir.mkdir(parents=True, exist_ok=True)
    history = json_safe(history)
    fs.write_text_atomic(out_dir / METRICS_JSON, json.dumps(history, indent=1))
    pd.DataFrame(history).to_csv(out_dir / METRICS_CSV, index=False)
    curves = {}
    for split in ("train",) + EVAL_SPLITS:
        points = [(r["epoch"], r[f"{split}_loss"]) for r in history if r.get(f"{split}_loss") is not None]
        if points:
            curves[split] = ([p[0] for p in points], [p[1] for p in points])
    save_curves(out_dir / CURVE_PNG, curves, title="negative ELBO per image")
    return {"metrics_json": str(out_dir / METRICS_JSON), "metrics_csv": str(out_dir / METRICS_CSV),
            "loss_curve": str(out_dir / CURVE_PNG)}


def reconstruct(model: SupervisedVAE, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """Pixel probabilities decoded from the posterior mean of z: (B, 64, 64) in [0, 1]."""
    with torch.no_grad():
        x = images.reshape(len(images), -1).float()
        loc, _ = model.encode(x, classes)
        return torch.sigmoid(model.decode(loc, classes)).reshape(images.shape).numpy()


def save_reconstructions(checkpoint_dir: str | Path, data_dir: str | Path, path: Path,
                         count: int = 10) -> Path:
    """Test images above their reconstructions by the checkpoint's model."""
    from cvae.figures import save_image_grid  # matplotlib only when a figure is drawn

    model, meta = load_checkpoint(checkpoint_dir)
    reader = ShardReader(data_dir, split="test", batch_size=count, seed=0, verify=False)
    batch = next(iter(reader.epoch(0)), None)
    if batch is None:  # no test split: show training rows instead
        reader = ShardReader(data_dir, split="train", batch_size=count, seed=0, verify=False)
        batch = next(iter(reader.epoch(0)))
    recon = reconstruct(model, batch.images, batch.classes)
    return save_image_grid(path, [batch.images.numpy(), recon], row_labels=["test", "recon"],
                           title=f"reconstructions, epoch {meta['epoch']}")
