"""What the benchmarks answer queries with: an untrained checkpoint and query tables.

Ray-free, so benchmarks that run where Ray is not installed (bench_gpu on a GPU machine)
share them with the ones that start Ray. Speed does not depend on the weights, so an
untrained checkpoint of the right shape is enough.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from cvae.config import Config
from cvae.data.grid import FACTOR_SIZES, FACTORS, NUM_IMAGES, classes_to_index
from cvae.data.render import RENDERER_VERSION
from cvae.model.checkpoint import save_checkpoint
from cvae.model.factors import FactorSCM
from cvae.model.networks import SupervisedVAE


def checkpoint(directory: Path, z: int, h: int, arch: str = "mlp") -> str:
    """A randomly initialised (seed 0) checkpoint of `arch`, loadable by every job."""
    config = Config()
    config.model.arch, config.model.z_dim, config.model.hidden = arch, z, h
    torch.manual_seed(0)
    save_checkpoint(directory, SupervisedVAE(arch, z, h),
                    {"config": config.to_dict(),
                     "manifest": {"generator": "render", "renderer": RENDERER_VERSION}, "epoch": 0,
                     "metrics": {}, "scm": FactorSCM.uniform().to_dict()})
    return str(directory)


@torch.no_grad()
def counterfactual_passes(model: SupervisedVAE, x: torch.Tensor, y: torch.Tensor) -> None:
    """What the networks do for a batch of counterfactuals: one encoder pass (abduction of
    z) and two decoder passes (abduction of the pixel noise, then prediction)."""
    loc, _ = model.encode(x, y)
    model.decode(loc, y)
    model.decode(loc, y)


def counterfactual_queries(n: int, seed: int = 0, first_id: int = 0, sources: dict | None = None) -> pa.Table:
    """n counterfactuals from random sources, each intervening on one random factor.

    `sources` (factor -> classes) keeps the sources to those classes, e.g. the support of a
    checkpoint's factor SCM (`source_classes`); by default any image of the grid."""
    rng = np.random.default_rng(seed)
    factor = rng.integers(0, len(FACTORS), n)
    if sources is None:
        source = rng.integers(0, NUM_IMAGES, n)
    else:
        source = classes_to_index(np.stack([rng.choice(np.asarray(sources[f]), n) for f in FACTORS], axis=1))
    columns = {"query_id": pa.array([f"q{i:08d}" for i in range(first_id, first_id + n)]),
               "kind": pa.array(["counterfactual"] * n),
               "source_index": pa.array(source)}
    for j, name in enumerate(FACTORS):
        columns[f"do_{name}"] = pa.array(rng.integers(0, FACTOR_SIZES[name], n), mask=factor != j)
    return pa.table(columns)


def source_classes(scm) -> dict:
    """The classes of each factor with a nonzero marginal under a FactorSCM's tables (for a
    root factor its table; for a child, any class some parent row allows)."""
    return {f: np.flatnonzero(np.asarray(t).reshape(-1, np.asarray(t).shape[-1]).max(axis=0) > 0).tolist()
            for f, t in scm.tables.items()}


def mixed_queries(n: int, seed: int = 0) -> pa.Table:
    """n rows of every kind in turn: a counterfactual, an intervention and a conditioning
    query (two samples each for the last two), each on one random factor."""
    rng = np.random.default_rng(seed)
    kinds = np.array(["counterfactual", "intervene", "condition"])[np.arange(n) % 3]
    factor = rng.integers(0, len(FACTORS), n)
    columns = {"query_id": pa.array([f"m{i:08d}" for i in range(n)]),
               "kind": pa.array(kinds),
               "source_index": pa.array(rng.integers(0, NUM_IMAGES, n), mask=kinds != "counterfactual"),
               "num_samples": pa.array(np.where(kinds == "counterfactual", 1, 2))}
    for j, name in enumerate(FACTORS):
        values = rng.integers(0, FACTOR_SIZES[name], n)
        columns[f"do_{name}"] = pa.array(values, mask=(factor != j) | (kinds == "condition"))
        columns[f"given_{name}"] = pa.array(values, mask=(factor != j) | (kinds != "condition"))
    return pa.table(columns)


def at_once(target, args: tuple, n: int) -> list:
    """Run target(*args, barrier, results) in n spawned processes at once (spawn: CUDA cannot
    be forked) and return what each put on `results`; the barrier lets them start their
    timed part together."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(n), context.Queue()
    processes = [context.Process(target=target, args=(*args, barrier, results)) for _ in range(n)]
    for p in processes:
        p.start()
    values = [results.get() for _ in processes]
    for p in processes:
        p.join()
    return values
