"""The pretrained recipe's quality against training wall time: every epoch's checkpoint of a
`configs/pretrained.yaml` run answers the run's own counterfactual queries (sources drawn
from the test split of the whole grid) through the query job, and each answer set is read
back over the whole 737,280-image grid by the evaluation.

    python -m benchmarks.bench_pretrained [--run runs/pretrained] [--out benchmarks/results/pretrained]

Prints one line per epoch (cumulative training minutes, losses, IoU, effectiveness,
preservation, the weakest factor) against the goal (IoU >= 0.97, effectiveness and
preservation >= 0.99) and writes `quality_vs_time.png` and `quality_vs_time.json` under
--out, with `official_frames.png`: the last epoch's counterfactuals of official frames.
Needs the run's train/ and queries/ folders (the pipeline's stages 2 and 3).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cvae.causal.image import ImageSCM
from cvae.data.fidelity import load_reference
from cvae.evaluate.official import save_official_figure
from cvae.evaluate.scores import evaluate
from cvae.figures import save_curves
from cvae.model.checkpoint import EPOCH_PREFIX, load_meta
from cvae.serve.engine import run_query_job

GOAL = {"iou": 0.97, "effectiveness": 0.99, "preservation": 0.99}


def epoch_checkpoints(run: Path) -> list[Path]:
    found = sorted(run.glob(f"train/*/{EPOCH_PREFIX}*"))
    if not found:
        raise SystemExit(f"{run}/train holds no {EPOCH_PREFIX}* folders: run the pipeline on configs/pretrained.yaml")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/pretrained")
    parser.add_argument("--out", default="benchmarks/results/pretrained")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for checkpoint in epoch_checkpoints(run):
            meta = load_meta(checkpoint)
            answers = Path(scratch) / checkpoint.name
            run_query_job(str(checkpoint), str(run / "queries"), str(answers), actors=args.actors, overwrite=True)
            report = evaluate(answers, checkpoint, Path(scratch) / f"eval-{checkpoint.name}", run / "queries",
                              figures_per_factor=0, reversibility_samples=0, composition_samples=0)
            o = report["overall"]
            weakest = min(o["preservation_by_factor"].items(), key=lambda kv: kv[1])
            metrics = meta["metrics"]
            rows.append({"epoch": meta["epoch"], "minutes": round(sum(h["seconds"] for h in meta["history"]) / 60, 1),
                         "train_loss": metrics.get("train_loss"), "validation_loss": metrics.get("validation_loss"),
                         "count": o["count"], "iou": o["iou"], "effectiveness": o["effectiveness"],
                         "preservation": o["preservation"], "weakest": weakest,
                         "by_scale": {k: s and s["preservation"] for k, s in report["by_scale"].items()}})
            r = rows[-1]
            met = all(r[k] >= v for k, v in GOAL.items())
            print(f"epoch {r['epoch']}: {r['minutes']:5.1f} min of training, validation loss "
                  f"{r['validation_loss']:.2f}; {r['count']} intervened: IoU {r['iou']:.3f}, effectiveness "
                  f"{r['effectiveness']:.3f}, preservation {r['preservation']:.3f} (weakest: {weakest[0]} "
                  f"{weakest[1]:.3f}){'  goal met' if met else ''}", flush=True)
    minutes = [r["minutes"] for r in rows]
    curves = {name: (minutes, [r[name] for r in rows]) for name in GOAL}
    curves["goal: effectiveness and preservation 0.99"] = ([0, max(minutes)], [0.99, 0.99])
    curves["goal: IoU 0.97"] = ([0, max(minutes)], [0.97, 0.97])
    save_curves(out / "quality_vs_time.png", curves, xlabel="training wall time (minutes, 2 CPU cores)",
                ylabel="counterfactuals read back over the whole grid",
                title="configs/pretrained.yaml: quality of each epoch's checkpoint")
    (out / "quality_vs_time.json").write_text(json.dumps({"goal": GOAL, "epochs": rows}, indent=1))
    last = epoch_checkpoints(run)[-1]
    save_official_figure(ImageSCM.from_checkpoint(last, device="cpu"), *load_reference(),
                         out / "official_frames.png")
    print(f"wrote {out / 'quality_vs_time.png'}, {out / 'quality_vs_time.json'} and "
          f"{out / 'official_frames.png'} (the last epoch's counterfactuals of official frames)")


if __name__ == "__main__":
    main()
