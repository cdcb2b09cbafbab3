"""Counterfactual data augmentation against a spurious correlation, with a bulk dataset.

    python -m benchmarks.bench_augment [--train 2400] [--test 3000] [--steps 1500] [--out benchmarks/results/augment]

A small CNN learns the shape of rendered dSprites images (cvae.data.render) from a biased
training set, where shape and scale go together 95 % of the time (squares small, ellipses
middling, hearts large; the other factors uniform), and is tested on an unbiased set (every
factor uniform and independent). Twice, with the same network, seed and number of steps:

1. on the biased images alone;
2. on the biased images plus their counterfactuals do(scale = every other scale), made by
   the bulk path the way a user would: `make_queries` with the training images as
   `sources: {indices: ...}`, then `run_query_job` with the pretrained whole-grid model and
   `keep="verified"` (only answers that read back as their own classes), streamed back as
   (factual, counterfactual, intervention) triples by `cvae.serve.stream.CounterfactualPairs`.
   The label of a counterfactual is its world's shape (the factual's: scale was intervened on).

Prints the accuracies (unbiased and biased test sets), the dataset sizes and the time of
each phase, and writes `results.json` and `augment.png` to --out. One torch thread.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cvae.data.grid import FACTOR_SIZES, FACTORS, classes_to_index
from cvae.data.render import render

GROUPS = {0: (0, 1), 1: (2, 3), 2: (4, 5)}  # shape -> the scales it takes in 95 % of training images
SHAPES = ("square", "ellipse", "heart")


def draw_classes(n: int, rng: np.random.Generator, bias: float) -> np.ndarray:
    """(n, 5) classes: shape uniform, scale from its shape's group with probability `bias`
    and from the other groups otherwise (bias 0: uniform), orientation and positions uniform."""
    classes = np.stack([rng.integers(0, FACTOR_SIZES[f], n) for f in FACTORS], 1)
    if bias == 0:
        return classes
    biased = rng.random(n) < bias
    for i, shape in enumerate(classes[:, 0]):
        pool = GROUPS[shape] if biased[i] else [s for s in range(6) if s not in GROUPS[shape]]
        classes[i, 1] = pool[rng.integers(0, len(pool))]
    return classes


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 3))


def train(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0, batch: int = 64) -> nn.Module:
    """The same network, seed and number of steps whatever the data (batches drawn with replacement)."""
    torch.manual_seed(seed)
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        at = torch.randint(0, len(images), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(net(images[at]), labels[at])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    predicted = torch.cat([net(images[i:i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return float((predicted == labels).float().mean())


def as_tensors(classes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(render(classes)[:, None].astype(np.float32)),
            torch.from_numpy(classes[:, 0].astype(np.int64)))


def counterfactuals(train_classes: np.ndarray, work: Path) -> tuple[torch.Tensor, torch.Tensor, dict, list]:
    """do(scale = every other scale) of every training image through the bulk path; returns
    (images, shape labels, the job's summary, a few triples for the figure)."""
    from torch.utils.data import DataLoader

    from cvae.serve.engine import run_query_job
    from cvae.serve.make_queries import make_queries
    from cvae.serve.stream import CounterfactualPairs

    sources = sorted(set(classes_to_index(train_classes).tolist()))
    make_queries({"seed": 0, "sources": {"indices": sources},
                  "interventions": [{"factor": "scale", "values": "other"}]}, work / "queries")
    summary = run_query_job("pretrained", work / "queries", work / "answers", actors=2, keep="verified",
                            command="python -m benchmarks.bench_augment")
    images, labels, examples = [], [], []
    pairs = CounterfactualPairs(work / "answers", queries=work / "queries", verified_only=True)
    for batch in DataLoader(pairs, batch_size=1024, num_workers=2):
        images.append(batch["counterfactual"])
        labels.append(batch["classes"][:, 0])
        if not examples:
            examples = [(batch["factual"][i, 0], batch["counterfactual"][i, 0], batch["do"][i]) for i in range(6)]
    return torch.cat(images), torch.cat(labels), summary, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2400, help="biased training images")
    parser.add_argument("--test", type=int, default=3000, help="images of each test set")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each classifier (batch 64)")
    parser.add_argument("--bias", type=float, default=0.95)
    parser.add_argument("--out", default="benchmarks/results/augment")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    train_classes = draw_classes(args.train, rng, args.bias)
    x, y = as_tensors(train_classes)
    unbiased = as_tensors(draw_classes(args.test, rng, 0.0))
    biased = as_tensors(draw_classes(args.test, rng, args.bias))
    agree = np.mean([s in GROUPS[sh] for sh, s in train_classes[:, :2]])
    print(f"training set: {args.train:,} rendered images, shape and scale agree in {agree:.1%}; "
          f"test sets: {args.test:,} unbiased, {args.test:,} biased")
    report, times = {"train_images": args.train, "test_images": args.test, "bias": args.bias, "steps": args.steps}, {}

    t = time.perf_counter()
    plain = train(x, y, args.steps)
    times["train_plain"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cx, cy, summary, examples = counterfactuals(train_classes, Path(tmp))
        times["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    augmented = train(torch.cat([x, cx]), torch.cat([y, cy]), args.steps)
    times["train_augmented"] = time.perf_counter() - t
    report.update(counterfactual_queries=summary["queries"], counterfactuals_verified=summary["result_rows"],
                  counterfactuals_rejected=summary["rejected_rows"], augmented_images=args.train + len(cx))
    for name, net in (("plain", plain), ("augmented", augmented)):
        report[name] = {"unbiased": accuracy(net, *unbiased), "biased": accuracy(net, *biased)}
    report["seconds"] = {k: round(v, 1) for k, v in times.items()} | {"total": round(time.perf_counter() - started, 1)}
    print_report(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    figure(out / "augment.png", report, examples)
    print(f"wrote {out / 'results.json'} and {out / 'augment.png'}")


def print_report(r: dict) -> None:
    gain = r["augmented"]["unbiased"] - r["plain"]["unbiased"]
    print(f"counterfactuals: {r['counterfactual_queries']:,} queries do(scale = every other scale), "
          f"{r['counterfactuals_verified']:,} verified and kept, {r['counterfactuals_rejected']:,} rejected")
    print(f"{'classifier':<12} {'train images':>12} {'unbiased test':>14} {'biased test':>12}")
    print(f"{'plain':<12} {r['train_images']:>12,} {r['plain']['unbiased']:>14.3f} {r['plain']['biased']:>12.3f}")
    print(f"{'augmented':<12} {r['augmented_images']:>12,} {r['augmented']['unbiased']:>14.3f} "
          f"{r['augmented']['biased']:>12.3f}")
    met = r["augmented"]["unbiased"] >= 0.95 and gain >= 0.15
    print(f"gain on the unbiased test: {gain * 100:+.1f} points (goal: augmented >= 0.95 and >= +15 points: "
          f"{'met' if met else 'MISSED'})")
    s = r["seconds"]
    print(f"time: plain training {s['train_plain']} s, counterfactuals (queries, Ray job with --keep verified, "
          f"streaming) {s['generate']} s, augmented training {s['train_augmented']} s, total {s['total']} s")


def figure(path: Path, r: dict, examples: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 4))
    ax = fig.add_axes([0.06, 0.12, 0.3, 0.76])
    names = ["plain", "augmented"]
    for k, test in enumerate(("unbiased", "biased")):
        ax.bar(np.arange(2) + 0.38 * k, [r[n][test] for n in names], 0.36, label=f"{test} test")
    ax.set_xticks(np.arange(2) + 0.19, [f"{n}\n({r['train_images' if n == 'plain' else 'augmented_images']:,} images)"
                                        for n in names])
    ax.set_ylim(0, 1.05), ax.set_ylabel("shape accuracy"), ax.legend(loc="lower right")
    ax.set_title(f"trained with shape~scale bias {r['bias']:.0%}")
    for k, (factual, cf, do) in enumerate(examples[:6]):
        for row, image in enumerate((factual, cf)):
            sub = fig.add_axes([0.42 + 0.095 * k, 0.5 - 0.42 * row, 0.09, 0.38])
            sub.imshow(image.numpy(), cmap="gray_r"), sub.set_xticks([]), sub.set_yticks([])
            if row == 0:
                sub.set_title("factual" if k == 0 else "", fontsize=8)
            else:
                sub.set_xlabel(f"do(scale={int(do[1])})", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
