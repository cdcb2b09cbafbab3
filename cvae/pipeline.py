"""The main job: data, training, queries, answers, evaluation, in that order.

Each stage writes under `<out>/`: `data/` (shards), `train/` (checkpoints, metrics,
figures), `queries/` (the generated counterfactual query set, plus the condition and
intervene families of `pipeline.families`, cvae.evaluate.families), `answers/` (results and
errors Parquet), `eval/` (report.json, report.md, figures). `out` may be a local path or a
URI (file://, s3://, gs://): every stage reads and writes through pyarrow's filesystems,
and training workers stage their own shards locally.

Reruns: a finished stage whose inputs did not change is reused, with one line saying so
(cvae.stages: each stage records the fingerprint of its inputs, which include the
fingerprints of the stages it reads). `force` names stages to redo anyway; what depends
on a redone stage is redone only if its inputs changed (a retrained checkpoint is a new
input to the answers; identical regenerated data is not). Training that was interrupted
resumes from its latest checkpoint; training whose inputs changed (data, model, lr, batch
size, SCM, seed) starts over, and more epochs continue the finished run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from cvae import fs
from cvae.config import Config
from cvae.data.grid import FACTORS
from cvae.logs import progress
from cvae.stages import changed_keys, file_digest, fingerprint, finished, read_record, write_record

STAGES = ("data", "train", "queries", "answers", "evaluate")
log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class _Run:
    """One run of the pipeline: where it writes, what to redo, and the stages' start times."""
    config: Config
    out: str
    force: frozenset
    started: dict = dataclasses.field(default_factory=dict)

    def stage(self, name: str) -> None:
        title = f"{STAGES.index(name) + 1}/{len(STAGES)} {name}"
        self.started[title] = time.time()
        log.info("== %s %s", title, "=" * (60 - len(title)))

    def reuse(self, stage: str, folder: str, inputs: dict, marker: str) -> dict | None:
        """The finished record to reuse (and one line saying so), or None to redo the stage."""
        if stage in self.force:
            log.info("redoing %s (--force %s)", stage, stage)
            return None
        record = finished(folder, inputs, marker)
        if record is not None:
            log.info("reusing %s in %s: finished, inputs unchanged", stage, folder)
        return record


def run_pipeline(config: Config, out: str | Path | None = None, force=()) -> dict:
    """Run every stage on the Ray given by `config.ray_address` (None: a local Ray started
    in-process), reusing finished stages whose inputs did not change and redoing those named
    in `force` ("all": every stage). Returns a summary naming the files written."""
    import ray  # each stage's modules load when it runs: a rerun that reuses them stays fast

    from cvae.localray import init_ray

    unknown = set(force) - set(STAGES) - {"all"}
    if unknown:
        raise ValueError(f"force: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)} or all")
    out = str(out or config.out)
    out = out.rstrip("/") if fs.is_uri(out) else str(Path(out).resolve())
    run = _Run(config, out, frozenset(STAGES if "all" in force else force))
    started = time.time()
    fs.check_writable(out)  # an unwritable output fails now, not after Ray starts
    if not ray.is_initialized():
        init_ray(config.ray_address, num_cpus=config.num_cpus, log_to_driver=True)

    data_dir, data_id = _data(run)
    training, checkpoint_id = _train(run, data_dir, data_id)
    queries_dir, queries_id = _queries(run, data_dir, data_id, checkpoint_id)
    answers_dir, answers = _answers(run, queries_dir, queries_id, checkpoint_id)
    report = _evaluate(run, data_dir, queries_dir, answers_dir, answers["id"], checkpoint_id)
    summary = _summary(run, training, data_dir, queries_dir, answers_dir, answers, report, started)
    with fs.local_output(out) as local:  # a URI: only summary.json is uploaded here
        fs.write_text_atomic(Path(local) / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


# ----------------------------------------------------------------------------- the stages

def _data(run: _Run) -> tuple[str, str]:
    from cvae.data.render import RENDERER_VERSION  # (loaded when the stage runs, as above)
    from cvae.data.shards import MANIFEST, write_dataset
    from cvae.model.factors import dataset_scm

    config, data_dir = run.config, fs.join(run.out, "data")
    run.stage("data")
    inputs = {"data": dataclasses.asdict(config.data), "seed": config.seed, "renderer": RENDERER_VERSION,
              "scm": dataclasses.asdict(config.scm) if config.data.generator == "scm" else None}
    if not run.reuse("data", data_dir, inputs, MANIFEST):
        with fs.local_output(data_dir) as local, progress(config.data.num_shards, "rendering and writing shards",
                                                          log, unit="shards") as bar:
            manifest = write_dataset(config, local, progress=lambda done, total, entry: bar.set(done, total),
                                     factor_scm=dataset_scm(config))
        write_record(data_dir, "data", inputs, {"rows": sum(manifest["counts"].values())})
    return data_dir, fingerprint(inputs)


def _train(run: _Run, data_dir: str, data_id: str):
    from cvae.model.checkpoint import load_meta  # torch, when the stage runs
    from cvae.model.coverage import grid_lines
    from cvae.model.networks import CHANNELS
    from cvae.model.train import TrainingResult, run_training

    config, folder = run.config, fs.join(run.out, "train")
    run.stage("train")
    model = dataclasses.asdict(config.model)
    for key, default in (("channels", CHANNELS), ("encoder_channels", None)):
        if model[key] == default:  # added later: a run of the default widths keeps its fingerprint
            del model[key]
    identity = {"data": data_id, "model": model, "scm": dataclasses.asdict(config.scm),
                "lr": config.train.lr, "batch_size": config.train.batch_size, "seed": config.seed}
    inputs = {"identity": identity, "epochs": config.train.epochs, "run_name": config.name}
    record = run.reuse("train", folder, inputs, config.name)
    if record is not None and fs.exists(fs.join(record["result"]["best_checkpoint"], "checkpoint.json")):
        training = TrainingResult(**record["result"])
    else:
        earlier = read_record(folder)
        changed = [] if earlier is None else changed_keys(earlier["inputs"].get("identity", {}), identity)
        if ("train" in run.force or changed) and _remove(fs.join(folder, config.name)):
            why = "--force train" if "train" in run.force else f"its inputs changed ({', '.join(changed)})"
            log.info("training from scratch (%s): removed the earlier run %s", why, fs.join(folder, config.name))
        write_record(folder, "train", inputs)  # started: an interruption resumes, not restarts
        training = run_training(config, data_dir, folder)
        result = {f.name: getattr(training, f.name) for f in dataclasses.fields(training) if f.name != "history"}
        write_record(folder, "train", inputs, result)
    log.info("best checkpoint: %s", training.best_checkpoint)
    for line in grid_lines(load_meta(training.best_checkpoint)):
        log.info("%s", line)
    checkpoint_id = {"checkpoint": training.best_checkpoint,
                     "meta": file_digest(fs.join(training.best_checkpoint, "checkpoint.json"))}
    return training, checkpoint_id


def _queries(run: _Run, data_dir: str, data_id: str, checkpoint_id: dict) -> tuple[str, str]:
    from cvae.evaluate.families import parse_family, write_family_queries  # when the stage runs
    from cvae.model.checkpoint import load_meta, model_grid
    from cvae.serve.make_queries import make_queries

    config, folder = run.config, fs.join(run.out, "queries")
    run.stage("queries")
    spec = counterfactual_spec(config)
    families = [parse_family(e, f"config.pipeline.families[{i}]") for i, e in enumerate(config.pipeline.families)]
    # The interventions range over the classes the model answers: its training grid, or more
    # where it measurably draws unseen classes (cvae.model.coverage); the report scores those apart.
    grid = model_grid(load_meta(checkpoint_id["checkpoint"]))
    inputs = {"data": data_id, "spec": spec, "grid": grid.to_dict()["classes"],
              "families": [f.to_dict() for f in families],
              "family_samples": config.pipeline.family_samples, "max_samples": config.query.max_samples}
    record = run.reuse("queries", folder, inputs, "_summary.json")
    if record is None:
        made = make_queries(spec, folder, data_dir=data_dir, grid=grid)
        log.info("%d counterfactual queries from %d test sources -> %s", made["num_queries"],
                 made["num_sources"], folder)
        with fs.local_output(folder) as local:
            asked = write_family_queries(families, config.pipeline.family_samples, config.seed,
                                         config.query.max_samples, local)
        if families:
            log.info("%d condition/intervene queries: %d families x 2 kinds x %d samples", asked["queries"],
                     len(families), config.pipeline.family_samples)
        write_record(folder, "queries", inputs, {"counterfactual": made["num_queries"],
                                                 "families": asked["queries"]})
    return folder, fingerprint(inputs)


def _answers(run: _Run, queries_dir: str, queries_id: str, checkpoint_id: dict) -> tuple[str, dict]:
    from cvae.serve.engine import SUCCESS, run_query_job  # torch and Ray, when the stage runs

    config, folder = run.config, fs.join(run.out, "answers")
    run.stage("answers")
    # Actors and batch size do not change answers (they are independent of batching).
    inputs = {"queries": queries_id, "checkpoint": checkpoint_id, "max_samples": config.query.max_samples}
    record = run.reuse("answers", folder, inputs, SUCCESS)
    if record is None:
        answers = run_query_job(checkpoint_id["checkpoint"], queries_dir, folder, overwrite=True,
                                **config.query.job_settings())
        kept = {k: answers.get(k) for k in ("queries", "result_rows", "error_rows", "seconds")}
        record = {"result": kept}
        write_record(folder, "answers", inputs, kept)
    return folder, {**record["result"], "id": fingerprint(inputs)}


def _evaluate(run: _Run, data_dir: str, queries_dir: str, answers_dir: str, answers_id: str,
              checkpoint_id: dict) -> dict:
    from cvae.evaluate.scores import evaluate  # torch, when the stage runs

    config, folder = run.config, fs.join(run.out, "eval")
    run.stage("evaluate")
    inputs = {"answers": answers_id, "checkpoint": checkpoint_id,
              "figures_per_factor": config.pipeline.figures_per_factor, "max_samples": config.query.max_samples}
    if run.reuse("evaluate", folder, inputs, "report.json"):
        return json.loads(fs.read_bytes(fs.join(folder, "report.json")))
    report = evaluate(answers_dir, checkpoint_id["checkpoint"], folder, queries_dir, data_dir=data_dir,
                      figures_per_factor=config.pipeline.figures_per_factor,
                      max_samples=config.query.max_samples)
    write_record(folder, "evaluate", inputs, {"rows": report.get("rows")})
    return report


# ----------------------------------------------------------------------------- the summary

def _summary(run: _Run, training, data_dir: str, queries_dir: str, answers_dir: str, answers: dict,
             report: dict, started: float) -> dict:
    from cvae.data.shards import MANIFEST  # (loaded when the summary is written, as the stages)
    from cvae.evaluate.report import headline
    from cvae.serve.commit import SUCCESS

    eval_dir = fs.join(run.out, "eval")
    return {
        "seconds": round(time.time() - started, 1),
        "stage_seconds": _durations(run.started, time.time()),
        "files": {
            "data manifest": fs.join(data_dir, MANIFEST),
            "best checkpoint": training.best_checkpoint,
            **{f"train {k}": v for k, v in training.files.items()},
            "queries": queries_dir,
            "answers": fs.join(answers_dir, SUCCESS),
            "report": fs.join(eval_dir, "report.json"),
            "report table": fs.join(eval_dir, "report.md"),
            # figures/counterfactuals_<factor>.png (and families.png), as the report lists them
            "report figures": [fs.join(eval_dir, name) for name in report.get("figures") or []],
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


def _remove(folder: str) -> bool:
    """Delete a folder (path or URI) and everything in it; False when there was none."""
    filesystem, root = fs.resolve(folder)
    if not fs.exists(folder):
        return False
    filesystem.delete_dir(root)
    return True


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
