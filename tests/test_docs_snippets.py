"""Every Python snippet in the README and the docs runs as written, in a folder laid out
as the quickstart leaves it (a checkpoint under runs/local/train, queries and answers)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cvae.causal.image import ImageSCM
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import answer_queries
from scm_fixtures import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/api.md", "docs/bulk.md"]
# Checks run after a snippet, in its namespace: that it produced what its comments say.
CHECKS = {
    "pairs = pd.read_parquet": "assert image.shape == (64, 64) and 'do_shape' in pairs",
    "hf = load_dataset": ("assert len(frame) == len(hf) == int(counts.n.sum()) > 0\n"
                          "assert picture.size == (64, 64)"),
    "m = CausalModel.load": "assert xs.shape == (8, 64, 64) and xs.dtype == bool",
}


def snippets() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            found.append((doc, text[:match.start()].count("\n") + 1, match.group(1)))
    return found


@pytest.fixture(scope="module")
def quickstart_folder(tmp_path_factory):
    """runs/local as the quickstart leaves it, with a tiny untrained model (the snippets
    test the reading code, not the model)."""
    root = tmp_path_factory.mktemp("after-quickstart")
    local = root / "runs" / "local"
    checkpoint = make_checkpoint(local / "train" / "local" / "checkpoint_epoch_00001")
    make_queries({"sources": {"indices": [377172, 1000, 600000]},
                  "interventions": [{"factor": "shape", "values": "other"}]}, local / "queries")
    results, errors = answer_queries(ImageSCM.from_checkpoint(checkpoint, device="cpu"),
                                     pq.read_table(local / "queries"), max_samples=4)
    assert errors.num_rows == 0
    (local / "answers" / "results").mkdir(parents=True)
    pq.write_table(results, local / "answers" / "results" / "part-00000.parquet")
    return root


@pytest.mark.parametrize("doc, line, code", snippets(), ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "")
def test_snippet_runs_as_written(doc, line, code, quickstart_folder):
    checks = "\n".join(check for start, check in CHECKS.items() if start in code)
    env = {**os.environ, "HF_HOME": str(quickstart_folder / "hf-home"), "PYTHONPATH": str(REPO),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code + "\n" + checks], cwd=quickstart_folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{doc}:{line}: the snippet failed:\n{done.stderr[-3000:]}"


def test_every_snippet_is_found_and_checked():
    found = snippets()
    assert len(found) >= 4 and np.all([any(s in code for s in CHECKS) for _, _, code in found])
