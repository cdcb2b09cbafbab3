"""Counterfactuals at classes a model never saw: each architecture trained by the pipeline on
the same strided data, then asked, from test-split sources, for `do` values between the
classes it saw (interpolation), beyond them (extrapolation), and on its training grid.

    python -m benchmarks.bench_generalise --config configs/local.yaml [--archs sprite,warp]
    python -m benchmarks.bench_generalise --config configs/generalise.yaml   # every 4th orientation,
                                                                             # positions 28-31 never seen
    python -m benchmarks.bench_generalise --speed [--archs sprite,warp]     # steps and passes, side by side

For each arch: the pipeline runs on the config with `model.arch` replaced (out: OUT/<arch>;
its report scores the queries on the model's declared grid), then this asks every source
one `do` per (factor, kind) below (and, "unseen source", the source moved to a class of the
factor it never saw, taken back to a seen one), answered through the SCM with the model's grid ignored
(so a model that would refuse these is measured too), and reads every answer back over the
whole 737,280-image grid: IoU with the true image, effectiveness, preservation. Prints a
table and writes OUT/generalise.json and OUT/unseen_<arch>.png (rows: factual, answers at
unseen classes, truth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cvae.causal.image import ImageSCM
from cvae.config import load_config
from cvae.data.grid import FACTOR_SIZES, FACTORS, ModelGrid, classes_to_index, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.data.readout import Readout
from cvae.data.shards import MANIFEST, read_manifest
from cvae.evaluate.metrics import Sums, score
from cvae.figures import save_image_grid
from cvae.model.checkpoint import load_meta
from cvae.model.networks import SupervisedVAE
from cvae.pipeline import run_pipeline
from cvae.serve.make_queries import split_indices

KINDS = ("trained", "interpolation", "extrapolation", "unseen source")


def do_classes(trained: ModelGrid, factor: str, kind: str) -> np.ndarray:
    """The classes of `factor` a query of `kind` may ask for."""
    seen = trained.classes[factor]
    every = np.arange(FACTOR_SIZES[factor])
    if kind in ("trained", "unseen source"):  # an unseen source is taken back to a seen class
        return seen
    unseen = np.setdiff1d(every, seen)
    inside = (unseen > seen.min()) & (unseen < seen.max())
    if factor == "orientation":  # a circle: every unseen angle lies between two seen ones
        inside[:] = True
    return unseen[inside] if kind == "interpolation" else unseen[~inside]


def measure(checkpoint: str, data_dir: str, sources: int, seed: int, figure: Path) -> dict:
    """{kind: {factor: summary}} for the checkpoint's answers (see the module docstring)."""
    manifest = read_manifest(Path(data_dir)) if Path(data_dir, MANIFEST).exists() else load_meta(checkpoint)["manifest"]
    trained = ModelGrid.of_manifest(manifest)
    truth = GroundTruth.from_manifest(manifest)
    readout = Readout.of(truth)
    scm = ImageSCM.from_checkpoint(checkpoint)
    scm = ImageSCM(scm.vae, scm.factors, abduct_z=scm.abduct_z, device=scm.device)  # the whole grid
    rng = np.random.default_rng(seed)
    index = rng.choice(split_indices(data_dir, "test"), sources, replace=False)
    results, shown = {}, []
    for kind in KINDS:
        for j, f in enumerate(FACTORS):
            values = do_classes(trained, f, kind)
            if f in ("shape", "scale") or not len(values) or (kind == "unseen source" and trained.is_whole(f)):
                continue
            factual = index_to_classes(index, with_color=False)
            if kind == "unseen source":  # the test image moved to a class of f it never saw
                factual[:, j] = rng.choice(np.setdiff1d(np.arange(FACTOR_SIZES[f]), trained.classes[f]), sources)
            images = truth.images(classes_to_index(factual)).reshape(sources, -1)
            do = np.full((sources, len(FACTORS)), -1)
            do[:, j] = rng.choice(values, sources)
            keys = rng.integers(0, 2**63, sources, dtype=np.int64).astype(np.uint64)
            answer = scm.answer(np.full(sources, "counterfactual"), np.full_like(do, -1), do, factual,
                                images, keys).images
            target = np.where(do >= 0, do, factual)
            true_cf = truth.images(classes_to_index(target))
            readback = readout.read(answer, classes_to_index(target)[:, None])
            sums = Sums()
            preserved = do < 0
            sums.add(score(answer, true_cf, do, factual, preserved, readback), np.ones(sources, bool),
                     do, preserved, np.zeros_like(preserved))
            s = sums.summary()
            results.setdefault(kind, {})[f] = {k: s[k] for k in ("count", "iou", "effectiveness", "preservation")}
            if kind in ("interpolation", "extrapolation"):
                shown.append((f"{kind[:6]} {f}", answer[:8], true_cf[:8]))
    if shown:
        rows = [truth.images(index[:8])] + [r for _, a, t in shown for r in (a, t)]
        labels = ["factual"] + [lab for name, _, _ in shown for lab in (f"{name}", "truth")]
        save_image_grid(figure, rows, row_labels=labels, title="Counterfactuals at unseen classes")
    return {"trained_grid": trained.to_dict()["classes"], "results": results}


def speed(archs: list[str], rounds: int = 7, steps: int = 10) -> None:
    """Images/s of training steps and of query passes per arch, alternated (see the docstring)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    classes = np.stack([rng.integers(0, n, 256) for n in FACTOR_SIZES.values()], axis=1)
    x = torch.as_tensor(GroundTruth().images(classes_to_index(classes)).reshape(256, -1), dtype=torch.float32)
    y = torch.as_tensor(classes)
    models = {a: SupervisedVAE(a, 50) for a in archs}
    optimisers = {a: torch.optim.Adam(m.parameters(), 1e-3) for a, m in models.items()}
    train, query = {a: [] for a in archs}, {a: [] for a in archs}
    for _ in range(rounds):
        for a, model in models.items():
            started = time.perf_counter()
            for i in range(steps):
                rows = slice(32 * (i % 8), 32 * (i % 8) + 32)
                loss = model(x[rows], y[rows])
                optimisers[a].zero_grad()
                loss.backward()
                optimisers[a].step()
            train[a].append(32 * steps / (time.perf_counter() - started))
            with torch.no_grad():
                started = time.perf_counter()
                for _ in range(steps):
                    model.decode(model.encode(x, y)[0], y)
                query[a].append(256 * steps / (time.perf_counter() - started))
    for a in archs:
        weights = sum(p.numel() for p in models[a].parameters())
        print(f"{a:8} training {statistics.median(train[a]):7.0f} images/s   query passes "
              f"{statistics.median(query[a]):7.0f} images/s   ({weights:,} weights)")


def coverage_now(checkpoint: str, data_dir: str) -> dict:
    """The checkpoint's coverage measured by this cvae (cvae.model.coverage), whatever the
    version that trained it recorded."""
    from cvae.model.checkpoint import load_checkpoint
    from cvae.model.coverage import measure_coverage

    vae, meta = load_checkpoint(checkpoint, device="cpu")
    manifest = read_manifest(Path(data_dir))
    return measure_coverage(vae, ModelGrid.of_manifest(manifest), GroundTruth.from_manifest(manifest),
                            torch.device("cpu"), seed=meta["config"]["seed"])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--archs", default="sprite,warp")
    parser.add_argument("--out", default=None, help="default: runs/generalise-<config name>")
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--speed", action="store_true", help="time the archs side by side instead")
    args = parser.parse_args()
    if args.speed:
        return speed(args.archs.split(","))
    base = load_config(args.config)
    out = Path(args.out or f"runs/generalise-{base.name}")
    table = {}
    for arch in args.archs.split(","):
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch))
        summary = run_pipeline(config, out / arch)
        checkpoint = summary["files"]["best checkpoint"]
        meta = load_meta(checkpoint)
        row = measure(checkpoint, str(out / arch / "data"), args.sources, args.seed, out / f"unseen_{arch}.png")
        row.update(test_loss=meta["metrics"].get("test_loss"), validation_loss=meta["metrics"].get("validation_loss"),
                   train_minutes=round(sum(h["seconds"] for h in meta["history"]) / 60, 2),
                   declared_grid=meta.get("grid"), coverage=coverage_now(checkpoint, str(out / arch / "data")),
                   pipeline_overall=summary.get("overall"))
        table[arch] = row
        (out / "generalise.json").write_text(json.dumps(table, indent=2, default=str))
    lines = [f"{'arch':8} {'kind':14} {'factor':12} {'n':>5} {'IoU':>6} {'eff':>6} {'pres':>6}"]
    for arch, row in table.items():
        for kind, factors in row["results"].items():
            for f, s in factors.items():
                lines.append(f"{arch:8} {kind:14} {f:12} {s['count']:5d} {s['iou']:6.3f} "
                             f"{s['effectiveness']:6.3f} {s['preservation']:6.3f}")
        lines.append(f"{arch:8} test loss {row['test_loss']:.2f}, training {row['train_minutes']} min, "
                     f"coverage {row['coverage']}")
    (out / "generalise.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'generalise.json'} and generalise.txt")


if __name__ == "__main__":
    main()
