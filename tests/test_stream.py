"""Streaming (factual, counterfactual, intervention) triples from a committed query output
into a torch DataLoader with two workers."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from cvae.data.grid import FACTORS, classes_to_index
from cvae.data.groundtruth import GroundTruth
from cvae.serve.engine import read_output, run_query_job
from cvae.serve.make_queries import make_queries
from cvae.serve.stream import CounterfactualPairs
from scm_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def output(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    make_queries({"seed": 0, "sources": {"indices": [0, 377172, 600000, 737279]},
                  "interventions": [{"factor": "shape", "values": "other"},
                                    {"factor": "scale", "values": "factual"}]}, root / "queries")
    run_query_job(make_checkpoint(root / "ckpt"), root / "queries", root / "answers", actors=1, batch_size=3)
    return root


def test_two_workers_stream_every_pair_once(output):
    results, _ = read_output(output / "answers")
    assert len(list((output / "answers" / "results").glob("*.parquet"))) >= 2  # parts to split
    pairs = CounterfactualPairs(output / "answers", queries=output / "queries")
    seen = []
    for batch in DataLoader(pairs, batch_size=4, num_workers=2):
        assert batch["factual"].shape[1:] == (1, 64, 64) and batch["factual"].dtype == torch.float32
        assert batch["counterfactual"].shape == batch["factual"].shape and batch["do"].shape[1] == 5
        seen += [tuple(row) for row in torch.cat([batch["factual_classes"], batch["do"]], 1).tolist()]
    assert len(seen) == len(set(seen)) == results.num_rows == 12  # 4 sources x (2 other shapes + a null do)
    nulls = [row for row in seen if row[5 + 1] >= 0]  # do(scale) = factual: joined from the queries
    assert len(nulls) == 4 and all(row[1] == row[5 + 1] for row in nulls)


def test_images_are_the_factual_truth_and_the_answer(output):
    results, _ = read_output(output / "answers")
    item = next(iter(CounterfactualPairs(output / "answers")))  # no queries: do read off the two worlds
    factual = item["factual_classes"].numpy()[None]
    assert np.array_equal(item["factual"][0].numpy(), GroundTruth("render").images(classes_to_index(factual))[0])
    changed = item["do"].numpy()
    assert ((changed >= 0) == (item["classes"].numpy() != factual[0])).all()
    assert set(results.column_names) >= {"image", *FACTORS}


def test_bad_folders_are_clear(output, tmp_path):
    with pytest.raises(FileNotFoundError, match="no committed query output"):
        CounterfactualPairs(tmp_path)
    with pytest.raises(ValueError, match="was not verified"):
        next(iter(CounterfactualPairs(output / "answers", verified_only=True)))
    assert pq.read_table(output / "answers" / "results").num_rows == 12
