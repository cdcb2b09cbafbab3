"""Stage records: a stage is reused only when it finished from exactly the same inputs."""
from cvae.stages import RECORD, changed_keys, fingerprint, finished, read_record, write_record


def test_a_stage_is_finished_only_with_the_same_inputs_and_its_marker(tmp_path):
    inputs = {"data": {"strides": {"pos_x": 2}}, "seed": 0}
    assert finished(tmp_path, inputs, "manifest.json") is None  # no record
    write_record(tmp_path, "data", inputs)  # started, not finished
    assert read_record(tmp_path)["result"] is None and finished(tmp_path, inputs, "manifest.json") is None
    write_record(tmp_path, "data", inputs, {"rows": 10})
    assert finished(tmp_path, inputs, "manifest.json") is None  # the marker is missing
    (tmp_path / "manifest.json").write_text("{}")
    assert finished(tmp_path, inputs, "manifest.json")["result"] == {"rows": 10}
    # key order does not matter; any changed value does
    assert finished(tmp_path, {"seed": 0, "data": {"strides": {"pos_x": 2}}}, "manifest.json") is not None
    assert finished(tmp_path, {**inputs, "seed": 1}, "manifest.json") is None
    assert fingerprint(inputs) != fingerprint({**inputs, "data": {"strides": {"pos_x": 4}}})


def test_a_broken_record_counts_as_none(tmp_path):
    (tmp_path / RECORD).write_text("{not json")
    assert read_record(tmp_path) is None
    (tmp_path / RECORD).write_text("[1, 2]")
    assert read_record(tmp_path) is None


def test_changed_keys_names_what_differs():
    old = {"data": "a", "model": {"z_dim": 50}, "lr": 0.001}
    assert changed_keys(old, {**old, "model": {"z_dim": 8}, "seed": 1}) == ["model", "seed"]
    assert changed_keys(old, dict(old)) == []
