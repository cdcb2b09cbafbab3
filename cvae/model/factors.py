"""The factor half of the structural causal model: a DAG over the five factors with
Gumbel-max mechanisms. Pure numpy, no I/O beyond what `fit` is handed.

Exogenous noise: a Gumbel vector `U_<factor>` per factor. Mechanism:
`factor = argmax(log p(factor | parents) + U_factor)`. `FactorSCM` holds the tables and
does the exact work: sampling, abduction of the Gumbels from observed factors, and exact
posteriors by enumeration (`cvae.causal.image` joins it to the VAE's pixels).

Randomness: every random number is a counter-based hash of (row key, stream, counter)
(`cvae.rng`), so a result depends only on its query row: never on batching or order.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from cvae.data.grid import FACTOR_SIZES, FACTORS, describe_classes, factor_order, strided_classes
from cvae.errors import ConfigError, CvaeError
from cvae.rng import STREAM_GUMBEL, gumbels, row_keys, uniforms


class ScmError(CvaeError):
    """An SCM spec (edges, tables) that cannot be used, with the problem named."""



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
        try:
            self.order = factor_order(self.edges)
        except ValueError as exc:
            raise ScmError(f"{exc}: {self.edges}") from None
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
    def of_dataset(cls, manifest: dict, classes: dict | None = None) -> FactorSCM:
        """The factor SCM a dataset's factors were drawn from, by its manifest: the `scm`
        a 'scm' generator sampled from (tables given in the config), else dSprites' own
        independent uniform factors on the dataset's (strided) grid, or on `classes` (a
        model's grid) when given. This is the truth that counterfactuals of descendants and
        the condition/intervene families are scored against, whatever tables a checkpoint
        learned."""
        if manifest.get("generator") != "scm":
            if classes is not None:
                return cls.uniform().on_classes(classes)
            return cls.uniform().on_grid((manifest.get("grid") or {}).get("strides") or {})
        if not manifest.get("scm"):
            raise ScmError("manifest: generator 'scm' without the 'scm' it sampled from")
        return cls.from_config(manifest["scm"])

    def on_grid(self, strides: dict) -> FactorSCM:
        """This SCM on a strided grid: `on_classes` with every k-th class of each factor."""
        if not strides:
            return self
        return self.on_classes({f: strided_classes(f, strides) for f in FACTORS})

    def on_classes(self, classes: dict) -> FactorSCM:
        """This SCM with every class outside `classes` (per factor; a factor not named keeps
        all of its classes) given probability zero, each table row renormalised over the kept
        classes (a row that gave them no mass becomes uniform on them). A model trained on
        every 4th orientation is then never asked to draw the others unasked."""
        keeps = {f: np.isin(np.arange(FACTOR_SIZES[f]), classes[f]) if f in classes else None for f in FACTORS}
        if all(k is None or k.all() for k in keeps.values()):
            return self
        tables = {}
        for f in FACTORS:
            keep = keeps[f] if keeps[f] is not None else np.ones(FACTOR_SIZES[f], dtype=bool)
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

    def why_impossible(self, classes: np.ndarray) -> str:
        """For one row of classes that log_prob finds impossible: which factors have
        probability zero, and which classes they could take instead (for error messages)."""
        classes = np.asarray(classes, dtype=np.int64).reshape(1, -1)
        reasons = []
        for i, f in enumerate(FACTORS):
            p = np.exp(self.log_table(f, classes)[0])
            if p[classes[0, i]] > 0:
                continue
            parents = ", ".join(f"{q}={classes[0, FACTORS.index(q)]}" for q in self.parents[f])
            reasons.append(f"{f}={classes[0, i]}{' given ' + parents if parents else ''} (the SCM gives {f} "
                           f"mass only on {describe_classes(np.flatnonzero(p))} of 0..{FACTOR_SIZES[f] - 1})")
        return "; ".join(reasons)

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


def dataset_scm(config) -> FactorSCM | None:
    """The factor SCM a dataset is sampled from when `config.data.generator` is 'scm' (for
    cvae.data.shards.write_dataset), else None; one it cannot sample from is a ConfigError."""
    if config.data.generator != "scm":
        return None
    try:
        return FactorSCM.from_config(config.scm)
    except ValueError as exc:  # e.g. tables 'fit' has no data to count from here
        raise ConfigError(f"config.scm: cannot sample a dataset from it: {exc}") from None
