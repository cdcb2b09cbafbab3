"""The structural causal model: a factor DAG with Gumbel-max mechanisms, then the VAE's pixels.

Exogenous noise: a Gumbel vector `U_<factor>` per factor, `U_z ~ N(0, I)`, `U_x ~ Uniform`
per pixel. Mechanisms: `factor = argmax(log p(factor | parents) + U_factor)`, `z = U_z`,
`x_i = 1[U_x,i < p_i]` with `p = sigmoid(decoder(z, factors))`.

`FactorSCM` is the factor half (tables, sampling, exact abduction of the Gumbels, exact
posteriors by enumeration); `ImageSCM` joins it to a trained VAE as one batched Pyro model
(`ImageSCM.model`) and answers the three query kinds with `poutine.condition` and
`poutine.do` on it.

Randomness: every random number is a counter-based hash of (row key, stream, counter),
where the row key mixes the query's seed and the sample number (`row_keys`). So a result
depends only on its query row and the checkpoint: never on batch size, actors or order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from cvae.grid import FACTOR_SIZES, FACTORS, IMAGE_SIZE
from cvae.rng import gumbels, row_keys, seed_from_query_id, uniforms  # noqa: F401 (re-exported)

SIZES = tuple(FACTOR_SIZES[f] for f in FACTORS)
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
# Streams of the counter-based generator: one per use, so no two uses share numbers.
STREAM_POSTERIOR = 1  # one uniform per factor (per connected component) for inverse-CDF sampling
STREAM_GUMBEL = 10  # + factor position: 1 + K uniforms for the top-down Gumbel abduction
STREAM_Z = 20  # z_dim uniforms -> normals (prior z, or the sample from q(z | x, y))
STREAM_PIXELS = 30  # 4096 uniforms: U_x
# Networks run on fixed-size, zero-padded chunks: a matrix product's rounding can depend on
# the number of rows, and results must not depend on how rows are batched.
NET_CHUNK = 256


class ScmError(ValueError):
    """An SCM spec (edges, tables) that cannot be used, with the problem named."""


# --------------------------------------------------------------------------- factor SCM


class FactorSCM:
    """The factor DAG over FACTORS with a table p(factor | parents) per factor.

    `tables[f]` has shape (*sizes of f's parents, size of f); parents are in the order
    their edges are listed. Mechanism: f = argmax(log tables[f][parents] + U_f).
    """

    def __init__(self, edges: list, tables: dict[str, np.ndarray]):
        self.edges = [tuple(e) for e in edges]
        for parent, child in self.edges:
            if parent not in FACTORS or child not in FACTORS or parent == child:
                raise ScmError(f"edge {parent!r} -> {child!r}: must join two different factors of {FACTORS}")
        if len(set(self.edges)) != len(self.edges):
            raise ScmError("duplicate edge in the factor DAG")
        self.parents = {f: [p for p, c in self.edges if c == f] for f in FACTORS}
        self.children = {f: [c for p, c in self.edges if p == f] for f in FACTORS}
        self.order = self._topological_order()
        self.tables: dict[str, np.ndarray] = {}
        for f in FACTORS:
            expected = tuple(FACTOR_SIZES[p] for p in self.parents[f]) + (FACTOR_SIZES[f],)
            table = np.asarray(tables[f], dtype=np.float64) if f in tables else None
            if table is None:
                if self.parents[f]:
                    raise ScmError(f"table for {f!r} missing (it has parents {self.parents[f]})")
                table = np.full(expected, 1.0 / FACTOR_SIZES[f])
            if table.shape != expected:
                raise ScmError(f"table for {f!r} has shape {table.shape}, expected {expected} "
                               f"(parents {self.parents[f]} then {f})")
            if not np.isfinite(table).all() or (table < 0).any():
                raise ScmError(f"table for {f!r}: probabilities must be finite and >= 0")
            sums = table.sum(axis=-1)
            if not np.allclose(sums, 1.0, atol=1e-6):
                raise ScmError(f"table for {f!r}: each row must sum to 1 (found sums from "
                               f"{sums.min():.6g} to {sums.max():.6g})")
            self.tables[f] = table / sums[..., None]
        with np.errstate(divide="ignore"):
            self.log_tables = {f: np.log(t) for f, t in self.tables.items()}
        self._posterior_cache: dict = {}
        self._cache_bytes = 0

    def _topological_order(self) -> list[str]:
        order, placed = [], set()
        while len(order) < len(FACTORS):
            ready = [f for f in FACTORS if f not in placed and set(self.parents[f]) <= placed]
            if not ready:
                raise ScmError(f"the factor edges have a cycle: {self.edges}")
            order.append(ready[0])
            placed.add(ready[0])
        return order

    # ----------------------------------------------------------------- construction

    @classmethod
    def uniform(cls) -> FactorSCM:
        """dSprites' own SCM: independent, uniform factors."""
        return cls([], {})

    @classmethod
    def from_config(cls, scm_config, classes: np.ndarray | None = None) -> FactorSCM:
        """From a `ScmConfig` (or its dict): tables uniform, given in the config, or fitted
        by counting `classes`, the (n, 5) factor classes of the train split (the caller
        reads them: this module does no I/O)."""
        if isinstance(scm_config, dict):  # as a manifest records it
            scm_config = SimpleNamespace(**{"edges": [], "tables": "uniform", "smoothing": 1.0, "given": {},
                                            **scm_config})
        edges = [tuple(e) for e in scm_config.edges]
        if scm_config.tables == "uniform":
            if edges:
                raise ScmError("tables 'uniform' cannot have edges; use 'given' or 'fit'")
            return cls.uniform()
        if scm_config.tables == "given":
            return cls(edges, {f: np.asarray(t, dtype=np.float64) for f, t in scm_config.given.items()})
        if scm_config.tables == "fit":
            if classes is None:
                raise ScmError("tables 'fit' needs the train split's classes to count from")
            classes = np.asarray(classes, dtype=np.int64)
            if classes.shape[1] == 6:  # with the constant color column
                classes = classes[:, 1:]
            return cls.fit(edges, classes, scm_config.smoothing)
        raise ScmError(f"unknown tables mode {scm_config.tables!r}")

    @classmethod
    def fit(cls, edges: list, classes: np.ndarray, smoothing: float = 1.0) -> FactorSCM:
        """Tables by counting rows of (n, 5) classes, plus `smoothing` in every cell.

        A parent combination never seen (possible only with smoothing 0) gets a uniform row.
        """
        classes = np.asarray(classes, dtype=np.int64)
        probe = cls(edges, {f: _uniform_table(f, [p for p, c in edges if c == f]) for f in FACTORS})
        tables = {}
        for f in FACTORS:
            cols = [FACTORS.index(p) for p in probe.parents[f]] + [FACTORS.index(f)]
            shape = tuple(FACTOR_SIZES[FACTORS[c]] for c in cols)
            counts = np.zeros(shape, dtype=np.float64)
            np.add.at(counts, tuple(classes[:, c] for c in cols), 1.0)
            counts += smoothing
            sums = counts.sum(axis=-1, keepdims=True)
            tables[f] = np.where(sums > 0, counts / np.where(sums > 0, sums, 1.0), 1.0 / shape[-1])
        return cls(edges, tables)

    @classmethod
    def of_dataset(cls, manifest: dict) -> FactorSCM:
        """The factor SCM a dataset's factors were drawn from, by its manifest: the `scm`
        a 'scm' generator sampled from (tables given in the config), else dSprites' own
        independent uniform factors on the dataset's (strided) grid. This is the truth that
        counterfactuals of descendants and the condition/intervene families are scored
        against, whatever tables a checkpoint learned."""
        if manifest.get("generator") != "scm":
            return cls.uniform().on_grid((manifest.get("grid") or {}).get("strides") or {})
        if not manifest.get("scm"):
            raise ScmError("manifest: generator 'scm' without the 'scm' it sampled from")
        return cls.from_config(manifest["scm"])

    def on_grid(self, strides: dict) -> FactorSCM:
        """This SCM with every class off the dataset's grid (class % stride != 0) given
        probability zero, each table row renormalised over the grid's classes (a row that
        gave them no mass becomes uniform on them). A model trained on every 4th orientation
        is then never asked to draw the others unasked."""
        if not strides:
            return self
        tables = {}
        for f in FACTORS:
            keep = np.arange(FACTOR_SIZES[f]) % int(strides.get(f, 1)) == 0
            table = np.where(keep, self.tables[f], 0.0)
            sums = table.sum(axis=-1, keepdims=True)
            tables[f] = np.where(sums > 0, table / np.where(sums > 0, sums, 1.0), keep / keep.sum())
        return FactorSCM(self.edges, tables)

    def to_dict(self) -> dict:
        """JSON-ready: {"edges": [[parent, child], ...], "tables": {factor: nested lists}}."""
        return {"edges": [list(e) for e in self.edges],
                "tables": {f: self.tables[f].tolist() for f in FACTORS}}

    @classmethod
    def from_dict(cls, data: dict) -> FactorSCM:
        try:
            return cls(data["edges"], {f: np.asarray(t) for f, t in data["tables"].items()})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ScmError(f"not an SCM dict (expected 'edges' and 'tables'): {exc}") from None

    @property
    def is_independent(self) -> bool:
        return not self.edges

    # ----------------------------------------------------------------- mechanisms

    def log_table(self, factor: str, classes: np.ndarray) -> np.ndarray:
        """(n, K) log p(factor | parents) for each row of (n, 5) classes (parents read from it)."""
        table = self.log_tables[factor]
        if not self.parents[factor]:
            return np.broadcast_to(table, (len(classes), table.shape[-1]))
        index = tuple(classes[:, FACTORS.index(p)] for p in self.parents[factor])
        return table[index]

    def mechanism(self, factor: str, classes: np.ndarray, gumbel: np.ndarray) -> np.ndarray:
        """Gumbel-max: argmax(log p(factor | parents) + U_factor), (n,) classes."""
        return np.argmax(self.log_table(factor, classes) + gumbel, axis=1)

    def log_prob(self, classes: np.ndarray) -> np.ndarray:
        """(n,) log p(classes) under the DAG; -inf where impossible."""
        classes = np.asarray(classes, dtype=np.int64)
        total = np.zeros(len(classes))
        rows = np.arange(len(classes))
        for i, f in enumerate(FACTORS):
            total += self.log_table(f, classes)[rows, classes[:, i]]
        return total

    def prior_gumbels(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        return {f: gumbels(uniforms(keys, STREAM_GUMBEL + i, FACTOR_SIZES[f]))
                for i, f in enumerate(FACTORS)}

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """(n, 5) classes sampled from the SCM (ancestral Gumbel-max); row i uses key (seed, i)."""
        keys = row_keys(np.full(n, seed, dtype=np.int64), np.arange(n))
        return self.forward(self.prior_gumbels(keys))

    def forward(self, noise: dict[str, np.ndarray], do: np.ndarray | None = None) -> np.ndarray:
        """Run the mechanisms in topological order; `do` (n, 5) fixes classes where >= 0."""
        n = len(next(iter(noise.values())))
        classes = np.zeros((n, len(FACTORS)), dtype=np.int64)
        for f in self.order:
            i = FACTORS.index(f)
            value = self.mechanism(f, classes, noise[f])
            classes[:, i] = value if do is None else np.where(do[:, i] >= 0, do[:, i], value)
        return classes

    def abduct_gumbels(self, classes: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Sample U_f | observed classes exactly (top-down Gumbel), per factor.

        Given logits l and the observed argmax k, the maximum M = max(l + g) is
        Gumbel(logsumexp l) and lands on k; every other l_i + g_i is Gumbel(l_i) truncated
        below M. Classes with probability zero cannot win, so their noise keeps its prior.
        """
        classes = np.asarray(classes, dtype=np.int64)
        rows = np.arange(len(classes))
        out = {}
        for i, f in enumerate(FACTORS):
            logits = self.log_table(f, classes)
            u = uniforms(keys, STREAM_GUMBEL + i, FACTOR_SIZES[f] + 1)
            finite = np.isfinite(logits)
            safe = np.where(finite, logits, 0.0)
            top = np.logaddexp.reduce(np.where(finite, logits, -np.inf), axis=1) + gumbels(u[:, 0])
            free = safe + gumbels(u[:, 1:])  # Gumbel(l_i)
            below = -np.logaddexp(-top[:, None], -free)  # truncated below the maximum
            below = np.minimum(below, np.nextafter(top, -np.inf)[:, None])
            perturbed = below
            perturbed[rows, classes[:, i]] = top
            out[f] = np.where(finite, perturbed - safe, gumbels(u[:, 1:]))
        return out

    # ----------------------------------------------------------------- exact posteriors

    def sample_posterior(self, given: np.ndarray, do: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Classes ~ p_do(factors | given) exactly, by enumeration; -1 means absent.

        `do` mutilates the graph (the intervened factors are fixed; their children still
        read them). Each connected component of the non-intervened factors is enumerated
        on its own (cached per evidence pattern) and sampled by inverse CDF with the row's
        uniform `u[:, first factor of the component]`. Raises ScmError for rows whose
        evidence has probability zero: call `evidence_possible` first.
        """
        given = np.asarray(given, dtype=np.int64)
        do = np.asarray(do, dtype=np.int64)
        out = np.where(do >= 0, do, 0)
        patterns, inverse = np.unique(np.concatenate([given, do], axis=1), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        for p, pattern in enumerate(patterns):
            rows = np.flatnonzero(inverse == p)
            for factors, shape, cdf in self._posterior(tuple(pattern[:5]), tuple(pattern[5:])):
                if cdf is None:
                    raise ScmError("evidence has probability zero under the SCM")
                col = FACTORS.index(factors[0])
                flat = np.searchsorted(cdf, u[rows, col] * cdf[-1], side="right")
                flat = np.minimum(flat, len(cdf) - 1)
                for f, values in zip(factors, np.unravel_index(flat, shape)):
                    out[rows, FACTORS.index(f)] = values
        return out

    def distribution(self, target: str, given: dict | None = None, do: dict | None = None) -> np.ndarray:
        """The exact p_do(target | given) over the target's classes, by enumeration.

        `given` and `do` map factor names to classes. Raises ScmError when the evidence
        has probability zero.
        """
        given_row, do_row = np.full(len(FACTORS), -1), np.full(len(FACTORS), -1)
        for row, values in ((given_row, given or {}), (do_row, do or {})):
            for f, value in values.items():
                row[FACTORS.index(f)] = int(value)
        t = FACTORS.index(target)
        if do_row[t] >= 0 or given_row[t] >= 0:  # fixed by the question itself
            if not self.evidence_possible(given_row[None], do_row[None])[0]:
                raise ScmError("evidence has probability zero under the SCM")
            out = np.zeros(FACTOR_SIZES[target])
            out[max(do_row[t], given_row[t])] = 1.0
            return out
        for factors, shape, cdf in self._posterior(tuple(given_row), tuple(do_row)):
            if cdf is None:
                raise ScmError("evidence has probability zero under the SCM")
            if target in factors:
                joint = np.diff(cdf, prepend=0.0).reshape(shape) / cdf[-1]
                axes = tuple(a for a, f in enumerate(factors) if f != target)
                return joint.sum(axis=axes)
        raise AssertionError(f"{target} is in no component")  # every free factor is in one

    def evidence_possible(self, given: np.ndarray, do: np.ndarray) -> np.ndarray:
        """(n,) bool: whether p_do(given) > 0 for each row."""
        given = np.asarray(given, dtype=np.int64)
        do = np.asarray(do, dtype=np.int64)
        clash = ((given >= 0) & (do >= 0) & (given != do)).any(axis=1)
        patterns, inverse = np.unique(np.concatenate([given, do], axis=1), axis=0, return_inverse=True)
        ok = np.array([all(c is not None for *_, c in self._posterior(tuple(p[:5]), tuple(p[5:])))
                       for p in patterns])
        return ok[inverse.reshape(-1)] & ~clash

    def _posterior(self, given: tuple, do: tuple) -> list:
        key = (given, do)
        if key in self._posterior_cache:
            return self._posterior_cache[key]
        free = [f for i, f in enumerate(FACTORS) if do[i] < 0]
        components = _components(free, [(p, c) for p, c in self.edges if p in free and c in free])
        result = []
        for comp in components:
            shape = tuple(FACTOR_SIZES[f] for f in comp)
            logj = np.zeros(shape)
            for f in comp:
                logj = logj + self._factor_term(f, comp, do)
                i = FACTORS.index(f)
                if given[i] >= 0:  # evidence: keep only the observed class
                    mask = np.full(FACTOR_SIZES[f], -np.inf)
                    mask[given[i]] = 0.0
                    logj = logj + mask.reshape([-1 if g == f else 1 for g in comp])
            top = logj.max()
            cdf = None if not np.isfinite(top) else np.cumsum(np.exp(logj - top).ravel())
            result.append((comp, shape, cdf))
        # A byte budget keeps a long run with many evidence patterns from growing unbounded.
        size = sum(c.nbytes for *_, c in result if c is not None)
        if self._cache_bytes + size > 256 * 2**20:
            self._posterior_cache.clear()
            self._cache_bytes = 0
        self._posterior_cache[key] = result
        self._cache_bytes += size
        return result

    def _factor_term(self, f: str, comp: list, do: tuple) -> np.ndarray:
        """log p(f | parents) broadcast onto the component's axes; intervened parents fixed."""
        table = self.log_tables[f]
        index, kept = [], []
        for p in self.parents[f]:
            j = FACTORS.index(p)
            if do[j] >= 0:
                index.append(do[j])
            else:
                index.append(slice(None))
                kept.append(p)
        table = table[tuple(index) + (slice(None),)]
        axes = kept + [f]
        order = sorted(range(len(axes)), key=lambda a: comp.index(axes[a]))
        table = np.transpose(table, order)
        return table.reshape([FACTOR_SIZES[g] if g in axes else 1 for g in comp])


def _uniform_table(f: str, parents: list) -> np.ndarray:
    shape = tuple(FACTOR_SIZES[p] for p in parents) + (FACTOR_SIZES[f],)
    return np.full(shape, 1.0 / FACTOR_SIZES[f])


def _components(nodes: list, edges: list) -> list[list]:
    """Connected components (ignoring direction), each in FACTORS order."""
    label = {n: n for n in nodes}

    def root(n):
        while label[n] != n:
            n = label[n]
        return n

    for a, b in edges:
        label[root(a)] = root(b)
    groups: dict = {}
    for n in nodes:
        groups.setdefault(root(n), []).append(n)
    return [sorted(g, key=FACTORS.index) for g in groups.values()]


# --------------------------------------------------------------------------- image SCM


@dataclass
class Answer:
    """Per sample row: the generated world's classes (m, 5) and binary images (m, 64, 64)."""

    classes: np.ndarray
    images: np.ndarray


class ImageSCM:
    """FactorSCM + the VAE decoder (mechanism of x) and encoder (abduction of z)."""

    def __init__(self, vae, factors: FactorSCM, abduct_z: str = "mean", ground_truth=None,
                 device: str | torch.device | None = None):
        if abduct_z not in ("mean", "sample"):
            raise ScmError(f"abduct_z must be 'mean' or 'sample', got {abduct_z!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae = vae.to(self.device).eval()
        self.factors = factors
        self.abduct_z = abduct_z
        self.z_dim = vae.z_dim
        self.ground_truth = ground_truth

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None) -> ImageSCM:
        """Load the VAE and the SCM recorded in the checkpoint's meta ("scm", "config", "manifest")."""
        from cvae.checkpoint import load_checkpoint

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae, meta = load_checkpoint(directory, device=dev)
        factors = FactorSCM.from_dict(meta["scm"]) if meta.get("scm") else FactorSCM.uniform()
        manifest = meta.get("manifest") or {}
        if manifest.get("generator") in ("render", "import"):  # (checkpoints from before on_grid)
            factors = factors.on_grid((manifest.get("grid") or {}).get("strides") or {})
        abduct_z = (meta.get("config") or {}).get("scm", {}).get("abduct_z", "mean")
        ground_truth = None
        if meta.get("manifest"):
            from cvae.groundtruth import GroundTruth

            ground_truth = GroundTruth.from_manifest(meta["manifest"])
        return cls(vae, factors, abduct_z=abduct_z, ground_truth=ground_truth, device=dev)

    # ----------------------------------------------------------------- networks

    @torch.no_grad()
    def _net(self, fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Apply a network on NET_CHUNK-row chunks (row results independent of batching).

        Every call sees exactly NET_CHUNK rows: full chunks are views of the input, only
        the last one is zero-padded; outputs are written into preallocated tensors.
        """
        n = len(tensors[0])
        outs: list[torch.Tensor] | None = None
        for i in range(0, n, NET_CHUNK):
            part = [t[i:i + NET_CHUNK] for t in tensors]
            rows = len(part[0])
            if rows < NET_CHUNK:
                part = [torch.cat([t, t.new_zeros((NET_CHUNK - rows,) + t.shape[1:])]) for t in part]
            result = fn(*part)
            result = list(result) if isinstance(result, tuple) else [result]
            if outs is None:
                outs = [r.new_empty((n,) + r.shape[1:]) for r in result]
            for out, r in zip(outs, result):
                out[i:i + rows] = r[:rows]
        return outs

    def pixel_probs(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """p = sigmoid(decoder(z, classes)) in float64, (m, 4096)."""
        (logits,) = self._net(self.vae.decode, z.to(self.device), classes.to(self.device))
        return logits.double().sigmoid_()

    # ----------------------------------------------------------------- the Pyro model

    def factor_model(self, n: int) -> torch.Tensor:
        """Exogenous Gumbels U_<f> and the factor sites, in topological order; (n, 5) classes."""
        with pyro.plate("rows", n):
            return self._factors(n)

    def _factors(self, n: int) -> torch.Tensor:
        classes = torch.zeros(n, len(FACTORS), dtype=torch.long)
        for f in self.factors.order:
            i = FACTORS.index(f)
            k = FACTOR_SIZES[f]
            g = pyro.sample(f"U_{f}", dist.Gumbel(torch.zeros(k, dtype=torch.float64), 1.0,
                                                  validate_args=False).to_event(1))
            value = self.factors.mechanism(f, classes.numpy(), g.numpy())
            classes[:, i] = pyro.sample(f, dist.Delta(torch.as_tensor(value, dtype=torch.long), validate_args=False))
        return classes

    def image_model(self, classes: torch.Tensor) -> torch.Tensor:
        """U_z ~ N(0, I), z = U_z; U_x ~ Uniform per pixel, x = 1[U_x < p]; (m, 4096) uint8."""
        with pyro.plate("rows", len(classes)):
            return self._pixels(classes)

    def _pixels(self, classes: torch.Tensor) -> torch.Tensor:
        u_z = pyro.sample("U_z", dist.Normal(torch.zeros(self.z_dim), 1.0, validate_args=False).to_event(1))
        z = pyro.deterministic("z", u_z, event_dim=1)
        p = self.pixel_probs(z, classes).cpu()
        u_x = pyro.sample("U_x", dist.Uniform(torch.zeros(NUM_PIXELS, dtype=torch.float64), 1.0,
                                              validate_args=False).to_event(1))
        return pyro.deterministic("x", (u_x < p).to(torch.uint8), event_dim=1)

    def model(self, n: int) -> torch.Tensor:
        """The whole SCM for n rows: factors, then pixels (factor_model then image_model)."""
        with pyro.plate("rows", n):
            return self._pixels(self._factors(n))

    # ----------------------------------------------------------------- queries

    def answer(self, kinds: np.ndarray, given: np.ndarray, do: np.ndarray, factual: np.ndarray,
               factual_images: np.ndarray, keys: np.ndarray) -> Answer:
        """Answer m sample rows at once (arrays per sample row, -1 = absent).

        kinds: (m,) str of condition | intervene | counterfactual; given, do, factual: (m, 5);
        factual_images: (m, 4096) uint8 (rows that are not counterfactual: ignored); keys: (m,)
        row keys. Rows must be valid (see cvae.queries).
        """
        m = len(kinds)
        is_cf = kinds == "counterfactual"
        # All rows of one kind (the usual bulk case): slices instead of gathers and scatters.
        cf = slice(None) if is_cf.all() else np.flatnonzero(is_cf)
        fwd = np.flatnonzero(~is_cf)

        # condition / intervene: the non-intervened factors from the exact (mutilated) posterior.
        known = np.zeros((m, len(FACTORS)), dtype=np.int64)
        if len(fwd):
            u = uniforms(keys[fwd], STREAM_POSTERIOR, len(FACTORS))
            known[fwd] = self.factors.sample_posterior(given[fwd], do[fwd], u)
        u_z = torch.as_tensor(_normals(uniforms(keys, STREAM_Z, self.z_dim)), dtype=torch.float32)
        u_x = torch.as_tensor(uniforms(keys, STREAM_PIXELS, NUM_PIXELS))

        # counterfactual abduction: Gumbels exactly, z from q(z | x, y), U_x given the pixels.
        noise = {f: np.zeros((m, FACTOR_SIZES[f])) for f in FACTORS}
        if is_cf.any():
            for f, g in self.factors.abduct_gumbels(factual[cf], keys[cf]).items():
                noise[f][cf] = g
            images = torch.as_tensor(factual_images[cf])
            y = torch.as_tensor(factual[cf])
            z = self._abduct_z(images.float(), y, u_z[cf])
            u_z[cf] = z
            p = self.pixel_probs(z, y).cpu()
            v = u_x[cf]
            # x = 1 -> U = p v in (0, p); x = 0 -> U = p + (1 - p) v in [p, 1): the same p gives back
            # x exactly (p v < p in float64 for every v the generator makes, as v <= 1 - 2^-33,
            # and p > 0). Computed in place: these are (m, 4096) float64 arrays.
            below = p * v
            above = (1 - p).mul_(v).add_(p)
            u_x[cf] = torch.where(images > 0, below, above, out=above)

        # Factors: one run of the factor model per intervention pattern (Pyro's do fixes a
        # site for every row of a run).
        classes = torch.zeros(m, len(FACTORS), dtype=torch.long)
        patterns, inverse = np.unique(np.concatenate([do >= 0, is_cf[:, None]], axis=1), axis=0,
                                      return_inverse=True)
        for p, pattern in enumerate(patterns):
            rows = np.flatnonzero(inverse.reshape(-1) == p)
            intervened, counterfactual = pattern[:5], pattern[5]
            if counterfactual:
                data = {f"U_{f}": torch.as_tensor(noise[f][rows]) for f in FACTORS}
            else:
                data = {f: torch.as_tensor(known[rows, i]) for i, f in enumerate(FACTORS) if not intervened[i]}
            actions = {f: torch.as_tensor(do[rows, i]) for i, f in enumerate(FACTORS) if intervened[i]}
            run = poutine.do(poutine.condition(self.factor_model, data=data), data=actions)
            trace = poutine.trace(run).get_trace(len(rows))
            classes[rows] = trace.nodes["_RETURN"]["value"]
        # Pixels: one run of the image model over all rows, its noise conditioned.
        run = poutine.condition(self.image_model, data={"U_z": u_z, "U_x": u_x})
        x = run(classes)
        return Answer(classes.numpy(), x.numpy().reshape(m, IMAGE_SIZE, IMAGE_SIZE))

    def most_likely_reconstruction(self, images: np.ndarray, classes: np.ndarray,
                                   keys: np.ndarray) -> np.ndarray:
        """The model's own composition step: z abducted from (images, classes) as a
        counterfactual abducts it (same stream of `keys`), decoded at the same classes with
        the most likely pixels (logit > 0, no pixel noise); (m, 64, 64) uint8."""
        classes = torch.as_tensor(np.asarray(classes, dtype=np.int64))
        eps = torch.as_tensor(_normals(uniforms(keys, STREAM_Z, self.z_dim)), dtype=torch.float32)
        x = torch.as_tensor(np.asarray(images).reshape(len(classes), -1), dtype=torch.float32)
        z = self._abduct_z(x, classes, eps)
        (logits,) = self._net(self.vae.decode, z.to(self.device), classes.to(self.device))
        return (logits > 0).to(torch.uint8).cpu().numpy().reshape(-1, IMAGE_SIZE, IMAGE_SIZE)

    def _abduct_z(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        loc, scale = self._net(self.vae.encode, x.to(self.device), y.to(self.device))
        if self.abduct_z == "mean":
            return loc.cpu()
        return (loc + scale * eps.to(self.device)).cpu()


def _normals(u: np.ndarray) -> np.ndarray:
    """Standard normals by inverse CDF of (0, 1) uniforms."""
    return torch.special.ndtri(torch.as_tensor(u)).numpy()
