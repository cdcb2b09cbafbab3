"""Train the supervised VAE with Ray Train.

    python -m jobs.train --config configs/local.yaml [--data DIR] [--out DIR] [--run-name NAME]

Defaults: data from <config.out>/data, checkpoints and metrics into <config.out>/train.
Running again with the same run name (default: the config's name) and output folder
continues from the latest checkpoint. --config, --data and --out may be local paths or
pyarrow-filesystem URIs (file://, s3://, gs://); a URI output needs Ray Train workers
(train.num_workers >= 1), which write the checkpoints there.
"""
from __future__ import annotations

import argparse
import sys

from cvae import fs
from cvae.config import load_config
from cvae.errors import ConfigError
from cvae.logs import add_level_option, configure
from jobs import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--data", help="dataset folder written by jobs.prepare_data")
    parser.add_argument("--out", help="output folder for checkpoints, metrics and figures")
    parser.add_argument("--run-name", help="Ray Train run name; reuse it to resume")
    add_level_option(parser)
    args = parser.parse_args(argv)
    configure(args.log_level)

    config = load_config(args.config)
    # Strings, not Paths: Path("s3://bucket/x") is "s3:/bucket/x".
    data = args.data or fs.join(config.out, "data")
    out = args.out or fs.join(config.out, "train")
    manifest = fs.join(data, "manifest.json")
    try:
        found = fs.exists(manifest)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"no dataset at {data}: cannot read {manifest}: {exc}") from None
    if not found:
        raise ConfigError(f"no dataset at {data}: {manifest} is missing "
                          f"(write one with python -m jobs.prepare_data)")
    fs.check_writable(out)  # an unwritable --out fails now, before Ray starts
    from ray.train import TrainingFailedError  # torch and Ray, after every input is checked

    from cvae.model.train import run_training

    try:
        result = run_training(config, data, out, run_name=args.run_name)
    except TrainingFailedError as exc:
        # Workers failed more often than train.max_failures allows; their tracebacks
        # are in the message and in the Ray logs.
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    last = result.history[-1]
    print(f"done: epoch {last['epoch']}, train {last['train_loss']:.2f}"
          + "".join(f", {split} {last[f'{split}_loss']:.2f}" for split in ("validation", "test")
                    if last.get(f"{split}_loss") is not None)
          + " nats/image")
    print(f"best checkpoint:   {result.best_checkpoint} (by {result.best_by.replace('_', ' ')})")
    from cvae.model.checkpoint import load_meta
    from cvae.model.coverage import grid_lines

    print("\n".join(grid_lines(load_meta(result.best_checkpoint))))
    print(f"latest checkpoint: {result.latest_checkpoint}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
