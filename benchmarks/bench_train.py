"""Training speed and quality, measured side by side in one run.

    python -m benchmarks.bench_train [--config configs/bench.yaml] [--data DIR] [--steps 40] [--accumulate 4]
    python -m benchmarks.bench_train --quality [--archs mlp,conv,sprite] [--epochs N]   # the long run

Speed (default): for each of --archs, with the config's batch size and threads per worker,
  1. a plain single-process PyTorch loop (ShardReader -> model -> Adam), images/s, each in
     a fresh process (as a Ray worker is): with glibc keeping freed memory as train_func
     does (cvae.malloc), and with glibc's defaults, as a loop written without it runs;
  2. the same training through Ray Train (TorchTrainer, 1 worker, then N workers, then
     N workers summing --accumulate batches per Adam step, so DDP all-reduces that much
     less often), images/s per worker, in the same run, with the plain loop timed before
     and after;
  3. the reader alone (ShardReader.epoch, no model), images/s, against what the
     training loop consumes.
Quality (--quality): trains the config for each architecture and prints the negative
ELBO per image on the test split after every epoch. A rerun continues where the run
stopped (same run names under <out>/quality).

Every loop, plain or Ray Train (from inside its rank 0, through run_training's step_hook),
is timed the same way: WARMUP steps, then the best of WINDOWS windows of --steps steps, in
one epoch. Timings on a shared machine are noisy: the script prints what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.fixtures import at_once
from cvae.config import Config, load_config
from cvae.data.reader import ShardReader
from cvae.data.shards import read_manifest, write_dataset
from cvae.malloc import keep_freed_memory
from cvae.model.networks import SupervisedVAE

ROOT = Path(__file__).resolve().parents[1]

# Every loop, plain or Ray Train, is timed the same way: inside one long epoch (as real
# training runs: glibc's page faults differ at an epoch's start), after WARMUP steps, the
# best of WINDOWS windows of --steps steps (one 30-step window, 2 to 4 s, moved by 10 % or
# more on this shared machine).
WARMUP, WINDOWS = 5, 2
STEP_STARTS = "step_starts.txt"  # written by rank 0 of a timed Ray Train run, in its folder


def ensure_data(config: Config, data_dir: Path) -> Path:
    if not (data_dir / "manifest.json").is_file():
        print(f"writing the {config.name} dataset to {data_dir} ...", flush=True)
        write_dataset(config, data_dir)
    counts = read_manifest(data_dir)["counts"]
    print(f"data: {data_dir} ({', '.join(f'{k} {v}' for k, v in counts.items())})", flush=True)
    return data_dir


def best_window(starts: list[float], images_per_step: int, steps: int) -> float:
    """Images/s of the fastest window of `steps` steps; starts[i]: when timed step i began
    (one more than the steps timed, so the last window has its end)."""
    windows = (len(starts) - 1) // steps
    return max(images_per_step * steps / (starts[(w + 1) * steps] - starts[w * steps]) for w in range(windows))


def plain_loop(config: Config, data_dir: Path, steps: int, barrier=None, keep_freed: bool = True) -> float:
    """Images/s of a plain PyTorch loop: one process, the config's threads per worker; the
    best of WINDOWS windows of `steps` steps after WARMUP, inside one long epoch.
    `keep_freed` tunes malloc as train_func does, for the rest of the process.
    With a `barrier`, the timed steps start when every loop sharing it has warmed up."""
    torch.set_num_threads(config.train.threads_per_worker)
    if keep_freed:
        keep_freed_memory()
    torch.manual_seed(config.seed)
    model = SupervisedVAE.from_config(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    reader = ShardReader(data_dir, "train", batch_size=config.train.batch_size,
                         seed=config.seed, shuffle_buffer=config.train.shuffle_buffer, verify=False)
    starts = []
    for step, batch in enumerate(reader.epoch(1)):
        if step == WARMUP and barrier is not None:
            barrier.wait()
        if step >= WARMUP:
            starts.append(time.perf_counter())
            if len(starts) == WINDOWS * steps + 1:
                return best_window(starts, config.train.batch_size, steps)
        x = batch.images.reshape(len(batch.images), -1).float()
        loss = model(x, batch.classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    raise ValueError(f"an epoch is too short for {WARMUP} + {WINDOWS} x {steps} steps")


def _plain_process(config: Config, data_dir: Path, steps: int, keep_freed: bool, barrier, results) -> None:
    results.put(plain_loop(config, data_dir, steps, barrier=barrier, keep_freed=keep_freed))


def plain_rate(config: Config, data_dir: Path, steps: int, keep_freed: bool = True) -> float:
    """Images/s of one plain loop in a fresh process: the malloc tuning lasts for a
    process, and each loop starts from a fresh heap, as a Ray Train worker does."""
    return at_once(_plain_process, (config, data_dir, steps, keep_freed), 1)[0]


def concurrent_plain_loops(config: Config, data_dir: Path, steps: int, n: int) -> list[float]:
    """Images/s of each of n plain loops timed at once in n processes (no Ray, no DDP, no
    gradients exchanged): what this machine gives n independent trainings side by side,
    the control for the n-worker figure (shared cores, caches, memory bandwidth, clocks)."""
    return at_once(_plain_process, (config, data_dir, steps, True), n)


def _note_step_start(epoch: int, step: int, rank: int, run_dir: str) -> None:
    """Ray Train step_hook: rank 0 notes when each of its steps begins."""
    if rank == 0:
        with open(Path(run_dir) / STEP_STARTS, "a") as out:
            out.write(f"{time.perf_counter()}\n")


def ray_train_rate(config: Config, data_dir: Path, out: Path, workers: int, steps: int,
                   accumulate: int = 1) -> float:
    """Images/s per worker through Ray Train, timed as the plain loop is: rank 0's step
    starts, the best of WINDOWS windows of `steps` steps after WARMUP, in one epoch."""
    from cvae.model.train import run_training

    overrides = {"train.num_workers": workers, "train.epochs": 1, "train.accumulate": accumulate,
                 "train.max_steps_per_epoch": WARMUP + WINDOWS * steps + 1}
    run_config = _override(config, overrides)
    name = f"speed-{workers}w-{time.time_ns()}"
    result = run_training(run_config, data_dir, out / name, run_name=name, step_hook=_note_step_start)
    starts = [float(line) for line in (Path(result.run_dir) / STEP_STARTS).read_text().split()]
    return best_window(starts[WARMUP:], config.train.batch_size, steps)


def reader_rate(config: Config, data_dir: Path, batches: int = 400) -> float:
    """Images/s of ShardReader alone (rank 0 of 1), after its checksums are checked."""
    reader = ShardReader(data_dir, "train", batch_size=config.train.batch_size,
                         seed=config.seed, shuffle_buffer=config.train.shuffle_buffer, verify=True)
    started, done = time.perf_counter(), 0
    for step, batch in enumerate(reader.epoch(1)):
        done += len(batch)
        if step + 1 >= batches:
            break
    return done / (time.perf_counter() - started)


def _override(config: Config, overrides: dict) -> Config:
    from cvae.config import config_from_dict

    raw = config.to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return config_from_dict(raw)


def speed(config: Config, data_dir: Path, out: Path, steps: int, accumulate: int) -> None:
    import ray

    from cvae.localray import init_ray

    if not ray.is_initialized():
        init_ray(config.ray_address, log_to_driver=False,
                 num_cpus=max(2, config.train.num_workers * config.train.cpus_per_worker))
    t = config.train
    print(f"\nmodel {config.model.arch} (z {config.model.z_dim}, hidden {config.model.hidden}), "
          f"batch {t.batch_size}, {t.threads_per_worker} thread(s) per worker, {steps} timed steps",
          flush=True)
    plain_before = plain_rate(config, data_dir, steps)
    stock_before = plain_rate(config, data_dir, steps, keep_freed=False)
    print(f"plain loop (before):        {plain_before:8.0f} images/s "
          f"(glibc's defaults: {stock_before:.0f})", flush=True)
    one = ray_train_rate(config, data_dir, out, 1, steps)
    print(f"Ray Train, 1 worker:        {one:8.0f} images/s per worker", flush=True)
    plain_after = plain_rate(config, data_dir, steps)
    stock_after = plain_rate(config, data_dir, steps, keep_freed=False)
    print(f"plain loop (after):         {plain_after:8.0f} images/s "
          f"(glibc's defaults: {stock_after:.0f})", flush=True)
    many = None
    if t.num_workers > 1:
        many = ray_train_rate(config, data_dir, out, t.num_workers, steps)
        print(f"Ray Train, {t.num_workers} workers:       {many:8.0f} images/s per worker "
              f"({many * t.num_workers:.0f} in all; DDP all-reduce on shared cores)", flush=True)
        summed = ray_train_rate(config, data_dir, out, t.num_workers, steps, accumulate)
        print(f"Ray Train, {t.num_workers} workers, accumulate {accumulate}: {summed:8.0f} images/s "
              f"per worker (one all-reduce per {accumulate} batches)", flush=True)
        side_by_side = statistics.mean(concurrent_plain_loops(config, data_dir, steps, t.num_workers))
        print(f"plain loops, {t.num_workers} at once:   {side_by_side:8.0f} images/s per loop "
              "(separate processes: no Ray, no DDP)", flush=True)
    plain = statistics.mean([plain_before, plain_after])
    stock = statistics.mean([stock_before, stock_after])
    rate = reader_rate(config, data_dir)
    print(f"reader alone:               {rate:8.0f} images/s", flush=True)
    print("\nsummary")
    print(f"  Ray Train / plain loop, 1 worker, same threads and malloc: {one / plain:.2f}  (target >= 0.95)")
    print(f"  Ray Train / plain loop with glibc's defaults: {one / stock:.2f}; "
          f"the plain loop, freed memory kept / glibc's defaults: {plain / stock:.2f}")
    if many is not None:
        print(f"  per worker with {t.num_workers} workers / 1 worker: {many / one:.2f}, "
              f"accumulating {accumulate} batches: {summed / one:.2f}  (target >= 0.8)")
        print(f"  Ray Train / plain loop, per worker with {t.num_workers} workers: {many / plain:.2f}, "
              f"accumulating {accumulate} batches: {summed / plain:.2f}")
        print(f"  what the machine leaves: per loop with {t.num_workers} plain loops at once / 1 plain loop: "
              f"{side_by_side / plain:.2f}")
        print(f"  what is ours: per worker with {t.num_workers} workers / per loop with {t.num_workers} plain "
              f"loops at once: {many / side_by_side:.2f}, accumulating {accumulate} batches: "
              f"{summed / side_by_side:.2f}")
    print(f"  reader / training consumption: {rate / plain:.1f}x  (target >= 10)")


def quality(config: Config, data_dir: Path, out: Path, archs: list[str]) -> None:
    from cvae.model.train import run_training

    finals = {}
    for arch in archs:
        arch_config = _override(config, {"model.arch": arch})
        print(f"\n== {arch}: {arch_config.train.epochs} epochs, {arch_config.train.num_workers} "
              f"workers ==", flush=True)
        started = time.perf_counter()
        result = run_training(arch_config, data_dir, out / "quality", run_name=f"{config.name}-{arch}")
        minutes = (time.perf_counter() - started) / 60
        for r in result.history:
            print(f"  {arch} epoch {r['epoch']:2d}: train {r['train_loss']:8.2f}  "
                  f"test {r.get('test_loss') or float('nan'):8.2f}  "
                  f"holdout {r.get('holdout_loss') or float('nan'):8.2f}  nats/image  "
                  f"{r['images_per_s']:.0f} img/s", flush=True)
        finals[arch] = (result.history[-1], minutes)
    print("\nquality summary (negative ELBO per image, nats; goal: test < 16)")
    for arch, (last, minutes) in finals.items():
        print(f"  {arch:5s} epoch {last['epoch']}: train {last['train_loss']:.2f}, "
              f"test {last.get('test_loss') or float('nan'):.2f}, "
              f"holdout {last.get('holdout_loss') or float('nan'):.2f}  ({minutes:.1f} min this run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench.yaml"))
    parser.add_argument("--data", help="dataset folder (default: <config.out>/data; written if missing)")
    parser.add_argument("--out", help="output folder (default: <config.out>)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument("--accumulate", type=int, default=4,
                        help="train.accumulate of the extra multi-worker measurement")
    parser.add_argument("--quality", action="store_true", help="run the quality benchmark instead")
    parser.add_argument("--archs", default="mlp,conv,sprite")
    parser.add_argument("--epochs", type=int,
                        help="override train.epochs (a rerun continues the same runs to it)")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.epochs:
        config = _override(config, {"train.epochs": args.epochs})
    out = Path(args.out or config.out).resolve()
    data_dir = ensure_data(config, Path(args.data or out / "data").resolve())
    if args.quality:
        quality(config, data_dir, out, args.archs.split(","))
    else:
        for arch in args.archs.split(","):
            speed(_override(config, {"model.arch": arch}), data_dir, out / "speed", args.steps,
                  args.accumulate)


if __name__ == "__main__":
    main()
