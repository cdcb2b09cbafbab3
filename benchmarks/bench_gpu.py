"""The GPU paths checked and timed on one GPU, without Ray: training steps and the query engine.

    python -m benchmarks.bench_gpu [--checkpoint DIR] [--device cuda] [--only SECTIONS] [--quick]

Ray Train (`train.use_gpu: true`) and the query actors (`query.gpus_per_actor`) only move
these same calls onto a GPU worker; what runs on the GPU is here, so this script needs
torch, Pyro, h5py and pyarrow but not Ray (a GPU machine may not have it).

Checks (each prints PASS or FAIL; the exit status counts the failures):
- every architecture's encoder and decoder give the CPU's outputs on the GPU, same weights
  and inputs (TF32 off for the check: relative 1e-4);
- 100 Adam steps on one batch of rendered images lower its loss on the GPU below 0.6 of
  where it started and to within 10 % of the CPU's (the sampled z differ between devices),
  and weights saved from the GPU load on the CPU unchanged;
- `answer_queries` on the GPU and the CPU, the same checkpoint (--checkpoint, a trained one
  if given) and 3,000 mixed queries: the same rows, classes and errors; images differ only
  where float32 rounding moves a pixel probability across its noise (counted, < 1e-5).
Timings (CUDA synchronised around each timed call):
- the roof: matmul FLOP/s in float32 (torch's default, TF32 off), TF32 and bfloat16, and a
  3x3 convolution's FLOP/s (cuDNN's default, TF32 on);
- training steps (forward, backward, Adam) in images/s per architecture and batch size,
  with the step's counted FLOPs as a share of the float32 roof;
- queries: the network of a counterfactual (one encoder and two decoder passes) per
  architecture at the engine's chunk (NET_CHUNK rows) and at 4,096 rows; `answer_queries`
  counterfactuals/s on the GPU and on the CPU side by side; where its time goes (cProfile);
- N query actor processes sharing the GPU (`query.gpus_per_actor: 1/N`): the answers' CPU
  side is most of a GPU actor's time, so actors, not batch size, fill a GPU;
- a short training run of the bench config's data (configs/bench.yaml, rendered here) on
  the GPU: the reader alone, images/s of the loop, test loss per epoch.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.fixtures import at_once, checkpoint, counterfactual_passes, counterfactual_queries, mixed_queries
from cvae.causal.image import NET_CHUNK, ImageSCM
from cvae.config import load_config
from cvae.data.grid import NUM_IMAGES, index_to_classes
from cvae.data.images import decode_image
from cvae.data.reader import ShardReader
from cvae.data.render import render
from cvae.data.shards import write_dataset
from cvae.model.checkpoint import load_checkpoint, save_checkpoint
from cvae.model.networks import NUM_PIXELS, SupervisedVAE
from cvae.model.train import batch_tensors, split_loss
from cvae.serve.queries import answer_queries

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("mlp", "conv", "sprite")
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, items: int, device: torch.device, seconds: float, warmup: int = 3, calls: int = 3) -> float:
    """items/s of fn, called at least `calls` times and for at least `seconds`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        if count >= calls:
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return items * count / elapsed


def batch(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n rendered dSprites images of random classes, as the model takes them."""
    index = np.random.default_rng(seed).integers(0, NUM_IMAGES, n)
    classes = index_to_classes(index, with_color=False)
    x = torch.as_tensor(render(classes).reshape(n, NUM_PIXELS), dtype=torch.float32)
    return x.to(device), torch.as_tensor(classes, dtype=torch.long).to(device)


def counted_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- roof

def matmul_rate(device: torch.device, dtype: torch.dtype, tf32: bool, n: int, seconds: float) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    try:
        return 2 * n**3 * rate(lambda: a @ b, 1, device, seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def conv_rate(device: torch.device, rows: int, seconds: float) -> float:
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(rows, 64, 32, 32, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        flops = counted_flops(lambda: conv(x))
        return flops * rate(lambda: conv(x), 1, device, seconds)


# ----------------------------------------------------------------------------- checks

def check_networks(device: torch.device) -> None:
    torch.backends.cudnn.allow_tf32 = False
    try:
        for arch in ARCHS:
            torch.manual_seed(0)
            cpu = SupervisedVAE(arch).eval()
            gpu = copy.deepcopy(cpu).to(device)
            x, y = batch(256, torch.device("cpu"))
            with torch.no_grad():
                loc, scale = cpu.encode(x, y)
                logits = cpu.decode(loc, y)
                gloc, gscale = gpu.encode(x.to(device), y.to(device))
                glogits = gpu.decode(loc.to(device), y.to(device))
            worst = max(float((a - b.cpu()).abs().max() / a.abs().max().clamp_min(1e-12))
                        for a, b in ((loc, gloc), (scale, gscale), (logits, glogits)))
            check(f"{arch} networks agree with the CPU", worst < 1e-4, f"largest relative difference {worst:.2e}")
    finally:
        torch.backends.cudnn.allow_tf32 = True


def adam_steps(arch: str, device: torch.device, steps: int = 100) -> tuple[SupervisedVAE, list[float]]:
    """`steps` Adam steps on one batch of 256 rendered images: the model and its losses."""
    torch.manual_seed(0)
    model = SupervisedVAE(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = batch(256, device)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()) / len(x))
    return model, losses


def check_training(device: torch.device, work: Path) -> None:
    for arch in ARCHS:
        model, losses = adam_steps(arch, device)
        _, cpu_losses = adam_steps(arch, torch.device("cpu"))
        first, last, cpu_last = np.mean(losses[:10]), np.mean(losses[-10:]), np.mean(cpu_losses[-10:])
        finite = all(math.isfinite(v) for v in losses)
        learns = finite and last < 0.6 * first and abs(last / cpu_last - 1) < 0.1
        check(f"{arch} learns on the GPU as on the CPU", learns,
              f"loss {first:.1f} -> {last:.1f} nats/image over 100 steps (CPU: -> {cpu_last:.1f})")
        folder = save_checkpoint(work / f"saved-{arch}", model, {"epoch": 0})
        loaded, _ = load_checkpoint(folder, device="cpu")
        same = all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        check(f"{arch} GPU checkpoint loads on the CPU", same, "every tensor equal" if same else "tensors differ")


def check_answers(ckpt: str, device: torch.device, rows: int) -> None:
    queries = mixed_queries(rows)
    cpu_answers, cpu_errors = answer_queries(ImageSCM.from_checkpoint(ckpt, device="cpu"), queries)
    gpu_answers, gpu_errors = answer_queries(ImageSCM.from_checkpoint(ckpt, device=device), queries)
    columns = [c for c in cpu_answers.column_names if c != "image"]
    same_rows = cpu_answers.select(columns).equals(gpu_answers.select(columns))
    check("answers: same rows, samples and classes on the GPU", same_rows,
          f"{cpu_answers.num_rows} result rows, {cpu_errors.num_rows} errors")
    check("answers: same errors on the GPU", cpu_errors.equals(gpu_errors), f"{gpu_errors.num_rows} error rows")
    if not same_rows:
        return
    a = np.stack([decode_image(v) for v in cpu_answers.column("image").to_pylist()])
    b = np.stack([decode_image(v) for v in gpu_answers.column("image").to_pylist()])
    differ = int((a != b).sum())
    rows_differ = int((a != b).any(axis=(1, 2)).sum())
    check("answers: images as on the CPU", differ / a.size < 1e-5,
          f"{differ} of {a.size:,} pixels differ ({rows_differ} of {len(a)} images), "
          f"{(a == b).all(axis=(1, 2)).mean():.4%} of images identical")


# ----------------------------------------------------------------------------- timings

def step_rate(arch: str, rows: int, device: torch.device, seconds: float) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the training step at `rows` rows."""
    torch.manual_seed(0)
    model = SupervisedVAE(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = batch(rows, device)

    def step():
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = counted_flops(lambda: model(x, y).backward()) / rows
    return rate(step, rows, device, seconds), flops


def training_rates(device: torch.device, roof: float, batches: list[int], seconds: float) -> None:
    print(f"\ntraining step (forward, backward, Adam), images/s on {device}; share of the float32 roof")
    print(f"  {'arch':7s}" + "".join(f"{f'batch {b}':>22s}" for b in batches) + f"{f'batch {batches[-1]} TF32':>24s}")
    for arch in ARCHS:
        cells = []
        for rows, tf32 in [(b, False) for b in batches] + [(batches[-1], True)]:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ips, flops = step_rate(arch, rows, device, seconds)
            torch.backends.cuda.matmul.allow_tf32 = False
            cells.append(f"{ips:>12,.0f} ({100 * ips * flops / roof:4.1f}%)")
        print(f"  {arch:7s}" + "".join(f"{c:>22s}" for c in cells[:-1]) + f"{cells[-1]:>24s}", flush=True)


def network_rate(model: SupervisedVAE, rows: int, device: torch.device, seconds: float) -> tuple[float, float]:
    """(counterfactuals/s, FLOPs per counterfactual) of one encoder and two decoder passes."""
    x, y = batch(rows, device)

    def network():
        counterfactual_passes(model, x, y)

    return rate(network, rows, device, seconds), counted_flops(network) / rows


def network_rates(device: torch.device, roof: float, seconds: float) -> None:
    print(f"\nthe network of a counterfactual (encoder + 2 decoders), counterfactuals/s on {device}")
    for arch in ARCHS:
        model = SupervisedVAE(arch).to(device).eval()
        cells = []
        for rows in (NET_CHUNK, 4096):
            qps, flops = network_rate(model, rows, device, seconds)
            cells.append(f"{rows} rows {qps:>11,.0f}/s ({100 * qps * flops / roof:4.1f}% of roof)")
        print(f"  {arch:7s} {flops / 1e6:7.1f} MFLOP each; " + "; ".join(cells), flush=True)


def query_rates(ckpt_for, device: torch.device, rows: int, seconds: float) -> None:
    print(f"\nanswer_queries, {rows:,} counterfactuals (one sample each) per call")
    table = counterfactual_queries(rows)
    for arch in ARCHS:
        places = (device, torch.device("cpu")) if arch == "sprite" and device.type != "cpu" else (device,)
        cells = []
        for where in places:
            scm = ImageSCM.from_checkpoint(ckpt_for(arch), device=where)
            qps = rate(lambda scm=scm: answer_queries(scm, table), rows, where, seconds, warmup=1, calls=2)
            cells.append(f"{where.type} {qps:,.0f}/s")
        print(f"  {arch:7s} " + ", ".join(cells), flush=True)
    scm = ImageSCM.from_checkpoint(ckpt_for("sprite"), device=device)
    answer_queries(scm, table)
    profile = cProfile.Profile()
    profile.enable()
    answer_queries(scm, table)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    print(f"  where one call's time goes on {device} (sprite; cProfile, by own time):")
    for line in lines[2:16]:
        print("    " + line)


def bench_training(device: torch.device, work: Path, epochs: int, seconds_cap: float,
                   max_steps: int | None = None) -> None:
    config = load_config(ROOT / "configs" / "bench.yaml")
    batch_size = config.train.batch_size * config.train.num_workers  # the bench config's global batch
    print(f"\nthe bench config's data on {device}: sprite, batch {batch_size}, Adam lr {config.train.lr}")
    started = time.perf_counter()
    write_dataset(config, work / "data")
    print(f"  rendered and sharded in {time.perf_counter() - started:.1f} s", flush=True)
    reader = ShardReader(work / "data", "train", batch_size=batch_size, seed=0,
                         shuffle_buffer=config.train.shuffle_buffer)
    test = ShardReader(work / "data", "test", batch_size=1024, seed=0, shuffle_buffer=1024)
    started, count = time.perf_counter(), 0
    for b in reader.epoch(1):
        count += len(b)
    print(f"  reader alone: {count / (time.perf_counter() - started):,.0f} images/s", flush=True)
    torch.manual_seed(0)
    model = SupervisedVAE.from_config(config.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    run_started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        started, count, total = time.perf_counter(), 0, 0.0
        for step, b in enumerate(reader.epoch(epoch)):
            if max_steps is not None and step >= max_steps:
                break
            x, y = batch_tensors(b, device)
            loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            count += len(x)
        sync(device)
        seconds = time.perf_counter() - started
        print(f"  epoch {epoch}: train {total / count:7.2f}, test {split_loss(model, test, device):7.2f} nats/image; "
              f"{count / seconds:,.0f} images/s ({seconds:.1f} s)", flush=True)
        if time.perf_counter() - run_started > seconds_cap:
            print(f"  (stopped after {epoch} epochs: the {seconds_cap:.0f} s cap)")
            break


def _actor(ckpt: str, device: str, threads: int, rows: int, calls: int, barrier, results) -> None:
    """One query actor's work in its own process: load, warm up, then answer `calls` batches."""
    torch.set_num_threads(threads)
    scm = ImageSCM.from_checkpoint(ckpt, device=device)
    table = counterfactual_queries(rows)
    answer_queries(scm, table)
    barrier.wait()
    started = time.perf_counter()
    for _ in range(calls):
        answer_queries(scm, table)
    results.put(time.perf_counter() - started)


def shared_gpu_rates(ckpt: str, device: torch.device, layouts: list[int], rows: int, calls: int) -> None:
    """Counterfactuals/s of N actor processes sharing one GPU (`query.gpus_per_actor: 1/N`),
    each with its share of the CPUs as torch threads (`query.cpus_per_actor`)."""
    cpus = os.cpu_count() or 1
    print(f"\nN actor processes sharing one {device.type.upper()} ({cpus} CPUs split between them), "
          f"each answering {calls} x {rows:,} counterfactuals after a warm-up")
    for n in layouts:
        threads = max(1, cpus // n)
        times = at_once(_actor, (ckpt, str(device), threads, rows, calls), n)
        total = n * calls * rows / max(times)
        print(f"  {n} actor(s) of {threads} thread(s): {total:,.0f}/s in all, {total / n:,.0f}/s each", flush=True)


SECTIONS = ("checks", "roof", "training", "network", "queries", "shared", "bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", help="a trained checkpoint for the answer checks (default: untrained)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script on a CPU")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"unknown sections {sorted(only - set(SECTIONS))}; expected some of {SECTIONS}")
    device = torch.device(args.device)
    quick = args.quick
    seconds = 0.2 if quick else 1.5
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}); torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"python {sys.version.split()[0]}")
    ckpts = {arch: checkpoint(work / f"untrained-{arch}", 50, 1000, arch) for arch in ARCHS}

    if "checks" in only:
        print("\nchecks")
        check_networks(device)
        check_training(device, work)
        check_answers(args.checkpoint or ckpts["sprite"], device, 300 if quick else 3000)
    n = 256 if quick else 8192
    roof = matmul_rate(device, torch.float32, False, n, seconds)
    if "roof" in only:
        tf32 = matmul_rate(device, torch.float32, True, n, seconds)
        bf16 = matmul_rate(device, torch.bfloat16, False, n, seconds)
        conv = conv_rate(device, 16 if quick else 1024, seconds)
        print(f"\nroof: matmul {n}x{n}: float32 {roof / 1e12:.1f} TFLOP/s, TF32 {tf32 / 1e12:.1f}, bfloat16 "
              f"{bf16 / 1e12:.1f}; 3x3 conv 64->64 at 32x32: {conv / 1e12:.1f} TFLOP/s", flush=True)
    if "training" in only:
        training_rates(device, roof, [128, 512] if quick else [128, 1024, 8192], seconds)
    if "network" in only:
        network_rates(device, roof, seconds)
    if "queries" in only:
        query_rates(ckpts.__getitem__, device, 500 if quick else 20_000, seconds)
    if "shared" in only:
        shared_gpu_rates(ckpts["sprite"], device, [1, 2] if quick else [1, 2, 4, 8], 500 if quick else 10_000,
                         1 if quick else 3)
    if "bench" in only:
        bench_training(device, work, 1 if quick else 10, 10 if quick else 150, 20 if quick else None)
    print(f"\n{len(FAILURES)} check(s) failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
