"""Config validation: bad configs fail at load time with an error naming the key and file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cvae.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def _tiny(**sections) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for dotted, value in sections.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert isinstance(config, Config)
    assert config.name == Path(name).stem  # a run's name says which config made it


def test_a_valid_config_round_trips(tmp_path):
    config = load_config(_write(tmp_path, _tiny()))
    again = load_config(_write(tmp_path, config.to_dict()))
    assert again == config


@pytest.mark.parametrize(("change", "message"), [
    # unknown keys, at the top and inside a section
    ({"bogus": 1}, r"config\.bogus: unknown key"),
    ({"train__epochz": 3}, r"config\.train\.epochz: unknown key"),
    ({"data__strides__colour": 2}, r"config\.data\.strides\.colour: unknown factor"),
    ({"data__holdout": [{"size": [1]}]}, r"config\.data\.holdout\[0\]\.size: unknown factor"),
    # wrong types
    ({"train__epochs": "ten"}, r"config\.train\.epochs: expected int, got str"),
    ({"train__num_workers": True}, r"config\.train\.num_workers: expected int, got bool"),
    ({"train__lr": "fast"}, r"config\.train\.lr: expected float, got str"),
    ({"data__test_fraction": True}, r"config\.data\.test_fraction: expected float, got bool"),
    ({"data__strides": [4]}, r"config\.data\.strides: expected dict, got list"),
    ({"model": 5}, r"config\.model: must be a mapping, got int"),
    ({"data__holdout": [{"shape": [7]}]}, r"config\.data\.holdout\[0\]\.shape: must be a list of classes in \[0, 3\)"),
    # impossible values
    ({"data__test_fraction": 1.5}, r"config\.data\.test_fraction: must be in \[0, 1\), got 1\.5"),
    ({"data__test_fraction": -0.1}, r"config\.data\.test_fraction: must be in \[0, 1\)"),
    ({"data__validation_fraction": 1.0}, r"config\.data\.validation_fraction: must be in \[0, 1\), got 1\.0"),
    ({"data__validation_fraction": -0.1}, r"config\.data\.validation_fraction: must be in \[0, 1\)"),
    ({"data__validation_fraction": "a lot"}, r"config\.data\.validation_fraction: expected float, got str"),
    ({"data__test_fraction": 0.5, "data__validation_fraction": 0.5},
     r"config\.data\.validation_fraction: test_fraction \+ validation_fraction must be < 1"),
    ({"data__num_shards": 0}, r"config\.data\.num_shards: must be > 0, got 0"),
    ({"train__num_workers": -1}, r"config\.train\.num_workers: must be >= 0"),
    ({"train__num_workers": 0, "train__use_gpu": True}, r"config\.train\.use_gpu: needs num_workers >= 1"),
    ({"train__num_workers": 8}, r"config\.train\.num_workers: 8 workers need data\.num_shards >= 8, got 4"),
    ({"train__batch_size": 0}, r"config\.train\.batch_size: must be > 0, got 0"),
    ({"train__lr": 0}, r"config\.train\.lr: must be > 0"),
    ({"train__lr": float("nan")}, r"config\.train\.lr: must be > 0"),
    ({"train__accumulate": 0}, r"config\.train\.accumulate: must be > 0, got 0"),
    ({"train__lr_schedule": "linear"},
     r"config\.train\.lr_schedule: must be one of constant, cosine, got 'linear'"),
    ({"query__actors": 0}, r"config\.query\.actors: must be > 0, got 0"),
    ({"query__gpus_per_actor": -1}, r"config\.query: resources per actor must be >= 0"),
    ({"query__actors": 3}, r"config\.num_cpus: 2 CPUs cannot hold query\.actors x query\.cpus_per_actor = 3 CPUs"),
    ({"train__cpus_per_worker": 2},
     r"config\.num_cpus: 2 CPUs cannot hold train\.num_workers x train\.cpus_per_worker = 4"),
    ({"num_cpus": 0}, r"config\.num_cpus: must be > 0, got 0"),
    ({"seed": -1}, r"config\.seed: must be >= 0"),
    ({"model__arch": "transformer"}, r"config\.model\.arch: must be one of mlp, conv, sprite, warp, got 'transformer'"),
    ({"model__learn_translation": True}, r"config\.model\.learn_translation: only arch sprite has position maps"),
    ({"model__learn_translation": "yes"}, r"config\.model\.learn_translation: expected bool, got str"),
    ({"data__generator": "import"}, r"config\.data\.official_path: required when generator is 'import'"),
    ({"data__generator": "import", "data__official_path": "/no/such/file.npz"},
     r"config\.data\.official_path: file not found: /no/such/file\.npz"),
    ({"scm__edges": [["shape", "shape"]], "scm__tables": "fit"}, r"config\.scm\.edges\[0\]: .* self-loop"),
    ({"scm__edges": [["shape", "scale"], ["scale", "pos_y"], ["pos_y", "shape"]], "scm__tables": "fit"},
     r"config\.scm\.edges: the factor graph has a cycle"),
    ({"scm__edges": [["shape", "size"]], "scm__tables": "fit"}, r"config\.scm\.edges\[0\]: must be \[parent, child\]"),
    ({"scm__edges": [["shape", "scale"]]}, r"config\.scm\.tables: 'uniform' has no parents"),
    ({"pipeline__num_queries": 0}, r"config\.pipeline\.num_queries: must be > 0"),
])
def test_bad_configs_fail_at_load_naming_key_and_file(tmp_path, change, message):
    path = _write(tmp_path, _tiny(**change))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)



def test_a_mistyped_key_names_the_key_probably_meant(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.train\.epoch: unknown key \(did you mean 'epochs'\? known keys: "):
        load_config(_write(tmp_path, _tiny(train__epoch=3)))
    with pytest.raises(ConfigError, match=r"config\.qeury: unknown key \(did you mean 'query'\?"):
        load_config(_write(tmp_path, _tiny(qeury={"actors": 1})))
    with pytest.raises(ConfigError, match=r"config\.bogus: unknown key \(known keys: ") as err:
        load_config(_write(tmp_path, _tiny(bogus=1)))  # nothing close: no guess
    assert "did you mean" not in str(err.value)

def test_validation_fraction_defaults_to_a_split_and_may_be_zero(tmp_path):
    assert load_config(_write(tmp_path, _tiny())).data.validation_fraction == 0.05
    assert load_config(_write(tmp_path, _tiny(data__validation_fraction=0))).data.validation_fraction == 0.0


def test_a_causal_dag_is_accepted(tmp_path):
    config = load_config(_write(tmp_path, _tiny(scm__edges=[["shape", "scale"], ["scale", "pos_y"]],
                                                scm__tables="fit")))
    assert config.scm.edges == [["shape", "scale"], ["scale", "pos_y"]]


def test_ray_address_lifts_the_local_cpu_check(tmp_path):
    # With a cluster address the in-process CPU count does not limit the workers.
    config = load_config(_write(tmp_path, _tiny(ray_address="auto", query__actors=3)))
    assert config.query.actors == 3


@pytest.mark.parametrize(("text", "message"), [
    ("train: [1, 2", r"not valid YAML"),
    ("- just\n- a list\n", r"the top level must be a mapping"),
])
def test_unreadable_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file not found: /no/such\.yaml"):
        load_config("/no/such.yaml")


def test_overrides_are_validated_too(tmp_path):
    path = _write(tmp_path, _tiny())
    assert load_config(path, {"train.epochs": 5}).train.epochs == 5
    with pytest.raises(ConfigError, match=r"config\.train\.epochs: must be > 0"):
        load_config(path, {"train.epochs": 0})
    with pytest.raises(ConfigError, match=r"override seed\.x: seed is not a section"):
        load_config(path, {"seed.x": 1})


def test_query_settings_are_the_query_jobs_keyword_arguments():
    """config.query crosses into run_query_job as one mapping (jobs.query and the pipeline):
    a field the job does not take, or a renamed one, fails here, not in a user's run."""
    import inspect

    from cvae.config import QueryConfig
    from cvae.serve.engine import run_query_job

    settings = QueryConfig(actors=3, batch_size=7).job_settings()
    accepted = inspect.signature(run_query_job).parameters
    assert settings["actors"] == 3 and settings["batch_size"] == 7
    assert set(settings) <= set(accepted) and len(settings) == len(QueryConfig.__dataclass_fields__)
