"""The main job: data, training, queries, answers, evaluation, in that order.

Each stage writes under `<out>/`: `data/` (shards), `train/` (checkpoints, metrics,
figures), `queries/` (the generated counterfactual query set, plus the condition and
intervene families of `pipeline.families`, cvae.families), `answers/` (results and
errors Parquet), `eval/` (report.json, report.md, figures). A stage whose output is
already complete is reused, so rerunning the job after an interruption continues.
`out` may be a local path or a URI (file://, s3://, gs://): every stage reads and writes
through pyarrow's filesystems, and training workers stage their own shards locally.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cvae import fs
from cvae.config import Config
from cvae.grid import FACTORS


def counterfactual_spec(config: Config) -> dict:
    """The pipeline's query set: test-split sources, each with one random other value of
    every factor plus one null intervention (do = the factual shape, which must return the
    factual image exactly), about `pipeline.num_queries` queries in all."""
    per_source = len(FACTORS) + 1
    return {
        "seed": config.seed,
        "sources": {"split": "test", "sample": max(1, config.pipeline.num_queries // per_source)},
        "interventions": [{"factor": f, "values": "random_other"} for f in FACTORS]
        + [{"factor": "shape", "values": "factual"}],
        "samples": 1,
    }


def run_pipeline(config: Config, out: str | Path | None = None) -> dict:
    """Run every stage on the Ray given by `config.ray_address` (None: a local Ray started
    in-process). Returns a summary naming the files written."""
    import ray

    from cvae.engine import SUCCESS, run_query_job
    from cvae.evaluate import evaluate, headline
    from cvae.families import parse_family, write_family_queries
    from cvae.localray import init_ray
    from cvae.make_queries import make_queries
    from cvae.shards import MANIFEST, write_dataset
    from cvae.train import run_training

    out = str(out or config.out)
    out = out.rstrip("/") if fs.is_uri(out) else str(Path(out).resolve())
    started = time.time()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        stages[name] = time.time()
        print(f"\n== {name} " + "=" * (60 - len(name)), flush=True)

    fs.check_writable(out)  # an unwritable output fails now, not after Ray starts
    if not ray.is_initialized():
        init_ray(config.ray_address, num_cpus=config.num_cpus, log_to_driver=True)

    data_dir = fs.join(out, "data")
    stage("1/5 data")
    if fs.exists(fs.join(data_dir, MANIFEST)):
        print(f"reusing the dataset in {data_dir}")
    else:
        with fs.local_output(data_dir) as local:  # a URI is uploaded once complete
            write_dataset(config, local)

    stage("2/5 train")
    training = run_training(config, data_dir, fs.join(out, "train"))
    checkpoint = training.best_checkpoint
    print(f"best checkpoint: {checkpoint}")

    stage("3/5 queries")
    queries_dir = fs.join(out, "queries")
    queries = make_queries(counterfactual_spec(config), queries_dir, data_dir=data_dir)
    print(f"{queries['num_queries']} counterfactual queries from {queries['num_sources']} "
          f"test sources -> {queries_dir}")
    families = [parse_family(e, f"config.pipeline.families[{i}]") for i, e in enumerate(config.pipeline.families)]
    with fs.local_output(queries_dir) as local:
        asked = write_family_queries(families, config.pipeline.family_samples, config.seed,
                                     config.query.max_samples, local)
    if families:
        print(f"{asked['queries']} condition/intervene queries: {len(families)} families x 2 kinds x "
              f"{config.pipeline.family_samples} samples")

    stage("4/5 answers")
    answers_dir = fs.join(out, "answers")
    answers = run_query_job(
        checkpoint, queries_dir, answers_dir, actors=config.query.actors,
        batch_size=config.query.batch_size, gpus_per_actor=config.query.gpus_per_actor,
        cpus_per_actor=config.query.cpus_per_actor, max_samples=config.query.max_samples,
    )

    stage("5/5 evaluate")
    eval_dir = fs.join(out, "eval")
    report = evaluate(answers_dir, checkpoint, eval_dir, queries_dir, data_dir=data_dir,
                      figures_per_factor=config.pipeline.figures_per_factor,
                      max_samples=config.query.max_samples)

    summary = {
        "seconds": round(time.time() - started, 1),
        "stage_seconds": _durations(stages, time.time()),
        "files": {
            "data manifest": fs.join(data_dir, MANIFEST),
            "best checkpoint": checkpoint,
            **{f"train {k}": v for k, v in training.files.items()},
            "queries": queries_dir,
            "answers": fs.join(answers_dir, SUCCESS),
            "report": fs.join(eval_dir, "report.json"),
            "report table": fs.join(eval_dir, "report.md"),
        },
        # The loss of the model the answers came from (a late spike is not evaluated).
        "best epoch": _best_epoch(training.best_metrics, training.best_by),
        "answers": {k: answers.get(k) for k in ("queries", "result_rows", "error_rows", "seconds")},
        "overall": report.get("overall"),  # intervened rows; null interventions are in "null"
        "null": (report.get("null") or {}).get("overall"),
        "composition": report.get("composition"),
        "controls": {name: c.get("overall") for name, c in (report.get("controls") or {}).items()},
        "families": report.get("families"),
        "headline": headline(report),
    }
    with fs.local_output(out) as local:  # a URI: only summary.json is uploaded here
        fs.write_text_atomic(Path(local) / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _best_epoch(metrics: dict, best_by: str) -> dict | None:
    """The best checkpoint's losses and the one that chose it (validation loss, or test
    loss without a validation split), or None when no epoch was evaluated on it."""
    if metrics.get(best_by) is None:
        return None
    return {"best_by": best_by, **{k: metrics.get(k) for k in (
        "epoch", "train_loss", "validation_loss", "test_loss", "holdout_loss")}}


def _durations(stages: dict[str, float], end: float) -> dict[str, float]:
    names = list(stages)
    ends = [stages[n] for n in names[1:]] + [end]
    return {n: round(e - stages[n], 1) for n, e in zip(names, ends)}
