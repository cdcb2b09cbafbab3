"""Jobs write only into the output folders they are given.

Each job runs as its own process with HOME, TMPDIR and the working directory inside a
temporary root; every file and folder under that root is fingerprinted before and after,
and every difference must lie under the job's output folder. Inputs (the dataset, the
checkpoint, the queries, the results) sit under the same root, so reading them must not
touch them either, and staged copies of file:// inputs must be gone afterwards.

Jobs that start a local Ray leave one thing beside their output: Ray's own session folder
(logs, and the sockets while it runs) under $TMPDIR/ray, where Ray keeps it ($RAY_TMPDIR
moves it). Training also imports torch._dynamo (through torch.optim), whose import creates
an empty cache folder $TMPDIR/torchinductor_<user> ($TORCHINDUCTOR_CACHE_DIR moves it); it
must stay empty, since nothing is compiled. Nothing else, and nothing in HOME or the
working directory. The renderer's machine-wide tile file ($CVAE_TILE_CACHE, by default
$TMPDIR/cvae-<user>) is pointed at this test session's, outside the root, so the jobs
share it instead of each drawing its own.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cvae.data.render import tile_cache_file
from cvae.serve.make_queries import make_queries
from scm_fixtures import make_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, tuple]:
    entries = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if path.is_file() and not path.is_symlink():
            entries[str(path)] = ("file", st.st_size, st.st_mtime_ns,
                                  hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            entries[str(path)] = ("other", st.st_mode, st.st_mtime_ns if not path.is_dir() else 0)
    return entries


def _run(root: Path, out: Path, *args: str, ray: bool = False) -> subprocess.CompletedProcess:
    tmp = Path(os.readlink(root / "tmp"))  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MPLCONFIGDIR", "PYTEST", "XDG_"))}
    tiles = tile_cache_file()
    env.update(HOME=str(root / "home"), TMPDIR=str(tmp), PYTHONPATH=str(REPO),
               CVAE_TILE_CACHE=str(tiles.parent) if tiles else "off")
    before = {**_snapshot(root), **_snapshot(tmp)}
    done = subprocess.run([sys.executable, "-m", *args], cwd=root / "cwd", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
    after = {**_snapshot(root), **_snapshot(tmp)}
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    # Folder mtimes are not compared (a new entry shows up by itself): every new, changed
    # or removed entry must be the output folder or lie inside it.
    inductor = tmp / f"torchinductor_{getpass.getuser()}"
    allowed = [out] + ([tmp / "ray", inductor] if ray else [])
    stray = sorted(p for p in changed
                   if not any(p == str(a) or p.startswith(str(a) + os.sep) for a in allowed))
    assert not stray, f"{args[0]} wrote outside {out}: {stray}"
    assert any(p.startswith(str(out) + os.sep) for p in changed), f"{args[0]} wrote nothing to {out}"
    assert not inductor.exists() or not any(inductor.iterdir()), f"{args[0]} compiled into {inductor}"
    left = [p.name for p in tmp.iterdir() if not (ray and p.name in ("ray", inductor.name))]
    assert not left, f"{args[0]} left files in TMPDIR: {left}"
    return done


@pytest.fixture
def root(tmp_path):
    for name in ("home", "cwd", "in"):
        (tmp_path / name).mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))  # TMPDIR, linked from the root
    (tmp_path / "tmp").symlink_to(tmp)
    yield tmp_path
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_jobs_write_only_their_output_folders(root):
    # prepare_data: the dataset folder only.
    data = root / "out-data"
    _run(root, data, "jobs.prepare_data", "--config", str(REPO / "configs" / "tiny.yaml"),
         "--out", str(data))
    assert (data / "manifest.json").is_file()

    # make_queries, reading the dataset through a file:// URI (staged, then removed).
    spec = root / "in" / "spec.yaml"
    spec.write_text("sources: {split: test}\ninterventions: [{factor: shape, values: other}]\n")
    queries = root / "out-queries"
    _run(root, queries, "jobs.make_queries", "--spec", str(spec), "--out", str(queries),
         "--data", f"file://{data}")
    assert pads.dataset(str(queries), format="parquet").count_rows() > 0

    # evaluate, on results answered in this process (engine layout), inputs as file:// URIs.
    from cvae.causal.image import ImageSCM
    from cvae.serve.queries import answer_queries

    ckpt = make_checkpoint(root / "in" / "ckpt")
    make_queries({"sources": {"indices": [7, 300000]},
                  "interventions": [{"factor": "shape", "values": "all"}]}, root / "in" / "q")
    table = pads.dataset(str(root / "in" / "q"), format="parquet").to_table()
    results, errors = answer_queries(ImageSCM.from_checkpoint(ckpt), table)
    assert errors.num_rows == 0
    (root / "in" / "res" / "results").mkdir(parents=True)
    pq.write_table(results, root / "in" / "res" / "results" / "part-0.parquet")
    (root / "in" / "res" / "_SUCCESS.json").write_text("{}")
    report = root / "out-eval"
    _run(root, report, "jobs.evaluate", "--results", f"file://{root / 'in' / 'res'}",
         "--queries", f"file://{root / 'in' / 'q'}", "--checkpoint", f"file://{ckpt}",
         "--out", str(report), "--figures-per-factor", "2", "--reversibility-samples", "4")
    assert (report / "report.json").is_file() and list((report / "figures").glob("*.png"))

    # query: a local Ray and its actor pool, inputs as file:// URIs.
    answers = root / "out-answers"
    _run(root, answers, "jobs.query", "--checkpoint", f"file://{ckpt}",
         "--queries", f"file://{root / 'in' / 'q'}", "--out", str(answers),
         "--config", str(REPO / "configs" / "tiny.yaml"), ray=True)
    assert (answers / "_SUCCESS.json").is_file()
    assert pads.dataset(str(answers / "results"), format="parquet").count_rows() == table.num_rows


@pytest.mark.slow
def test_the_pipeline_writes_only_its_output_folder(root):
    run = root / "out-run"
    done = _run(root, run, "jobs.pipeline", "--config", str(REPO / "configs" / "tiny.yaml"),
                "--out", str(run), ray=True)
    assert (run / "eval" / "report.json").is_file()
    # At the default log level Ray's own detail stays out of the log (cvae.logs): no Ray
    # Train per-report lines from its two workers, no Ray Data progress tables.
    assert "epoch 2/2" in done.stderr
    assert "TrainingReport(" not in done.stderr and "Running Dataset" not in done.stderr, done.stderr[-3000:]
