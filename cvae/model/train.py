"""Data-parallel training of the supervised VAE with Ray Train.

`train_func` runs on every Ray Train worker: it reads only its own shards through
`ShardReader(rank, world_size)`, trains the DDP-wrapped model on the negative ELBO,
all-reduces the per-image losses, and reports metrics with a checkpoint every epoch
(rank 0 writes it). It resumes from `ray.train.get_checkpoint()`, which Ray Train fills
after a worker failure (FailureConfig) and when a run is started again with the same
name and storage path (Train V2 reloads its checkpoint-manager snapshot from there).

`run_training` is the driver: it builds the TorchTrainer (or runs the same function
in-process with `num_workers: 0`, Ray Train's local mode) and writes the metrics
(CSV, JSON), a loss-curve PNG and a reconstruction-grid PNG into the output folder.

The best checkpoint is the one with the lowest validation loss; only a dataset without a
validation split (`data.validation_fraction: 0`, or a manifest written before there was
one) falls back to test loss, and the driver says so. Test and holdout losses are reported
beside it but choose nothing.

Every checkpoint's JSON holds the config, the data manifest, the factor SCM, the epoch,
that epoch's metrics and the history of all epochs so far (with the attempt each ran
in), so the history survives restarts and any checkpoint tells its own story.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cvae.config import Config, ConfigError
from cvae.malloc import keep_freed_memory
from cvae.model.checkpoint import CheckpointError, load_checkpoint, load_meta, load_optimizer_state, save_checkpoint
from cvae.model.networks import SupervisedVAE

EVAL_SPLITS = ("validation", "test", "holdout")  # evaluated every train.eval_every epochs
PROGRESS_EVERY_S = 60.0  # rank 0's progress line inside an epoch, at most this often
METRICS_JSON, METRICS_CSV = "metrics.json", "metrics.csv"
CURVE_PNG, RECON_PNG = "loss_curve.png", "reconstructions.png"


@dataclass
class TrainingResult:
    run_dir: str  # the Ray Train run folder: checkpoints and Ray's own state
    best_checkpoint: str  # lowest `best_by` among the kept checkpoints
    latest_checkpoint: str  # the last epoch's checkpoint (what a rerun resumes from)
    history: list[dict] = field(default_factory=list)  # one record per epoch, in order
    files: dict[str, str] = field(default_factory=dict)  # metrics and figure paths
    best_metrics: dict = field(default_factory=dict)  # the epoch record the best checkpoint holds
    best_by: str = "validation_loss"  # the metric that chose it (test_loss: no validation split)


def score_metric(counts: dict) -> str:
    """The metric checkpoints are ranked on (lower is better): validation loss, or test
    loss when the dataset has no validation rows."""
    return "validation_loss" if counts.get("validation", 0) > 0 else "test_loss"


# ---------------------------------------------------------------- on each worker


def train_func(loop_config: dict) -> None:
    """One Ray Train worker's loop (also run in-process in local mode). Shards behind a
    URI are first staged to local disk: only the manifest and this worker's own shards."""
    import ray.train

    from cvae import fs

    data_dir = loop_config["data_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    files = rank_files(loop_config["manifest"], rank, world)
    loop_config = {**loop_config, "placement": placement(rank, files, staged=fs.is_uri(data_dir))}
    if not fs.is_uri(data_dir):
        return _train_loop(loop_config, data_dir, rank, world)
    with fs.staged(data_dir, only=files) as local:
        return _train_loop(loop_config, str(local), rank, world)


def placement(rank: int, files: list[str], staged: bool) -> list[dict]:
    """Where every rank runs and which files it reads (staged: copied from a URI to its
    node's disk), gathered from all ranks: each checkpoint records it, so a run on a
    cluster shows which worker ran on which node with which shards."""
    import ray
    import torch.distributed as dist

    # Local mode runs without a Ray; asking for a runtime context there would start one
    # (ray's auto-init: unsecured, seconds long, and it spoils a later secured init_ray).
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    mine = {"rank": rank, "node_id": node_id,
            "node_ip": ray.util.get_node_ip_address(), "files": files, "staged": staged}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def rank_files(manifest: dict, rank: int, world: int) -> list[str]:
    """The manifest and the shard files that rank `rank` of `world` reads (as ShardReader
    assigns them: every world-th shard of each split)."""
    from cvae.data.shards import MANIFEST, SPLITS, split_shards

    return [MANIFEST] + [e["file"] for split in SPLITS
                         for e in split_shards(manifest, split)[rank::world]]


def _train_loop(loop_config: dict, data_dir: str, rank: int, world: int) -> None:
    import ray.train
    import ray.train.torch

    from cvae.data.reader import ShardReader

    config: Config = loop_config["config"]
    train = config.train
    torch.set_num_threads(train.threads_per_worker)
    # Each step frees and reallocates its activations and gradients; with glibc's
    # defaults those came back as fresh pages (sprite: 1.2 M page faults in 240 steps,
    # 0.87x the speed; mlp 4.7 M, 0.7x). See cvae.malloc.
    keep_freed_memory()
    device = ray.train.torch.get_device()

    model, optimizer, start_epoch, history, attempt = _model_and_optimizer(loop_config, config)

    readers = {
        split: ShardReader(data_dir, split=split, rank=rank, world_size=world,
                           batch_size=train.batch_size, seed=config.seed,
                           shuffle_buffer=train.shuffle_buffer, verify=True)
        for split in ("train",) + EVAL_SPLITS
        if split == "train" or loop_config["manifest_counts"].get(split, 0) > 0
    }
    step_hook = loop_config.get("step_hook")

    for epoch in range(start_epoch, train.epochs + 1):
        # Seeded per (epoch, rank): a resumed epoch draws the same z noise as the original.
        torch.manual_seed(config.seed * 1_000_003 + epoch * 1_009 + rank)
        model.train()
        started = time.perf_counter()
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        steps = len(readers["train"].batch_sizes())
        steps = min(steps, train.max_steps_per_epoch or steps)
        updates = -(-steps // train.accumulate)  # Adam steps this epoch
        progress = EpochProgress(epoch, train.epochs, steps, rank)
        for step, batch in enumerate(_capped(readers["train"].epoch(epoch), train.max_steps_per_epoch)):
            if step_hook is not None:
                step_hook(epoch, step, rank, loop_config["run_dir"])
            x, y = _to_model(batch, device)
            # The loss is a sum over images, so summed gradients are those of one larger batch.
            last = (step + 1) % train.accumulate == 0 or step + 1 == steps
            with contextlib.nullcontext() if last or world == 1 else model.no_sync():
                loss = model(x, y)
                loss.backward()
            if last:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(train, (epoch - 1) * updates + step // train.accumulate,
                                                train.epochs * updates)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach().double()
            count += len(x)
            progress.update(step, count, total)
        seconds = time.perf_counter() - started
        train_loss, train_rows = _all_reduce_mean(total, count, device)
        record = {
            "epoch": epoch, "attempt": attempt, "train_loss": train_loss,
            "train_images": train_rows, "seconds": round(seconds, 3),
            "images_per_s": round(train_rows / seconds, 1),
            "images_per_s_per_worker": round(train_rows / seconds / world, 1),
            "workers": world, "nodes": len({p["node_id"] for p in loop_config["placement"]}),
        }
        if epoch % train.eval_every == 0 or epoch == train.epochs:
            for split in EVAL_SPLITS:
                if split in readers:
                    record[f"{split}_loss"] = _evaluate(model, readers[split], device)
        history = history + [record]
        _report(loop_config, config, model, optimizer, record, history, rank)


def learning_rate(train, step: int, total_steps: int) -> float:
    """The lr at a global step: train.lr throughout, or a half cosine from train.lr down to
    train.lr / 100 at the last step."""
    if train.lr_schedule == "constant":
        return train.lr
    final = train.lr / 100
    done = min(step / max(total_steps - 1, 1), 1.0)
    return final + 0.5 * (train.lr - final) * (1 + math.cos(math.pi * done))


def _model_and_optimizer(loop_config: dict, config: Config):
    """The model (on the device, in DDP when there are several workers) and its Adam, fresh
    or resumed from the run's latest checkpoint; and the epoch to start at, the history so
    far and the attempt number."""
    import ray.train.torch

    torch.manual_seed(config.seed)  # identical initial weights on every worker
    model = SupervisedVAE.from_config(config.model)
    optimizer_state, start_epoch, history, attempt = None, 1, [], 0
    resume_dir = _resume_checkpoint(loop_config)
    if resume_dir is not None:
        with resume_dir as directory:
            saved, meta = load_checkpoint(directory)
            if saved.spec() != model.spec():
                raise CheckpointError(
                    f"run {loop_config['run_name']!r} was trained with model {saved.spec()}, "
                    f"the config asks for {model.spec()}: use another run name"
                )
            model.load_state_dict(saved.state_dict())
            optimizer_state = load_optimizer_state(directory)
        start_epoch, history, attempt = meta["epoch"] + 1, meta["history"], meta["attempt"] + 1
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the config's lr wins over the saved one
            group["lr"] = config.train.lr
    return model, optimizer, start_epoch, history, attempt


def _resume_checkpoint(loop_config: dict):
    """A context manager giving the directory to resume from, or None to start fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        return checkpoint.as_directory()
    if loop_config["local_mode"]:  # local mode keeps no state between runs: look ourselves
        latest = _latest_local_checkpoint(Path(loop_config["run_dir"]))
        if latest is not None:
            return _PlainDirectory(latest)
    return None


class _PlainDirectory:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None


def _capped(batches: Iterator, max_steps: int) -> Iterator:
    """At most `max_steps` batches (0: all). Every rank has the same number of batches,
    so every rank stops at the same step and DDP's all-reduces stay matched."""
    for step, batch in enumerate(batches):
        if max_steps and step >= max_steps:
            return
        yield batch


def _to_model(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch.images.to(device, non_blocking=True).reshape(len(batch.images), -1).float()
    return x, batch.classes.to(device, non_blocking=True)


def _all_reduce_mean(total: torch.Tensor, count: int, device: torch.device) -> tuple[float, int]:
    """Sum (loss, rows) over workers: the mean per image over all rows, and the rows."""
    sums = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    total, rows = sums.tolist()
    return (total / rows if rows else math.nan), int(rows)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, reader, device: torch.device) -> float:
    """Mean negative ELBO per image over a split; a rank without that split's shards
    adds zeros, so every rank takes part in the all-reduce."""
    module = getattr(model, "module", model)  # no DDP machinery for a forward-only pass
    module.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in reader.epoch(0):  # a fixed order: eval does not depend on the epoch
        x, y = _to_model(batch, device)
        total += module(x, y).double()
        count += len(x)
    module.train()
    return _all_reduce_mean(total, count, device)[0]


def _report(loop_config: dict, config: Config, model, optimizer, record: dict,
            history: list[dict], rank: int) -> None:
    """ray.train.report with this epoch's checkpoint (written by rank 0 only)."""
    import ray.train

    epoch = record["epoch"]
    # Ray ranks checkpoints on the score: an epoch without that evaluation scores NaN,
    # which Ray orders below every number, so it is never kept as a "best" one.
    score = loop_config["score"]
    metrics = {**record, score: record.get(score, math.nan)}
    name = f"checkpoint_epoch_{epoch:05d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        _wait_until_committed()
        return
    grid, coverage = _measured_grid(loop_config, model, config.seed)
    meta = {
        "config": config.to_dict(), "manifest": loop_config["manifest"],
        "scm": loop_config["scm"], "grid": grid, "coverage": coverage, "epoch": epoch, "attempt": record["attempt"],
        "placement": loop_config["placement"],
        "metrics": _json_safe(record), "history": _json_safe(history),
    }
    if loop_config["local_mode"]:
        # Local mode keeps the Checkpoint object as given: write it where it stays.
        directory = Path(loop_config["run_dir"]) / name
        save_checkpoint(directory, model, meta, optimizer)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        _prune_local(Path(loop_config["run_dir"]), config.train.keep_checkpoints, score)
    else:
        staging = tempfile.mkdtemp(prefix="cvae-ckpt-")
        try:
            save_checkpoint(staging, model, meta, optimizer)
            # Synchronous upload: the files are in storage when report returns.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _wait_until_committed()
    _print_progress(record, config.train.epochs)
    if loop_config.get("progress_dir"):
        try:  # refresh the metrics and the loss curve as the run goes; never fatal
            write_metrics(Path(loop_config["progress_dir"]), history)
        except OSError as exc:
            print(f"(could not refresh metrics in {loop_config['progress_dir']}: {exc})", flush=True)


def _measured_grid(loop_config: dict, model, seed: int) -> tuple[dict | None, dict]:
    """The grid this checkpoint declares: the training grid, widened to the whole range of
    each factor whose unseen classes it measurably draws right (cvae.model.coverage)."""
    from cvae.data.grid import ModelGrid
    from cvae.data.groundtruth import GroundTruth
    from cvae.model.coverage import measure_coverage

    if not loop_config.get("grid"):
        return None, {}
    trained = ModelGrid.from_dict(loop_config["grid"])
    if trained.is_whole():
        return trained.to_dict(), {}
    module = getattr(model, "module", model)
    try:
        truth = GroundTruth.from_manifest(loop_config["manifest"])
        grid, coverage = measure_coverage(module, trained, truth, next(module.parameters()).device, seed)
    except (OSError, ValueError) as exc:  # no ground truth here: declare what it trained on
        logging.getLogger(__name__).warning("grid not measured (%s): the checkpoint answers its training grid", exc)
        return trained.to_dict(), {"error": str(exc)}
    return grid.to_dict(), coverage


def _wait_until_committed() -> None:
    """Block until the controller has registered this report's checkpoint.

    ray.train.report only queues the result on the worker; the controller picks it up
    when it next polls. A worker that dies before then takes the report with it, and the
    restart resumes from the checkpoint before (seen here: a SIGKILL three steps into
    epoch 2 restarted from scratch). Waiting here bounds the loss to one epoch.
    """
    import ray.train

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class EpochProgress:
    """Rank 0's progress inside a long epoch (a full-grid epoch takes many minutes on CPU):
    at most every PROGRESS_EVERY_S seconds, the share of the epoch's steps done, this
    rank's running train loss and its images/s. The epoch's own line follows at its end."""

    def __init__(self, epoch: int, epochs: int, steps: int, rank: int):
        self.epoch, self.epochs, self.steps, self.on = epoch, epochs, steps, rank == 0 and steps > 0
        self.started = self.last = time.perf_counter()

    def update(self, step: int, images: int, total: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.on or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        print(f"epoch {self.epoch}/{self.epochs}: {100 * (step + 1) / self.steps:.0f}% "
              f"({step + 1:,} of {self.steps:,} steps), train {float(total) / images:.2f} nats/image "
              f"so far, {images / (now - self.started):.0f} img/s", file=sys.__stdout__ or sys.stdout, flush=True)


def _print_progress(record: dict, epochs: int) -> None:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train {record['train_loss']:.2f}"]
    for split in EVAL_SPLITS:
        if f"{split}_loss" in record:
            parts.append(f"{split} {record[f'{split}_loss']:.2f}")
    parts.append("nats/image")
    parts.append(f"{record['images_per_s']:.0f} img/s ({record['images_per_s_per_worker']:.0f}/worker)")
    parts.append(f"{record['seconds']:.1f}s")
    if record["attempt"]:
        parts.append(f"(attempt {record['attempt'] + 1})")
    # To the process's own stdout: Ray Train's patched print would also copy it into its
    # logger, and the driver would show every line twice.
    print("  ".join(parts), file=sys.__stdout__ or sys.stdout, flush=True)


# ---------------------------------------------------------------- local-mode bookkeeping


def _local_checkpoints(run_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(run_dir.glob("checkpoint_epoch_*")):
        try:
            found.append((path, load_meta(path)))
        except CheckpointError:
            continue  # a checkpoint cut short by a crash: not one to resume from
    return found


def _latest_local_checkpoint(run_dir: Path) -> Path | None:
    found = _local_checkpoints(run_dir)
    return max(found, key=lambda pm: pm[1]["epoch"])[0] if found else None


def _prune_local(run_dir: Path, keep: int, score: str) -> None:
    """Ray's policy, by hand for local mode: keep the best `keep` and always the latest."""
    found = _local_checkpoints(run_dir)
    if len(found) <= keep:
        return
    latest = max(found, key=lambda pm: pm[1]["epoch"])[0]
    ranked = sorted(found, key=lambda pm: _score_key(pm[1]["metrics"], score))
    for path, _ in ranked[keep:]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def _score_key(metrics: dict, score: str) -> tuple[int, float, int]:
    """Sort key: checkpoints evaluated on `score` by it, then the rest; ties to the later."""
    value = metrics.get(score)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0, -metrics["epoch"])
    return (0, value, -metrics["epoch"])


# ---------------------------------------------------------------- on the driver


def run_training(config: Config, data_dir: str | Path, out_dir: str | Path,
                 run_name: str | None = None, step_hook=None) -> TrainingResult:
    """Train per `config.train` on the shards in `data_dir`; checkpoints go to
    `out_dir/<run_name>/`, metrics and figures to `out_dir` (a local path, or a pyarrow
    filesystem URI with Ray workers). A run whose folder already holds checkpoints
    continues from the latest one. The best checkpoint is chosen by validation loss, or
    by test loss when the dataset has no validation split.

    `step_hook(epoch, step, rank, run_dir)`, if given, runs on every worker before each
    training step (fault drills and instrumentation; it travels to the workers pickled)."""
    import ray

    loop_config = _loop_config(config, data_dir, out_dir, run_name or config.name)
    if step_hook is not None:
        loop_config["step_hook"] = step_hook
    if loop_config["local_mode"]:
        Path(loop_config["run_dir"]).mkdir(parents=True, exist_ok=True)
    elif not ray.is_initialized():
        from cvae.localray import init_ray  # token auth, loopback only, for a local Ray

        init_ray(config.ray_address, num_cpus=config.num_cpus)
    return _collect(_fit(config, loop_config), loop_config)


def _loop_config(config: Config, data_dir: str | Path, out_dir: str | Path, run_name: str) -> dict:
    """What every worker needs (plain data: it is pickled to each one), checked here first."""
    from cvae import fs
    from cvae.causal.factors import FactorSCM
    from cvae.data.grid import ModelGrid
    from cvae.data.reader import load_split
    from cvae.data.shards import MANIFEST, read_manifest

    data_uri = str(data_dir).rstrip("/") if fs.is_uri(data_dir) else str(Path(data_dir).resolve())
    remote = fs.is_uri(out_dir)
    out = str(out_dir).rstrip("/") if remote else str(Path(out_dir).resolve())
    # The driver needs the manifest (and every shard only to fit the SCM's tables by counting).
    fit = config.scm.tables == "fit"
    with fs.staged(data_uri, only=None if fit else [MANIFEST]) as data_local:
        manifest = read_manifest(data_local)
        classes = load_split(data_local, "train")["classes"] if fit else None
        # The model answers the classes it trains on, and its SCM draws only those.
        grid = ModelGrid.of_manifest(manifest)
        scm = FactorSCM.from_config(config.scm, classes).on_classes(grid.classes)
    local_mode = config.train.num_workers == 0
    if local_mode and remote:
        raise ConfigError(f"train.num_workers: 0 (local mode) writes checkpoints to a local "
                          f"folder; {out_dir!r} is a URI")
    counts = _split_counts(manifest)
    if counts.get("train", 0) == 0:
        raise ConfigError(f"{data_dir}: the manifest lists no training rows")
    score = score_metric(counts)
    if score != "validation_loss":
        logging.getLogger(__name__).warning("%s: no validation split: the best checkpoint is chosen by test loss",
                                            data_dir)
    return {
        # The typed Config itself crosses the Ray boundary (pickled), so workers get what
        # the driver validated; checkpoints store its dict.
        "config": config, "data_dir": data_uri, "manifest": manifest,
        "manifest_counts": counts, "scm": scm.to_dict(), "grid": grid.to_dict(), "score": score,
        "out": out, "remote": remote,
        "local_mode": local_mode, "run_dir": fs.join(out, run_name), "run_name": run_name,
        # Per-epoch metrics and curve, refreshed by rank 0 (a local folder only).
        "progress_dir": None if remote else out,
    }


def _fit(config: Config, loop_config: dict):
    """Run the workers with Ray Train; returns Ray Train's result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    train, local_mode = config.train, loop_config["local_mode"]
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            resources_per_worker=None if local_mode else {"CPU": train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=loop_config["run_name"], storage_path=loop_config["out"],
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            # Ray keeps the latest checkpoint besides the best ones, so a rerun resumes.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute=loop_config["score"], checkpoint_score_order="min"),
        ),
    )
    return trainer.fit()


def _collect(result, loop_config: dict) -> TrainingResult:
    """The kept checkpoints (in local mode from the run folder, else the ones Ray Train
    kept: the best few by the score, and the latest), the metrics files and figures."""
    import ray.train

    from cvae import fs

    run_dir, out, remote, score = (loop_config[k] for k in ("run_dir", "out", "remote", "score"))
    if loop_config["local_mode"]:
        kept = [(ray.train.Checkpoint.from_directory(str(p)), meta)
                for p, meta in _local_checkpoints(Path(run_dir))]
    else:
        kept = []
        for checkpoint in [c for c, _ in result.best_checkpoints or []] + [result.checkpoint]:
            if checkpoint is not None and all(checkpoint.path != c.path for c, _ in kept):
                with checkpoint.as_directory() as directory:
                    kept.append((checkpoint, load_meta(directory)))
    if not kept:
        raise RuntimeError(f"training under {run_dir} produced no checkpoint")
    latest, latest_meta = max(kept, key=lambda cm: cm[1]["epoch"])
    best, best_meta = min(kept, key=lambda cm: _score_key(cm[1]["metrics"], score))
    history = latest_meta["history"]
    with fs.local_output(out) as local_out:
        files = write_metrics(local_out, history)
        with best.as_directory() as directory, \
                fs.staged(loop_config["data_dir"], only=rank_files(loop_config["manifest"], 0, 1)) as data_local:
            save_reconstructions(directory, data_local, local_out / RECON_PNG)
        files["reconstructions"] = str(local_out / RECON_PNG)
    if remote:
        files = {k: fs.join(out, Path(v).name) for k, v in files.items()}

    def where(checkpoint) -> str:
        return fs.join(run_dir, Path(checkpoint.path).name) if remote else checkpoint.path

    return TrainingResult(run_dir, where(best), where(latest), history, files, best_meta["metrics"], score)


def _split_counts(manifest: dict) -> dict[str, int]:
    """Rows per split, as the manifest counts them."""
    return {split: int(n) for split, n in manifest["counts"].items()}


def _json_safe(value):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(out_dir: Path, history: list[dict]) -> dict[str, str]:
    """metrics.json, metrics.csv and the loss-curve PNG from the epoch records."""
    import pandas as pd

    from cvae.figures import save_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    history = _json_safe(history)
    tmp = out_dir / (METRICS_JSON + ".tmp")
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, out_dir / METRICS_JSON)
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
    from cvae.data.reader import ShardReader
    from cvae.figures import save_image_grid

    model, meta = load_checkpoint(checkpoint_dir)
    reader = ShardReader(data_dir, split="test", batch_size=count, seed=0, verify=False)
    batch = next(iter(reader.epoch(0)), None)
    if batch is None:  # no test split: show training rows instead
        reader = ShardReader(data_dir, split="train", batch_size=count, seed=0, verify=False)
        batch = next(iter(reader.epoch(0)))
    recon = reconstruct(model, batch.images, batch.classes)
    return save_image_grid(path, [batch.images.numpy(), recon], row_labels=["test", "recon"],
                           title=f"reconstructions, epoch {meta['epoch']}")
