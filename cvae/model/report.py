"""The end of each training epoch, on every worker: the checkpoint (rank 0 writes it, with
the grid the model measurably draws), its report to Ray Train, and the epoch's log line."""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

from cvae.data.grid import ModelGrid
from cvae.data.groundtruth import GroundTruth
from cvae.model.checkpoint import save_checkpoint
from cvae.model.coverage import measure_coverage
from cvae.model.factors import FactorSCM
from cvae.model.run import EVAL_SPLITS, LoopConfig, json_safe, prune_local, write_metrics

log = logging.getLogger(__name__)


def report_epoch(loop: LoopConfig, config, model, optimizer, record: dict, history: list[dict],
                 rank: int) -> None:
    """ray.train.report with this epoch's checkpoint (written by rank 0 only)."""
    import ray.train  # in the training processes only: importing it takes seconds

    epoch = record["epoch"]
    # Ray ranks checkpoints on the score: an epoch without that evaluation scores NaN,
    # which Ray orders below every number, so it is never kept as a "best" one.
    score = loop.score
    metrics = {**record, score: record.get(score, math.nan)}
    name = f"checkpoint_epoch_{epoch:05d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        wait_until_committed()
        return
    grid, coverage = measured_grid(loop, model, config.seed)
    # The SCM draws the classes this checkpoint answers: on a grid its coverage widened, the
    # classes it never trained on too (dSprites' own factors: uniform over the whole grid).
    scm = FactorSCM.from_dict(loop.scm)
    scm = scm.on_classes(ModelGrid.from_dict(grid).classes) if grid else scm
    meta = {
        "config": config.to_dict(), "manifest": loop.manifest,
        "scm": scm.to_dict(), "grid": grid, "coverage": coverage, "epoch": epoch, "attempt": record["attempt"],
        "placement": loop.placement,
        "metrics": json_safe(record), "history": json_safe(history),
    }
    if loop.local_mode:
        # Local mode keeps the Checkpoint object as given: write it where it stays.
        directory = Path(loop.run_dir) / name
        save_checkpoint(directory, model, meta, optimizer)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        prune_local(Path(loop.run_dir), config.train.keep_checkpoints, score)
    else:
        staging = tempfile.mkdtemp(prefix="cvae-ckpt-")
        try:
            save_checkpoint(staging, model, meta, optimizer)
            # Synchronous upload: the files are in storage when report returns.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    wait_until_committed()
    log_epoch(record, config.train.epochs)
    if loop.progress_dir:
        try:  # refresh the metrics and the loss curve as the run goes; never fatal
            write_metrics(Path(loop.progress_dir), history)
        except OSError as exc:
            log.warning("could not refresh metrics in %s: %s", loop.progress_dir, exc)


def measured_grid(loop: LoopConfig, model, seed: int) -> tuple[dict | None, dict]:
    """The grid this checkpoint declares: the training grid, widened to the whole range of
    each factor whose unseen classes it measurably draws right (cvae.model.coverage)."""
    if not loop.grid:
        return None, {}
    trained = ModelGrid.from_dict(loop.grid)
    if trained.is_whole():
        return trained.to_dict(), {}
    module = getattr(model, "module", model)
    try:
        truth = GroundTruth.from_manifest(loop.manifest)
        grid, coverage = measure_coverage(module, trained, truth, next(module.parameters()).device, seed)
    except (OSError, ValueError) as exc:  # no ground truth here: declare what it trained on
        log.warning("grid not measured (%s): the checkpoint answers its training grid", exc)
        return trained.to_dict(), {"error": str(exc)}
    return grid.to_dict(), coverage


def wait_until_committed() -> None:
    """Block until the controller has registered this report's checkpoint.

    ray.train.report only queues the result on the worker; the controller picks it up
    when it next polls. A worker that dies before then takes the report with it, and the
    restart resumes from the checkpoint before (seen here: a SIGKILL three steps into
    epoch 2 restarted from scratch). Waiting here bounds the loss to one epoch.
    """
    import ray.train  # in the training processes only: importing it takes seconds

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def log_epoch(record: dict, epochs: int) -> None:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train {record['train_loss']:.2f}"]
    for split in EVAL_SPLITS:
        if f"{split}_loss" in record:
            parts.append(f"{split} {record[f'{split}_loss']:.2f}")
    parts.append("nats/image")
    parts.append(f"{record['images_per_s']:.0f} img/s ({record['images_per_s_per_worker']:.0f}/worker)")
    parts.append(f"{record['seconds']:.1f}s")
    if record["attempt"]:
        parts.append(f"(attempt {record['attempt'] + 1})")
    log.info("%s", "  ".join(parts))
