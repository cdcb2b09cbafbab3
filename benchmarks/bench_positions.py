"""The sprite model's training recipe and position maps, compared end to end.

    python -m benchmarks.bench_positions [--out runs/bench-positions] [--variants learned,frozen,constant]
                                         [--config configs/bench.yaml]   # ~15 min a variant on 2 cores

The bench dataset, each variant trained on it (configs/bench.yaml: 10 epochs), then the
pipeline's stages 3-5 (the same 1,998 counterfactual queries, answered and read back) on
each run's best checkpoint. Variants: learned (the config as it is: position maps learned,
cosine lr from 2e-3), frozen (the maps frozen at their whole-pixel guess), constant (the
recipe before: lr 1e-3 throughout). Prints each run's last epoch and evaluation headline;
reports in OUT/<variant>/eval/report.md. Each step is the job a user would run
(`python -m jobs.prepare_data`, `jobs.make_queries`, `jobs.train`, `jobs.query`,
`jobs.evaluate`), in a subprocess.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from cvae.config import load_config
from cvae.model.checkpoint import resolve_checkpoint
from cvae.pipeline import counterfactual_spec

VARIANTS = {"learned": {}, "frozen": {"model": {"learn_translation": False}},
            "constant": {"train": {"lr_schedule": "constant", "lr": 0.001}}}


def job(*args: str, capture: bool = False) -> str:
    """Run `python -m jobs.<args>`; its stdout (also printed) when `capture`."""
    done = subprocess.run([sys.executable, "-m", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if capture:
        print(done.stdout, end="")
        return done.stdout
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-positions")
    parser.add_argument("--variants", default="learned,frozen,constant", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--config", default="configs/bench.yaml", help="the config each variant changes")
    args = parser.parse_args()
    out, variants = Path(args.out), args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    job("jobs.prepare_data", "--config", args.config, "--out", str(out / "data"))
    for variant in variants:
        raw = yaml.safe_load(Path(args.config).read_text())
        for section, values in VARIANTS[variant].items():
            raw.setdefault(section, {}).update(values)
        (out / f"bench-{variant}.yaml").write_text(yaml.safe_dump(raw))
    (out / "spec.yaml").write_text(yaml.safe_dump(counterfactual_spec(load_config(args.config))))
    job("jobs.make_queries", "--spec", str(out / "spec.yaml"), "--data", str(out / "data"),
        "--out", str(out / "queries"))
    headlines = {}
    for variant in variants:
        config, runs = str(out / f"bench-{variant}.yaml"), out / variant
        job("jobs.train", "--config", config, "--data", str(out / "data"), "--out", str(runs / "train"),
            "--run-name", variant)
        best = str(resolve_checkpoint(runs / "train" / variant, say=lambda line: None))
        job("jobs.query", "--config", config, "--checkpoint", best, "--queries", str(out / "queries"),
            "--out", str(runs / "answers"))
        headlines[variant] = job("jobs.evaluate", "--results", str(runs / "answers"), "--queries",
                                 str(out / "queries"), "--checkpoint", best, "--data", str(out / "data"),
                                 "--out", str(runs / "eval"), capture=True)
    for variant in variants:
        last_epoch = (out / variant / "train" / "metrics.csv").read_text().splitlines()[-1]
        print(f"== {variant}: {last_epoch}")
        lines = headlines[variant].splitlines()
        print("\n".join(line for line in lines if "intervened" in line or "composition" in line))


if __name__ == "__main__":
    main()
