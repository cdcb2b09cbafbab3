"""Small SCMs and checkpoints for the SCM, query and engine tests (built, never downloaded)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from cvae.config import Config
from cvae.data.grid import FACTOR_SIZES
from cvae.data.render import RENDERER_VERSION
from cvae.model.checkpoint import save_checkpoint
from cvae.model.factors import FactorSCM
from cvae.model.networks import SupervisedVAE
from cvae.serve.queries import QUERY_SCHEMA

CAUSAL_EDGES = [("shape", "scale"), ("scale", "pos_y")]


def causal_tables() -> dict:
    """shape -> scale -> pos_y: hearts tend to be big, big sprites tend to sit low."""
    scale = np.array([np.exp(-0.8 * (np.arange(6) - 5 * s / 2) ** 2) for s in range(3)])
    pos_y = np.array([np.exp(-((np.arange(32) - 4 - 5 * k) / 4.0) ** 2) for k in range(6)])
    return {"shape": np.full(3, 1 / 3),
            "scale": scale / scale.sum(1, keepdims=True),
            "pos_y": pos_y / pos_y.sum(1, keepdims=True)}


def causal_scm() -> FactorSCM:
    return FactorSCM(CAUSAL_EDGES, causal_tables())


def tiny_vae(seed: int = 0, z_dim: int = 4, hidden: int = 16) -> SupervisedVAE:
    torch.manual_seed(seed)
    return SupervisedVAE("mlp", z_dim, hidden).eval()


def make_checkpoint(directory, factors: FactorSCM | None = None, seed: int = 0, strides: dict | None = None,
                    grid: dict | None = None) -> str:
    """A checkpoint with the meta layout the trainer writes (config, manifest, scm): trained
    on the grid `strides` make (the whole grid by default); `grid` declares its grid as the
    trainer does (without it, the manifest's strides say, as for checkpoints from before)."""
    factors = factors or FactorSCM.uniform()
    config = Config()
    config.model.z_dim, config.model.hidden = 4, 16
    manifest = {"generator": "render", "renderer": RENDERER_VERSION, "official_path": None,
                "grid": {"strides": dict(strides or {})}}
    meta = {"config": config.to_dict(), "manifest": manifest, "epoch": 1, "metrics": {}, "scm": factors.to_dict()}
    if grid is not None:
        meta["grid"] = grid
    save_checkpoint(directory, tiny_vae(seed), meta)
    return str(directory)


def sizes(f: str) -> int:
    return FACTOR_SIZES[f]


def queries(n: int, seed: int = 0, bad_every: int = 0, samples: int = 2) -> pa.Table:
    """n queries of all three kinds (causal SCM), every `bad_every`-th one broken."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = ["condition", "intervene", "counterfactual"][i % 3]
        row = {"query_id": f"q{i:06d}", "kind": kind, "num_samples": int(rng.integers(1, samples + 1))}
        if kind == "condition":
            row["given_pos_y"] = int(rng.integers(0, 32))
        elif kind == "intervene":
            row["do_scale"] = int(rng.integers(0, 6))
        else:
            row["source_index"] = int(rng.integers(0, 737280))
            row["do_shape"] = int(rng.integers(0, 3))
        if bad_every and i % bad_every == 0:
            row["num_samples"] = -1
        rows.append({name: row.get(name) for name in QUERY_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=QUERY_SCHEMA)
