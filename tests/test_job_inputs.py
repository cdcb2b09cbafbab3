"""What the jobs take as --checkpoint and --out, checked in the driver before any Ray work.

- a training run folder (or the folder holding one run) stands for its best checkpoint;
- an output location that cannot be created or written fails at once, with one line;
- a checkpoint that cannot be loaded (missing, truncated or malicious model.pt) is refused
  in the driver with the CheckpointError's line;
- every job's --help names the program as `python -m jobs.NAME` and only files that exist.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cvae import fs
from cvae.errors import OutputLocationError
from cvae.model.checkpoint import CheckpointError, check_checkpoint, resolve_checkpoint
from scm_fixtures import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["prepare_data", "train", "make_queries", "query", "evaluate", "pipeline"]


def _checkpoint(folder: Path, epoch: int, **metrics) -> str:
    """A loadable checkpoint whose checkpoint.json records `epoch` and `metrics`."""
    make_checkpoint(folder)
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["epoch"] = epoch
    meta["metrics"] = {"epoch": epoch, **metrics}
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """train/local/checkpoint_epoch_0000{1,2,3}: epoch 2 has the lowest validation loss,
    epoch 1 the lowest test loss, epoch 3 is the latest."""
    run = tmp_path_factory.mktemp("train") / "local"
    _checkpoint(run / "checkpoint_epoch_00001", 1, validation_loss=9.0, test_loss=7.0)
    _checkpoint(run / "checkpoint_epoch_00002", 2, validation_loss=8.0, test_loss=8.0)
    _checkpoint(run / "checkpoint_epoch_00003", 3, validation_loss=8.5, test_loss=9.0)
    return run


# ---------------------------------------------------------------- item 1: run folders


def test_a_run_folder_and_its_parent_give_the_lowest_validation_loss(run):
    said = []
    best = str(run / "checkpoint_epoch_00002")
    assert resolve_checkpoint(run, say=said.append) == best
    assert resolve_checkpoint(run.parent, say=said.append) == best  # train/ holds local/
    assert len(said) == 2
    assert said[0].startswith(f"checkpoint: {best} (") and "validation loss" in said[0]
    assert "epoch 2" in said[0] and "of 3 in" in said[0]


def test_a_checkpoint_folder_is_taken_as_given_without_a_word(run):
    said = []
    one = str(run / "checkpoint_epoch_00003")
    assert resolve_checkpoint(one, say=said.append) == one
    assert said == []


def test_uris_resolve_to_uris(run):
    said = []
    uri = run.parent.as_uri()
    assert resolve_checkpoint(uri, say=said.append) == f"{uri}/local/checkpoint_epoch_00002"
    assert resolve_checkpoint(f"{uri}/local/checkpoint_epoch_00001") == f"{uri}/local/checkpoint_epoch_00001"
    assert said and said[0].startswith(f"checkpoint: {uri}/local/checkpoint_epoch_00002")


def test_without_validation_loss_the_lowest_test_loss_else_the_latest_epoch(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoint_epoch_00001", 1, test_loss=7.0)
    _checkpoint(run / "checkpoint_epoch_00002", 2, test_loss=8.0, validation_loss=float("nan"))
    said = []
    assert resolve_checkpoint(run, say=said.append) == str(run / "checkpoint_epoch_00001")
    assert "test loss" in said[0]

    bare = tmp_path / "bare"
    _checkpoint(bare / "checkpoint_epoch_00004", 4)
    _checkpoint(bare / "checkpoint_epoch_00010", 10)
    (bare / "checkpoint_epoch_00011").mkdir()  # cut short by a crash: no checkpoint.json
    said = []
    assert resolve_checkpoint(bare, say=said.append) == str(bare / "checkpoint_epoch_00010")
    assert "the latest" in said[0] and "epoch 10" in said[0]


def test_folders_that_are_neither_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"empty: no checkpoint.json and no checkpoint_epoch_\* folders"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="missing: no such folder; expected a checkpoint folder"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_checkpoint((tmp_path / "missing").as_uri())
    for name in ("a", "b"):
        (tmp_path / "two" / name / "checkpoint_epoch_00001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"two: holds 2 training runs \(a, b\)"):
        resolve_checkpoint(tmp_path / "two")
    with pytest.raises(CheckpointError, match="none of its 1 checkpoint_epoch_"):
        resolve_checkpoint(tmp_path / "two" / "a")


def test_jobs_query_takes_a_run_folder_and_says_which_checkpoint(run, tmp_path, monkeypatch, capsys):
    """Everything up to starting Ray, in process: Ray's start is replaced by a sentinel."""
    import ray

    import cvae.serve.engine
    from jobs import query

    class Started(Exception):
        pass

    def no_ray(*args, **kwargs):
        raise Started

    pq.write_table(_queries(), tmp_path / "q.parquet")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cvae.serve.engine, "init_ray", no_ray)
    with pytest.raises(Started):
        query.main(["--checkpoint", str(run.parent), "--queries", str(tmp_path / "q.parquet"),
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"checkpoint: {run / 'checkpoint_epoch_00002'} (epoch 2: the lowest validation loss" in err


def _queries():
    import pyarrow as pa

    from cvae.serve.queries import QUERY_SCHEMA

    row = {name: None for name in QUERY_SCHEMA.names}
    row.update(query_id="q0", kind="intervene", num_samples=1, do_scale=1)
    return pa.Table.from_pylist([row], schema=QUERY_SCHEMA)


# ---------------------------------------------------------------- item 2: output locations


def test_check_writable_creates_nothing_and_refuses_proc(tmp_path):
    for out in (tmp_path / "a" / "b", (tmp_path / "u" / "v").as_uri()):
        fs.check_writable(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # probed, then removed again
    (tmp_path / "kept").mkdir()
    fs.check_writable(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    (tmp_path / "file").write_text("x")
    for bad in ("/proc/x", "file:///proc/x", str(tmp_path / "file"), "nope://bucket/x"):
        with pytest.raises(OutputLocationError, match=re.escape(f"output {bad}: cannot be created or written")):
            fs.check_writable(bad)


@pytest.mark.parametrize("job", ["query", "evaluate", "make_queries", "pipeline"])
def test_every_job_refuses_an_unwritable_out_before_ray(job, run, tmp_path, monkeypatch, capsys):
    import ray

    import cvae.localray
    import cvae.serve.engine

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cvae.serve.engine, "init_ray", no_ray)
    monkeypatch.setattr(cvae.localray, "init_ray", no_ray)
    pq.write_table(_queries(), tmp_path / "q.parquet")
    args = {
        "query": ["--checkpoint", str(run), "--queries", str(tmp_path / "q.parquet")],
        "evaluate": ["--results", str(tmp_path), "--queries", str(tmp_path / "q.parquet"),
                     "--checkpoint", str(run)],
        "make_queries": ["--spec", str(ROOT / "configs" / "bulk" / "test_other_shapes.yaml")],
        "pipeline": ["--config", str(ROOT / "configs" / "tiny.yaml")],
    }[job]
    module = __import__(f"jobs.{job}", fromlist=["main"])
    start = time.perf_counter()
    assert module.main([*args, "--out", "/proc/x"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/proc/x: cannot be created or written" in err[0], err


def test_jobs_query_out_proc_fails_in_a_second_with_one_line(run, tmp_path):
    pq.write_table(_queries(), tmp_path / "q.parquet")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.query", "--checkpoint", str(run),
                           "--queries", str(tmp_path / "q.parquet"), "--out", "/proc/x"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: output /proc/x: cannot be created or written: "
                                   + proc.stderr.split("written: ", 1)[1].strip())
    assert len(proc.stderr.strip().splitlines()) == 1 and seconds < 10, (seconds, proc.stderr)


# ---------------------------------------------------------------- item 3: unloadable checkpoints


class _Exploit:
    """Unpickling this would run os.system (as in tests/test_model.py)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(ckpt: Path, how: str, marker: Path) -> str:
    weights = ckpt / "model.pt"
    if how == "missing":
        weights.unlink()
        return "model.pt is missing"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return "model.pt: cannot be read as weights"
    torch.save({"encoder.loc.weight": _Exploit(marker)}, weights)
    return "model.pt: refused to load"


@pytest.mark.parametrize("how", ["missing", "truncated", "malicious"])
def test_check_checkpoint_refuses_what_cannot_be_loaded(how, tmp_path):
    ckpt = Path(make_checkpoint(tmp_path / "ckpt"))
    assert check_checkpoint(ckpt)["epoch"] == 1
    assert check_checkpoint(ckpt.as_uri())["epoch"] == 1
    message = _poison(ckpt, how, tmp_path / "pwned")
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}/{message}")):
        check_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt.as_uri()}/{message}")):
        check_checkpoint(ckpt.as_uri())  # names the URI, not the staged copy
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("how", ["truncated", "malicious"])
def test_jobs_query_refuses_a_poisoned_checkpoint_before_ray(how, tmp_path, monkeypatch, capsys):
    import ray

    import cvae.serve.engine
    from jobs import query

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cvae.serve.engine, "init_ray", no_ray)
    ckpt = Path(make_checkpoint(tmp_path / "ckpt"))
    message = _poison(ckpt, how, tmp_path / "pwned")
    pq.write_table(_queries(), tmp_path / "q.parquet")
    code = query.main(["--checkpoint", str(ckpt), "--queries", str(tmp_path / "q.parquet"),
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- item 4: --help


@pytest.mark.parametrize("job", JOBS)
def test_help_names_the_program_and_only_files_that_exist(job, capsys):
    module = __import__(f"jobs.{job}", fromlist=["main"])
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m jobs.{job} ")
    assert set(re.findall(r"python -m (jobs\.\w+)", text)) <= {f"jobs.{j}" for j in JOBS}
    for path in re.findall(r"\b(?:configs|specs)/[\w./-]+\.yaml\b", text):
        assert (ROOT / path).is_file(), f"jobs.{job} --help names {path}, which does not exist"
    # Paths under runs/ are those the quickstart writes (runs/local/...), never made-up ones.
    for path in re.findall(r"\bruns/[\w./-]+", text):
        assert path.startswith(("runs/local/data", "runs/local/train", "runs/local/queries",
                                "runs/local/answers", "runs/local/eval", "runs/local/bulk")), path
    # Example commands keep their line breaks (a backslash ends the line, the next one goes on),
    # and every option says what it is.
    assert not re.search(r"\S {4,}--\w", text), text
    options = text[text.index("options:"):]
    assert not re.search(r"^  -[-\w]+(?: [A-Z_{},]+)?\n  -", options, re.M), options


def test_a_checkpoint_of_an_older_renderer_is_refused_before_ray(tmp_path):
    """Checkpoints trained before the official-geometry renderer (manifests without a
    renderer version) fail in the driver with one line naming both versions."""
    from cvae.model.checkpoint import CheckpointError, check_checkpoint
    from scm_fixtures import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "old")
    check_checkpoint(ckpt)  # today's checkpoint is accepted
    meta_path = tmp_path / "old" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    del meta["manifest"]["renderer"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="renderer version 1, this cvae draws version 2"):
        check_checkpoint(ckpt)
