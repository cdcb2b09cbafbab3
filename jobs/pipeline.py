"""The main job: data -> training -> counterfactual queries -> answers -> evaluation.

    python -m jobs.pipeline --config configs/local.yaml [--out DIR] [--force STAGE ...]

A rerun reuses every finished stage whose inputs did not change (one line says so) and
redoes the rest; `--force STAGE` redoes a stage anyway (data, train, queries, answers,
evaluate, or all; repeat it for several). Forcing train starts it from scratch.

Runs on a local Ray started in-process unless the config names `ray_address` (or the
job was submitted to a cluster with `ray job submit`, which sets RAY_ADDRESS).
"""
from __future__ import annotations

import argparse
import sys

from cvae.config import load_config
from cvae.logs import add_level_option, configure
from jobs import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--out", help="output folder (default: the config's out)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        choices=("data", "train", "queries", "answers", "evaluate", "all"),
                        help="redo this stage even if it is finished (repeatable; 'all' for every stage)")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)
    config = load_config(args.config)
    from cvae.pipeline import run_pipeline  # after the config's check: the stages import torch and Ray

    summary = run_pipeline(config, args.out, force=args.force)
    print("\n== summary " + "=" * 50)
    print(f"finished in {summary['seconds']:.0f} s "
          f"({', '.join(f'{k.split()[-1]} {v:.0f} s' for k, v in summary['stage_seconds'].items())})")
    best = summary["best epoch"]
    if best is not None:
        losses = ", ".join(f"{split} loss {best[f'{split}_loss']:.2f}" for split in ("validation", "test")
                           if best.get(f"{split}_loss") is not None)
        print(f"best checkpoint: epoch {best['epoch']} (by {best['best_by'].replace('_', ' ')}), "
              f"{losses} nats/image")
    for line in summary.get("headline") or []:  # the evaluation's own headline (cvae.evaluate.report.headline)
        print(f"counterfactuals vs ground truth: {line}")
    print("files written:")
    for name, path in summary["files"].items():
        if isinstance(path, list):  # the evaluation's figures, one per line
            print(f"  {name}:" + "".join(f"\n    {one}" for one in path))
        else:
            print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
