"""Configs are plain YAML read into typed dataclasses and validated on load.

An unknown key, a wrong type, an impossible value or a missing file is a
`ConfigError` that names the key (as a dotted path) or the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvae import fs
from cvae.data.grid import FACTOR_SIZES, FACTORS, SHAPE_NAMES, factor_order
from cvae.errors import ConfigError, CvaeError

__all__ = ["Config", "ConfigError", "Family", "FamilyError", "load_config", "parse_family"]


@dataclass
class DataConfig:
    generator: str = "render"  # render | import | scm (sample a dataset from the causal SCM)
    official_path: str | None = None  # the official .npz or .hdf5, for generator: import
    num_shards: int = 8
    strides: dict = field(default_factory=dict)  # e.g. {orientation: 4, pos_x: 2}
    test_fraction: float = 0.1
    # Of the rows not held out: test rows are for reported quality and queries, validation
    # rows choose the best checkpoint (0: no validation split; then test loss chooses).
    validation_fraction: float = 0.05
    # Held-out factor combinations: a row is held out when, for some rule, each factor the
    # rule names has one of the listed classes, e.g. {shape: [2], scale: [5], pos_x: [28, 30]}.
    holdout: list = field(default_factory=list)
    compression: str = "lzf"  # lzf | gzip
    chunk_rows: int = 256
    scm_samples: int = 0  # rows to sample for generator: scm

    def validate(self, where: str) -> None:
        _one_of(self.generator, ("render", "import", "scm"), f"{where}.generator")
        if self.generator == "import" and not self.official_path:
            raise ConfigError(f"{where}.official_path: required when generator is 'import'")
        if self.official_path and self.generator == "import" and not Path(self.official_path).exists():
            raise ConfigError(f"{where}.official_path: file not found: {self.official_path}")
        _positive(self.num_shards, f"{where}.num_shards")
        _positive(self.chunk_rows, f"{where}.chunk_rows")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"{where}.test_fraction: must be in [0, 1), got {self.test_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"{where}.validation_fraction: must be in [0, 1), "
                              f"got {self.validation_fraction}")
        if self.test_fraction + self.validation_fraction >= 1.0:
            raise ConfigError(
                f"{where}.validation_fraction: test_fraction + validation_fraction must be < 1 "
                f"(some rows must be left for training), "
                f"got {self.test_fraction} + {self.validation_fraction}")
        for name, stride in self.strides.items():
            if name not in FACTORS:
                raise ConfigError(f"{where}.strides.{name}: unknown factor (expected one of {FACTORS})")
            if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
                raise ConfigError(f"{where}.strides.{name}: must be a positive integer, got {stride!r}")
        for i, rule in enumerate(self.holdout):
            if not isinstance(rule, dict) or not rule:
                raise ConfigError(f"{where}.holdout[{i}]: must be a mapping of factor to classes")
            for name, classes in rule.items():
                if name not in FACTORS:
                    raise ConfigError(f"{where}.holdout[{i}].{name}: unknown factor")
                if not isinstance(classes, list) or not all(
                    isinstance(c, int) and 0 <= c < FACTOR_SIZES[name] for c in classes
                ):
                    raise ConfigError(
                        f"{where}.holdout[{i}].{name}: must be a list of classes in "
                        f"[0, {FACTOR_SIZES[name]})"
                    )
        _one_of(self.compression, ("lzf", "gzip"), f"{where}.compression")
        if self.scm_samples < 0:
            raise ConfigError(f"{where}.scm_samples: must be >= 0")


@dataclass
class ModelConfig:
    arch: str = "warp"  # warp | sprite | conv | mlp (the original notebook's networks)
    z_dim: int = 50
    hidden: int = 1000  # width of the mlp's hidden layers
    # sprite only: learn the position maps (the default, null) or freeze them (false) at
    # their whole-pixel starting guess
    learn_translation: bool | None = None
    channels: int = 32  # width of the conv layers (conv, sprite, warp); fewer is faster to train and ask
    encoder_channels: int | None = None  # the encoder's width where it differs (null: channels)

    def validate(self, where: str) -> None:
        _one_of(self.arch, ("mlp", "conv", "sprite", "warp"), f"{where}.arch")
        if self.learn_translation is not None and self.arch != "sprite":
            raise ConfigError(f"{where}.learn_translation: only arch sprite has position maps "
                              f"to learn, got arch {self.arch!r}")
        _positive(self.z_dim, f"{where}.z_dim")
        _positive(self.hidden, f"{where}.hidden")
        _positive(self.channels, f"{where}.channels")
        if self.encoder_channels is not None:
            _positive(self.encoder_channels, f"{where}.encoder_channels")


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    num_workers: int = 2  # 0 runs Ray Train's local mode (in-process)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads_per_worker: int = 1
    batch_size: int = 128
    epochs: int = 10
    lr: float = 1e-3
    # "constant", or "cosine": lr falls along a half cosine over the run's steps to
    # lr / 100 at the last one (a function of the step and train.epochs alone, so a resumed
    # run follows it; resuming with more epochs lays the curve over the new total, so lr
    # rises again where the run resumes).
    lr_schedule: str = "constant"
    # Batches whose gradients are summed before each Adam step (DDP all-reduces once per
    # step): k batches of batch_size train like one batch k times larger, with k times
    # fewer all-reduces, which is what several CPU workers sharing a machine pay most for.
    accumulate: int = 1
    eval_every: int = 1
    keep_checkpoints: int = 3
    max_failures: int = 2
    shuffle_buffer: int = 4096
    max_steps_per_epoch: int = 0  # 0: a full pass; >0 caps an epoch (benchmarks, smoke tests)

    def validate(self, where: str) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: must be >= 0 (0 runs local mode)")
        for key in ("cpus_per_worker", "threads_per_worker", "batch_size", "epochs",
                    "eval_every", "keep_checkpoints", "shuffle_buffer", "accumulate"):
            _positive(getattr(self, key), f"{where}.{key}")
        if not self.lr > 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        _one_of(self.lr_schedule, LR_SCHEDULES, f"{where}.lr_schedule")
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: must be >= -1 (-1: retry forever)")
        if self.max_steps_per_epoch < 0:
            raise ConfigError(f"{where}.max_steps_per_epoch: must be >= 0")


@dataclass
class ScmConfig:
    # The factor DAG as parent -> child edges over factor names; empty: dSprites' own
    # independent factors.
    edges: list = field(default_factory=list)
    # Conditional tables: "uniform" (only without edges), "fit" (counted from the shards
    # with add-`smoothing`), or "given" (read from `tables`).
    tables: str = "uniform"
    smoothing: float = 1.0
    # For tables: given, per factor a nested list: the table of p(factor | parents), indexed
    # by the parents' classes in the order of `edges`, last axis the factor's classes.
    given: dict = field(default_factory=dict)
    abduct_z: str = "mean"  # mean | sample: how z is abducted from q(z | x, y)

    def validate(self, where: str) -> None:
        for i, edge in enumerate(self.edges):
            if not (isinstance(edge, list) and len(edge) == 2 and all(e in FACTORS for e in edge)):
                raise ConfigError(f"{where}.edges[{i}]: must be [parent, child] factor names, got {edge!r}")
            if edge[0] == edge[1] or edge in self.edges[:i]:
                raise ConfigError(f"{where}.edges[{i}]: {edge!r} is a self-loop or a repeated edge")
        try:  # the factor graph must be a DAG
            factor_order(self.edges)
        except ValueError as exc:
            raise ConfigError(f"{where}.edges: {exc}") from None
        _one_of(self.tables, ("uniform", "fit", "given"), f"{where}.tables")
        if self.tables == "uniform" and self.edges:
            raise ConfigError(f"{where}.tables: 'uniform' has no parents; use 'fit' or 'given' with edges")
        if self.smoothing < 0:
            raise ConfigError(f"{where}.smoothing: must be >= 0")
        for name in self.given:
            if name not in FACTORS:
                raise ConfigError(f"{where}.given.{name}: unknown factor")
        _one_of(self.abduct_z, ("mean", "sample"), f"{where}.abduct_z")


@dataclass
class QueryConfig:
    actors: int = 2
    batch_size: int = 4096
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    max_samples: int = 64  # a larger num_samples is a bad row, not a job failure

    def validate(self, where: str) -> None:
        for key in ("actors", "batch_size", "max_samples"):
            _positive(getattr(self, key), f"{where}.{key}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ConfigError(f"{where}: resources per actor must be >= 0")

    def job_settings(self) -> dict:
        """The keyword arguments of cvae.serve.engine.run_query_job, one per field (the names match)."""
        return dataclasses.asdict(self)


# --- condition-versus-intervene families (cvae.evaluate.families asks and scores them)

class FamilyError(CvaeError):
    """A family spec that cannot be used, with the offending entry named."""


@dataclass(frozen=True)
class Family:
    target: str
    factor: str
    value: int

    @property
    def label(self) -> str:
        value = SHAPE_NAMES[self.value] if self.factor == "shape" else str(self.value)
        return f"{self.target} | {self.factor}={value}"

    def question(self, kind: str) -> str:
        value = SHAPE_NAMES[self.value] if self.factor == "shape" else str(self.value)
        on = f"{self.factor}={value}" if kind == "condition" else f"do({self.factor}={value})"
        return f"P({self.target} | {on})"

    def to_dict(self) -> dict:
        return {"target": self.target, "factor": self.factor, "value": self.value}


def parse_family(entry, where: str) -> Family:
    """A family from `{target: <factor>, factor: <factor>, value: <class, or a shape name>}`."""
    if not isinstance(entry, dict) or set(entry) != {"target", "factor", "value"}:
        raise FamilyError(f"{where}: expected {{target: <factor>, factor: <factor>, value: <class>}}, "
                          f"got {entry!r}")
    target, factor, value = entry["target"], entry["factor"], entry["value"]
    if target not in FACTORS:
        raise FamilyError(f"{where}.target: unknown factor {target!r} (factors: {', '.join(FACTORS)})")
    if factor not in FACTORS or factor == target:
        raise FamilyError(f"{where}.factor: must be a factor other than the target, got {factor!r}")
    if factor == "shape" and value in SHAPE_NAMES:
        value = SHAPE_NAMES.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < FACTOR_SIZES[factor]:
        raise FamilyError(f"{where}.value: must be a {factor} class in [0, {FACTOR_SIZES[factor]})"
                          + (" or a shape name" if factor == "shape" else "") + f", got {value!r}")
    return Family(target, factor, value)


@dataclass
class PipelineConfig:
    num_queries: int = 2000  # counterfactual queries generated from the test split
    figures_per_factor: int = 8
    # Condition-versus-intervene families ({target: <factor>, factor: <factor>, value: <class>}),
    # each asked both ways `family_samples` times and scored by total variation against the
    # generating SCM's exact distributions (cvae.evaluate.families). Empty: none.
    families: list = field(default_factory=list)
    family_samples: int = 2000

    def validate(self, where: str) -> None:
        _positive(self.num_queries, f"{where}.num_queries")
        if self.figures_per_factor < 0:
            raise ConfigError(f"{where}.figures_per_factor: must be >= 0")
        _positive(self.family_samples, f"{where}.family_samples")
        for i, entry in enumerate(self.families):
            try:
                parse_family(entry, f"{where}.families[{i}]")
            except FamilyError as exc:
                raise ConfigError(str(exc)) from None


@dataclass
class Config:
    name: str = "local"
    seed: int = 0
    out: str = "runs/local"  # a local path or a pyarrow-filesystem URI
    ray_address: str | None = None  # None: a local Ray started in-process
    num_cpus: int | None = None  # resources for the in-process Ray; None: Ray's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scm: ScmConfig = field(default_factory=ScmConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self, where: str = "config") -> None:
        if self.num_cpus is not None:
            _positive(self.num_cpus, f"{where}.num_cpus")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f"{where}.{f.name}")
        if self.train.use_gpu and self.train.num_workers == 0:
            raise ConfigError(f"{where}.train.use_gpu: needs num_workers >= 1")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
        # A family's value must be a class the model trains on: off the data's grid the
        # query job would refuse every one of its rows.
        for i, entry in enumerate(self.pipeline.families):
            family = parse_family(entry, f"{where}.pipeline.families[{i}]")
            stride = int(self.data.strides.get(family.factor, 1))
            if family.value % stride:
                raise ConfigError(f"{where}.pipeline.families[{i}].value: {family.factor}={family.value} is not "
                                  f"on the data's grid (data.strides.{family.factor}: {stride}), so a model "
                                  f"trained on it cannot answer it")
        # Each Ray Train worker reads its own train shards, so there must be enough of them.
        if self.train.num_workers > self.data.num_shards:
            raise ConfigError(f"{where}.train.num_workers: {self.train.num_workers} workers need "
                              f"data.num_shards >= {self.train.num_workers}, got {self.data.num_shards}")
        # An in-process Ray with fewer CPUs than the workers or actors ask for would wait forever.
        if self.ray_address is None and self.num_cpus is not None:
            train_cpus = self.train.num_workers * self.train.cpus_per_worker
            if train_cpus > self.num_cpus:
                raise ConfigError(f"{where}.num_cpus: {self.num_cpus} CPUs cannot hold "
                                  f"train.num_workers x train.cpus_per_worker = {train_cpus:g} CPUs")
            # The query actors must leave a CPU for Ray Data's write tasks (cvae.serve.engine).
            query_cpus = self.query.actors * self.query.cpus_per_actor
            if query_cpus > self.num_cpus - 1:
                raise ConfigError(f"{where}.num_cpus: {self.num_cpus} CPUs cannot hold "
                                  f"query.actors x query.cpus_per_actor = {query_cpus:g} CPUs plus one "
                                  f"for writing (Ray's CPUs are logical: more than the "
                                  f"cores is fine)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read, type-check and validate a YAML config (a path or a URI); `overrides` are dotted keys."""
    if fs.is_uri(path):
        try:
            text = fs.read_bytes(path).decode()
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise ConfigError(f"config file not found: {path} ({exc})") from None
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {key} is not a section")
        node[leaf] = value
    try:
        config = from_dict(Config, raw, "config")
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def config_from_dict(raw: dict) -> Config:
    config = from_dict(Config, raw, "config")
    config.validate()
    return config


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        meant = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean '{meant[0]}'? " if meant else ""
        raise ConfigError(f"{where}.{unknown[0]}: unknown key ({hint}known keys: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _positive(value: Any, where: str) -> None:
    if not value > 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")


def _one_of(value: Any, allowed: tuple, where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
