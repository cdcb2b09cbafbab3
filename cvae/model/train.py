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
The end of each epoch (the checkpoint and its report) is cvae.model.report; what the driver
hands every worker (`LoopConfig`) and the run's records are cvae.model.run.

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
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from cvae import fs
from cvae.config import Config
from cvae.data.grid import ModelGrid
from cvae.data.reader import ShardReader, load_split
from cvae.data.shards import MANIFEST, SPLITS, read_manifest, split_shards
from cvae.errors import ConfigError
from cvae.localray import init_ray  # token auth, loopback only, for a local Ray
from cvae.logs import LEVELS, configure, quiet_train_worker, ray_train_level
from cvae.malloc import keep_freed_memory
from cvae.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_meta,
    load_optimizer_state,
    score_key,
    score_metric,
)
from cvae.model.factors import FactorSCM
from cvae.model.networks import SupervisedVAE
from cvae.model.report import report_epoch
from cvae.model.run import (
    EVAL_SPLITS,
    RECON_PNG,
    LoopConfig,
    latest_local_checkpoint,
    local_checkpoints,
    save_reconstructions,
    write_metrics,
)

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 60.0  # rank 0's progress line inside an epoch, at most this often


@dataclass
class TrainingResult:
    run_dir: str  # the Ray Train run folder: checkpoints and Ray's own state
    best_checkpoint: str  # lowest `best_by` among the kept checkpoints
    latest_checkpoint: str  # the last epoch's checkpoint (what a rerun resumes from)
    history: list[dict] = field(default_factory=list)  # one record per epoch, in order
    files: dict[str, str] = field(default_factory=dict)  # metrics and figure paths
    best_metrics: dict = field(default_factory=dict)  # the epoch record the best checkpoint holds
    best_by: str = "validation_loss"  # the metric that chose it (test_loss: no validation split)


# ---------------------------------------------------------------- on each worker


def train_func(train_loop_config: dict) -> None:
    """One Ray Train worker's loop (also run in-process in local mode). Shards behind a
    URI are first staged to local disk: only the manifest and this worker's own shards."""
    import ray.train  # ray.train only where training runs: importing it takes seconds

    loop: LoopConfig = train_loop_config["loop"]
    if not loop.local_mode:  # a worker process of its own: its log lines reach the driver's stderr
        configure(loop.log_level)
        quiet_train_worker()
    data_dir = loop.data_dir
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    files = rank_files(loop.manifest, rank, world)
    loop = dataclasses.replace(loop, placement=placement(rank, files, staged=fs.is_uri(data_dir)))
    if not fs.is_uri(data_dir):
        return _train_loop(loop, data_dir, rank, world)
    with fs.staged(data_dir, only=files) as local:
        return _train_loop(loop, str(local), rank, world)


def placement(rank: int, files: list[str], staged: bool) -> list[dict]:
    """Where every rank runs and which files it reads (staged: copied from a URI to its
    node's disk), gathered from all ranks: each checkpoint records it, so a run on a
    cluster shows which worker ran on which node with which shards."""
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
    return [MANIFEST] + [e["file"] for split in SPLITS
                         for e in split_shards(manifest, split)[rank::world]]


def _train_loop(loop: LoopConfig, data_dir: str, rank: int, world: int) -> None:
    import ray.train  # ray.train only where training runs: importing it takes seconds
    import ray.train.torch  # likewise

    config: Config = loop.config
    train = config.train
    torch.set_num_threads(train.threads_per_worker)
    # Each step frees and reallocates its activations and gradients; with glibc's
    # defaults those came back as fresh pages (sprite: 1.2 M page faults in 240 steps,
    # 0.87x the speed; mlp 4.7 M, 0.7x). See cvae.malloc.
    keep_freed_memory()
    device = ray.train.torch.get_device()

    model, optimizer, start_epoch, history, attempt = _model_and_optimizer(loop, config)

    readers = {
        split: ShardReader(data_dir, split=split, rank=rank, world_size=world,
                           batch_size=train.batch_size, seed=config.seed,
                           shuffle_buffer=train.shuffle_buffer, verify=True)
        for split in ("train",) + EVAL_SPLITS
        if split == "train" or loop.manifest_counts.get(split, 0) > 0
    }
    for epoch in range(start_epoch, train.epochs + 1):
        started = time.perf_counter()
        total, count = _train_epoch(loop, model, optimizer, readers["train"], epoch, (rank, world), device)
        seconds = time.perf_counter() - started
        train_loss, train_rows = _all_reduce_mean(total, count, device)
        record = {
            "epoch": epoch, "attempt": attempt, "train_loss": train_loss,
            "train_images": train_rows, "seconds": round(seconds, 3),
            "images_per_s": round(train_rows / seconds, 1),
            "images_per_s_per_worker": round(train_rows / seconds / world, 1),
            "workers": world, "nodes": len({p["node_id"] for p in loop.placement}),
        }
        if epoch % train.eval_every == 0 or epoch == train.epochs:
            for split in EVAL_SPLITS:
                if split in readers:
                    record[f"{split}_loss"] = split_loss(model, readers[split], device)
        history = history + [record]
        report_epoch(loop, config, model, optimizer, record, history, rank)


def _train_epoch(loop: LoopConfig, model, optimizer, reader, epoch: int, rank_world: tuple[int, int],
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """One epoch's training steps on this worker's train shards: its summed loss and images."""
    config, (rank, world) = loop.config, rank_world
    train = config.train
    # Seeded per (epoch, rank): a resumed epoch draws the same z noise as the original.
    torch.manual_seed(config.seed * 1_000_003 + epoch * 1_009 + rank)
    model.train()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    steps = len(reader.batch_sizes())
    steps = min(steps, train.max_steps_per_epoch or steps)
    updates = -(-steps // train.accumulate)  # Adam steps this epoch
    progress = EpochProgress(epoch, train.epochs, steps, rank)
    for step, batch in enumerate(_capped(reader.epoch(epoch), train.max_steps_per_epoch)):
        if loop.step_hook is not None:
            loop.step_hook(epoch, step, rank, loop.run_dir)
        x, y = batch_tensors(batch, device)
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
    return total, count


def learning_rate(train, step: int, total_steps: int) -> float:
    """The lr at a global step: train.lr throughout, or a half cosine from train.lr down to
    train.lr / 100 at the last step."""
    if train.lr_schedule == "constant":
        return train.lr
    final = train.lr / 100
    done = min(step / max(total_steps - 1, 1), 1.0)
    return final + 0.5 * (train.lr - final) * (1 + math.cos(math.pi * done))


def _model_and_optimizer(loop: LoopConfig, config: Config):
    """The model (on the device, in DDP when there are several workers) and its Adam, fresh
    or resumed from the run's latest checkpoint; and the epoch to start at, the history so
    far and the attempt number."""
    import ray.train.torch  # likewise

    torch.manual_seed(config.seed)  # identical initial weights on every worker
    model = SupervisedVAE.from_config(config.model)
    optimizer_state, start_epoch, history, attempt = None, 1, [], 0
    resume_dir = _resume_checkpoint(loop)
    if resume_dir is not None:
        with resume_dir as directory:
            saved, meta = load_checkpoint(directory)
            if saved.spec() != model.spec():
                raise CheckpointError(
                    f"run {loop.run_name!r} was trained with model {saved.spec()}, "
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


def _resume_checkpoint(loop: LoopConfig):
    """A context manager giving the directory to resume from, or None to start fresh."""
    import ray.train  # ray.train only where training runs: importing it takes seconds

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        return checkpoint.as_directory()
    if loop.local_mode:  # local mode keeps no state between runs: look ourselves
        latest = latest_local_checkpoint(Path(loop.run_dir))
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


def batch_tensors(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A reader batch as the model's inputs: flat float images (B, 4096) and classes (B, 5)."""
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
def split_loss(model: torch.nn.Module, reader, device: torch.device) -> float:
    """Mean negative ELBO per image over a split; a rank without that split's shards
    adds zeros, so every rank takes part in the all-reduce."""
    module = getattr(model, "module", model)  # no DDP machinery for a forward-only pass
    module.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in reader.epoch(0):  # a fixed order: eval does not depend on the epoch
        x, y = batch_tensors(batch, device)
        total += module(x, y).double()
        count += len(x)
    module.train()
    return _all_reduce_mean(total, count, device)[0]


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
        log.info("epoch %d/%d: %.0f%% (%s of %s steps), train %.2f nats/image so far, %.0f img/s",
                 self.epoch, self.epochs, 100 * (step + 1) / self.steps, f"{step + 1:,}", f"{self.steps:,}",
                 float(total) / images, images / (now - self.started))


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
    loop = _loop(config, data_dir, out_dir, run_name or config.name)
    loop.step_hook = step_hook
    level = logging.getLevelName(logging.getLogger("cvae").getEffectiveLevel())
    loop.log_level = level if level in LEVELS else "WARNING"  # the workers log as the driver does
    if loop.local_mode:
        Path(loop.run_dir).mkdir(parents=True, exist_ok=True)
    elif not ray.is_initialized():
        init_ray(config.ray_address, num_cpus=config.num_cpus)
    return _collect(_fit(config, loop), loop)


def _loop(config: Config, data_dir: str | Path, out_dir: str | Path, run_name: str) -> LoopConfig:
    """What every worker needs (plain data: it is pickled to each one), checked here first."""
    data_uri = str(data_dir).rstrip("/") if fs.is_uri(data_dir) else str(Path(data_dir).resolve())
    remote = fs.is_uri(out_dir)
    out = str(out_dir).rstrip("/") if remote else str(Path(out_dir).resolve())
    # The driver needs the manifest (and every shard only to fit the SCM's tables by counting).
    fit = config.scm.tables == "fit"
    with fs.staged(data_uri, only=None if fit else [MANIFEST]) as data_local:
        manifest = read_manifest(data_local)
        classes = load_split(data_local, "train")["classes"] if fit else None
        # Each checkpoint limits the SCM to the classes it answers (cvae.model.report).
        grid = ModelGrid.of_manifest(manifest)
        scm = FactorSCM.from_config(config.scm, classes)
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
    return LoopConfig(config=config, data_dir=data_uri, manifest=manifest, manifest_counts=counts,
                      scm=scm.to_dict(), grid=grid.to_dict(), score=score, out=out, remote=remote,
                      local_mode=local_mode, run_dir=fs.join(out, run_name), run_name=run_name,
                      progress_dir=None if remote else out)


def _fit(config: Config, loop: LoopConfig):
    """Run the workers with Ray Train; returns Ray Train's result."""
    import ray.train  # ray.train only where training runs: importing it takes seconds
    from ray.train.torch import TorchTrainer  # likewise

    train, local_mode = config.train, loop.local_mode
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"loop": loop},  # Ray Train hands the worker function a dict
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            resources_per_worker=None if local_mode else {"CPU": train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=loop.run_name, storage_path=loop.out,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            # Ray keeps the latest checkpoint besides the best ones, so a rerun resumes.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute=loop.score, checkpoint_score_order="min"),
            # Ray Train's INFO lines only at --log-level DEBUG.
            logging_config=ray.train.LoggingConfig(log_level=ray_train_level()),
        ),
    )
    return trainer.fit()


def _collect(result, loop: LoopConfig) -> TrainingResult:
    """The kept checkpoints (in local mode from the run folder, else the ones Ray Train
    kept: the best few by the score, and the latest), the metrics files and figures."""
    import ray.train  # ray.train only where training runs: importing it takes seconds

    run_dir, out, remote, score = loop.run_dir, loop.out, loop.remote, loop.score
    if loop.local_mode:
        kept = [(ray.train.Checkpoint.from_directory(str(p)), meta)
                for p, meta in local_checkpoints(Path(run_dir))]
    else:
        kept = []
        for checkpoint in [c for c, _ in result.best_checkpoints or []] + [result.checkpoint]:
            if checkpoint is not None and all(checkpoint.path != c.path for c, _ in kept):
                with checkpoint.as_directory() as directory:
                    kept.append((checkpoint, load_meta(directory)))
    if not kept:
        raise RuntimeError(f"training under {run_dir} produced no checkpoint")
    latest, latest_meta = max(kept, key=lambda cm: cm[1]["epoch"])
    best, best_meta = min(kept, key=lambda cm: score_key(cm[1]["metrics"].get(score), cm[1]["metrics"]["epoch"]))
    history = latest_meta["history"]
    with fs.local_output(out) as local_out:
        files = write_metrics(local_out, history)
        with best.as_directory() as directory, \
                fs.staged(loop.data_dir, only=rank_files(loop.manifest, 0, 1)) as data_local:
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


