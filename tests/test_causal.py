"""The causal world: exact distributions, condition-versus-intervene families measured by
total variation, and counterfactual truth from the SCM that generated the data."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvae.causal.image import ImageSCM
from cvae.config import ConfigError, ScmConfig, load_config
from cvae.data.grid import FACTORS, SHAPE_NAMES, classes_to_index
from cvae.data.groundtruth import GroundTruth
from cvae.data.images import decode_image
from cvae.data.readout import Readout
from cvae.data.render import RENDERER_VERSION
from cvae.evaluate.families import (
    FAMILY_KINDS,
    FamilyError,
    FamilyTally,
    family_queries,
    parse_family,
    tv,
    tv_table,
    write_family_queries,
)
from cvae.evaluate.scores import evaluate
from cvae.model.checkpoint import load_meta, save_checkpoint
from cvae.model.factors import FactorSCM, ScmError
from cvae.serve.engine import read_output, run_query_job
from cvae.serve.make_queries import make_queries
from cvae.serve.queries import answer_queries, check_schema
from scm_fixtures import CAUSAL_EDGES, causal_scm, causal_tables, make_checkpoint, tiny_vae

SHAPE, SCALE, ORIENT, POS_X, POS_Y = range(5)
TRUTH = GroundTruth("render")


def causal_manifest() -> dict:
    """The manifest of a dataset sampled from the fixtures' causal SCM."""
    given = {f: t.tolist() for f, t in causal_tables().items()}
    scm = dataclasses.asdict(ScmConfig(edges=[list(e) for e in CAUSAL_EDGES], tables="given", given=given))
    return {"generator": "scm", "renderer": RENDERER_VERSION, "official_path": None, "scm": scm,
            "grid": {"strides": {}}}


def with_manifest(path, manifest: dict):
    """Replace a checkpoint's data manifest."""
    from cvae.model.checkpoint import load_checkpoint

    meta = load_meta(path)
    model, _ = load_checkpoint(path)
    meta.pop("model", None)
    save_checkpoint(path, model, {**meta, "manifest": manifest})
    return path


def hist(values, k):
    return np.bincount(values, minlength=k) / len(values)


# ----------------------------------------------------------------------------- exact truths

def test_distribution_is_bayes_rule_by_hand():
    scm = causal_scm()
    t = scm.tables
    by_hand = t["shape"] * t["scale"][:, 5]
    assert np.allclose(scm.distribution("shape", given={"scale": 5}), by_hand / by_hand.sum())
    assert np.allclose(scm.distribution("shape", do={"scale": 5}), t["shape"])  # the cause keeps its prior
    # two steps down: P(pos_y | shape = 2) = sum_s P(s | 2) P(pos_y | s), and doing it is the same
    assert np.allclose(scm.distribution("pos_y", given={"shape": 2}), t["scale"][2] @ t["pos_y"])
    assert np.allclose(scm.distribution("pos_y", do={"shape": 2}), t["scale"][2] @ t["pos_y"])
    # two steps up: P(scale | pos_y = 20) is proportional to P(scale) P(20 | scale)
    scale = t["shape"] @ t["scale"]
    up = scale * t["pos_y"][:, 20]
    assert np.allclose(scm.distribution("scale", given={"pos_y": 20}), up / up.sum())
    assert np.allclose(scm.distribution("scale", do={"pos_y": 20}), scale)
    # a factor outside the question's component is its marginal; a fixed target is a point mass
    assert np.allclose(scm.distribution("pos_x", given={"scale": 5}), np.full(32, 1 / 32))
    assert np.array_equal(scm.distribution("scale", do={"scale": 3}), np.eye(6)[3])
    gridded = scm.on_grid({"scale": 2})
    with pytest.raises(ScmError, match="probability zero"):
        gridded.distribution("shape", given={"scale": 3})


def test_an_impossible_factual_row_is_explained_factor_by_factor():
    """The refusal of a counterfactual whose source the SCM gives no mass names the factor,
    and the classes it could take: a model trained on a strided grid refused most sources
    of the whole grid saying only "probability zero"."""
    strided = FactorSCM.uniform().on_grid({"orientation": 4, "pos_x": 2})
    row = np.array([0, 5, 3, 8, 7])
    assert not np.isfinite(strided.log_prob(row[None]))[0]
    why = strided.why_impossible(row)
    assert why == "orientation=3 (the SCM gives orientation mass only on 0, 4, 8, ..., 36 (every 4th) of 0..39)"
    assert "pos_x" not in why and "scale" not in why  # pos_x=8 is on its grid
    gridded = causal_scm().on_grid({"scale": 2})  # scale has a parent: named with it
    assert "scale=3 given shape=" in gridded.why_impossible(np.array([1, 3, 0, 0, 0]))


def test_on_grid_gives_off_grid_classes_no_mass():
    scm = causal_scm().on_grid({"scale": 2, "orientation": 4})
    assert (scm.tables["scale"][:, 1::2] == 0).all() and np.allclose(scm.tables["scale"].sum(1), 1)
    assert (scm.tables["orientation"][1::4] == 0).all() and np.allclose(scm.tables["orientation"][::4], 0.1)
    classes = scm.sample(2000, seed=1)
    assert (classes[:, SCALE] % 2 == 0).all() and (classes[:, ORIENT] % 4 == 0).all()
    assert FactorSCM.uniform().on_grid({}).to_dict() == FactorSCM.uniform().to_dict()
    # a render manifest's grid: the generating SCM is uniform over its strided classes
    world = FactorSCM.of_dataset({"generator": "render", "grid": {"strides": {"pos_x": 2}}})
    assert np.allclose(world.distribution("pos_x"), np.where(np.arange(32) % 2 == 0, 1 / 16, 0))
    assert FactorSCM.of_dataset(causal_manifest()).edges == CAUSAL_EDGES


def test_a_strided_model_samples_only_classes_it_was_trained_on(tmp_path):
    """Its factor SCM lives on the dataset's grid: interventions and conditioning never ask
    the decoder for an orientation or a position it never saw (they came out as noise)."""
    manifest = {"generator": "render", "renderer": RENDERER_VERSION, "official_path": None,
                "grid": {"strides": {"orientation": 4, "pos_x": 2, "pos_y": 2}}}
    checkpoint = with_manifest(make_checkpoint(tmp_path / "ckpt"), manifest)
    scm = ImageSCM.from_checkpoint(checkpoint, device="cpu")
    queries = pa.table({"query_id": ["i", "c"], "kind": ["intervene", "condition"],
                        "do_scale": pa.array([5, None], pa.int64()), "num_samples": [200, 200]})
    results, errors = answer_queries(scm, queries, max_samples=200)
    assert errors.num_rows == 0 and results.num_rows == 400
    assert (np.array(results["orientation"]) % 4 == 0).all()
    assert (np.array(results["pos_x"]) % 2 == 0).all() and (np.array(results["pos_y"]) % 2 == 0).all()
    assert len(set(np.array(results["orientation"]).tolist())) == 10  # and every class of the grid


# ----------------------------------------------------------------------------- families

def test_family_rows_ask_both_ways_in_capped_rows():
    families = [parse_family({"target": "shape", "factor": "scale", "value": 5}, "f0"),
                parse_family({"target": "scale", "factor": "shape", "value": "heart"}, "f1")]
    assert families[1].value == SHAPE_NAMES.index("heart")
    table = family_queries(families, samples=150, seed=3, max_samples=64)
    check_schema(table.schema)
    rows = table.to_pylist()
    assert len(rows) == 2 * 2 * 3
    for i, family in enumerate(families):
        for kind in FAMILY_KINDS:
            mine = [r for r in rows if r["query_id"].startswith(f"family{i}-{kind}-")]
            assert [r["num_samples"] for r in mine] == [64, 64, 22]
            column = ("given_" if kind == "condition" else "do_") + family.factor
            assert all(r["kind"] == kind and r[column] == family.value for r in mine)
            assert all(r[c] is None for r in mine for c in r if c.startswith(("given_", "do_")) and c != column)
    assert len({r["seed"] for r in rows}) == len(rows)
    assert family_queries(families, 150, 4, 64)["seed"] != table["seed"]  # the config seed matters


@pytest.mark.parametrize("entry, problem", [
    ({"target": "colour", "factor": "scale", "value": 1}, "target: unknown factor"),
    ({"target": "scale", "factor": "scale", "value": 1}, "factor: must be a factor other than the target"),
    ({"target": "shape", "factor": "scale", "value": 6}, r"value: must be a scale class in \[0, 6\)"),
    ({"target": "scale", "factor": "shape", "value": "circle"}, "or a shape name"),
    ({"target": "scale", True: {"shape": 1}}, "expected {target"),  # YAML 1.1 reads `on:` as True
])
def test_bad_families_name_the_problem(entry, problem):
    with pytest.raises(FamilyError, match=problem):
        parse_family(entry, "families[0]")
    with pytest.raises(ConfigError, match=problem):
        from cvae.config import Config, from_dict

        from_dict(Config, {"pipeline": {"families": [entry]}}, "config").validate()


def test_tv_scores_degenerate_answers_at_chance_and_exact_draws_at_the_floor():
    """Blank answers read back nothing: TV 1. Images drawn at exact samples of the truth: TV
    near the sampling floor. Conditioning answered with interventional draws: TV near the
    distance between the two truths."""
    scm = causal_scm()
    family = parse_family({"target": "shape", "factor": "scale", "value": 5}, "f")
    readout = Readout.of(TRUTH)
    n = 400
    u = np.random.default_rng(0).random((n, 5))
    given = np.tile([[-1, 5, -1, -1, -1]], (n, 1))
    seen = scm.sample_posterior(given, np.full((n, 5), -1), u)
    done = scm.sample_posterior(np.full((n, 5), -1), given, u)
    ids = {kind: [f"family0-{kind}-{r:04d}" for r in range(n)] for kind in FAMILY_KINDS}

    def table(cond_images, do_images):
        tally = FamilyTally([family])
        for kind, images, classes in (("condition", cond_images, seen), ("intervene", do_images, done)):
            assert tally.add(ids[kind], classes, readout.read(images)) == 0
        return {r["kind"]: r for r in tv_table(tally, scm)}

    blank = np.zeros((n, 64, 64), np.uint8)
    rows = table(blank, blank)
    assert rows["condition"]["tv_images"] == 1.0 and rows["condition"]["read_nothing"] == 1.0
    assert rows["condition"]["tv_classes"] <= 0.08  # the rows' own classes are right; the images are not

    exact = table(TRUTH.images(classes_to_index(seen)), TRUTH.images(classes_to_index(done)))
    truth = scm.distribution("shape", given={"scale": 5})
    assert exact["condition"]["truth"] == pytest.approx(truth, abs=1e-4)
    for kind in FAMILY_KINDS:
        assert exact[kind]["tv_images"] <= 3 * exact[kind]["tv_noise"] + 0.01
        assert exact[kind]["read_nothing"] == 0.0
    apart = exact["condition"]["tv_condition_vs_intervene"]
    assert apart == pytest.approx(tv(truth, scm.tables["shape"]), abs=1e-4) and apart > 0.2

    swapped = table(TRUTH.images(classes_to_index(done)), TRUTH.images(classes_to_index(seen)))
    assert swapped["condition"]["tv_images"] > apart - 0.08


def test_conditioning_differs_from_intervening_through_answer_queries():
    scm = ImageSCM(tiny_vae(), causal_scm(), ground_truth=TRUTH, device="cpu")
    family = parse_family({"target": "shape", "factor": "scale", "value": 5}, "f")
    queries = family_queries([family], samples=600, seed=0, max_samples=64)
    results, errors = answer_queries(scm, queries, max_samples=64)
    assert errors.num_rows == 0 and results.num_rows == 2 * 600
    by_kind = {k: np.array(results.filter(pa.compute.equal(results["kind"], k))["shape"]) for k in FAMILY_KINDS}
    seen, done = hist(by_kind["condition"], 3), hist(by_kind["intervene"], 3)
    assert tv(seen, scm.factors.distribution("shape", given={"scale": 5})) < 0.06
    assert tv(done, scm.factors.tables["shape"]) < 0.06
    assert tv(seen, done) > 0.2
    assert (np.array(results["scale"]) == 5).all()  # both fix the asked value


def test_conditioning_differs_from_intervening_through_the_ray_engine(ray_session, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", causal_scm())
    families = [parse_family({"target": "shape", "factor": "pos_y", "value": 28}, "f0"),
                parse_family({"target": "pos_y", "factor": "shape", "value": 2}, "f1")]
    folder = tmp_path / "queries"
    folder.mkdir()
    asked = write_family_queries(families, samples=500, seed=0, max_samples=64, folder=folder)
    assert asked == {"families": 2, "queries": 2 * 2 * 8}
    summary = run_query_job(checkpoint, folder, tmp_path / "answers", actors=2, batch_size=100, max_samples=64)
    assert summary["error_rows"] == 0
    results, _ = read_output(tmp_path / "answers")
    # The engine answers exactly as the pure function does.
    direct, _ = answer_queries(ImageSCM.from_checkpoint(checkpoint, device="cpu"),
                               pq.read_table(folder / "families.parquet"), max_samples=64)
    key = ["query_id", "sample"]
    assert results.sort_by([(k, "ascending") for k in key]).equals(direct.sort_by([(k, "ascending") for k in key]))
    scm = causal_scm()

    def classes(prefix, factor):
        rows = results.filter(pa.compute.starts_with(results["query_id"], prefix))
        return np.array(rows[factor])

    seen, done = hist(classes("family0-condition", "shape"), 3), hist(classes("family0-intervene", "shape"), 3)
    assert tv(seen, scm.distribution("shape", given={"pos_y": 28})) < 0.07
    assert tv(done, scm.tables["shape"]) < 0.07
    assert tv(seen, done) > 0.2
    # Downstream, conditioning and doing agree (no confounding): both move pos_y the same way.
    down = [hist(classes(f"family1-{k}", "pos_y"), 32) for k in FAMILY_KINDS]
    truth = scm.distribution("pos_y", do={"shape": 2})
    assert tv(down[0], truth) < 0.15 and tv(down[1], truth) < 0.15
    # the stale-set guard: no families removes both files
    write_family_queries([], 500, 0, 64, folder)
    assert not (folder / "families.parquet").exists() and not (folder / "_families.json").exists()


# ----------------------------------------------------------------------------- counterfactual truth

def _causal_counterfactuals(tmp_path, model_factors):
    """Counterfactual queries on SCM-sampled sources, answered by answer_queries with a
    checkpoint whose own SCM is `model_factors`; the data manifest says the causal SCM."""
    checkpoint = with_manifest(make_checkpoint(tmp_path / "ckpt", model_factors), causal_manifest())
    sources = classes_to_index(causal_scm().sample(40, seed=7))
    make_queries({"sources": {"indices": sources.tolist()},
                  "interventions": [{"factor": "shape", "values": "random_other"},
                                    {"factor": "scale", "values": "random_other"},
                                    {"factor": "pos_x", "values": "random_other"}]}, tmp_path / "q")
    scm = ImageSCM.from_checkpoint(checkpoint, device="cpu")
    results, errors = answer_queries(scm, pq.read_table(tmp_path / "q"), max_samples=4)
    assert errors.num_rows == 0
    return checkpoint, results


def _write_results(results: pa.Table, folder, images: np.ndarray) -> None:
    from cvae.data.images import encode_pngs

    table = results.set_column(results.schema.get_field_index("image"), "image",
                               pa.array(encode_pngs(images), pa.binary()))
    (folder / "results").mkdir(parents=True)
    (folder / "errors").mkdir()
    pq.write_table(table, folder / "results" / "part-00000.parquet")
    (folder / "_SUCCESS.json").write_text("{}")


def test_descendants_are_scored_against_the_generating_scm(tmp_path):
    checkpoint, results = _causal_counterfactuals(tmp_path, causal_scm())
    world = np.stack([np.array(results[f]) for f in FACTORS], 1)
    factual = np.stack([np.array(results[f"factual_{f}"]) for f in FACTORS], 1)
    moved = (world[:, POS_Y] != factual[:, POS_Y]).mean()
    assert moved > 0.2  # do(shape) and do(scale) move the descendant pos_y

    # Answers drawn at the result rows' own world: the evaluator's world is the same
    # (same noise draw, same tables), so every descendant reads back right.
    _write_results(results, tmp_path / "right", TRUTH.images(classes_to_index(world)))
    report = evaluate(tmp_path / "right", checkpoint, tmp_path / "e1", tmp_path / "q",
                      figures_per_factor=0, reversibility_samples=0, composition_samples=0)
    assert report["world"] == {"edges": [list(e) for e in CAUSAL_EDGES], "classes_agree": 1.0}
    assert report["overall"]["descendants"] == 1.0 and report["overall"]["preservation"] == 1.0
    assert set(report["by_factor"]["scale"]["descendants_by_factor"]) == {"pos_y"}
    assert set(report["by_factor"]["shape"]["descendants_by_factor"]) == {"scale", "pos_y"}
    assert report["by_factor"]["pos_x"]["descendants"] is None  # pos_x has no descendants
    assert "descendants" in (tmp_path / "e1" / "report.md").read_text()

    # Answers that apply the do and leave the descendants at their factual values: the
    # descendants fail where the true world moved them, and nothing else does.
    do = _do_of(tmp_path / "q", results)
    naive = np.where(do >= 0, do, factual)
    _write_results(results, tmp_path / "naive", TRUTH.images(classes_to_index(naive)))
    report = evaluate(tmp_path / "naive", checkpoint, tmp_path / "e2", tmp_path / "q",
                      figures_per_factor=0, reversibility_samples=0, composition_samples=0)
    assert report["overall"]["effectiveness"] == 1.0 and report["overall"]["preservation"] == 1.0
    assert report["overall"]["descendants"] < 0.8


def test_a_model_with_the_wrong_world_disagrees_with_the_truth(tmp_path):
    """A checkpoint whose SCM says the factors are independent, on data from the causal SCM:
    its rows keep the descendants; the evaluator's world moves them."""
    checkpoint, results = _causal_counterfactuals(tmp_path, FactorSCM.uniform())
    world = np.stack([np.array(results[f]) for f in FACTORS], 1)
    _write_results(results, tmp_path / "res", TRUTH.images(classes_to_index(world)))
    report = evaluate(tmp_path / "res", checkpoint, tmp_path / "e", tmp_path / "q",
                      figures_per_factor=0, reversibility_samples=0, composition_samples=0)
    assert report["world"]["classes_agree"] < 0.9
    assert report["overall"]["descendants"] < 0.8


def _do_of(queries, results: pa.Table) -> np.ndarray:
    table = pq.read_table(queries)
    do = {q: [r[f"do_{f}"] if r[f"do_{f}"] is not None else -1 for f in FACTORS]
          for q, r in zip(table["query_id"].to_pylist(), table.to_pylist())}
    return np.array([do[q] for q in results["query_id"].to_pylist()])


# ----------------------------------------------------------------------------- end to end

def test_the_shipped_causal_config_is_valid_and_its_families_differ():
    config = load_config("configs/causal.yaml")
    world = FactorSCM.from_config(config.scm)
    assert len(world.edges) >= 3 and config.data.generator == "scm"
    apart = []
    for i, entry in enumerate(config.pipeline.families):
        f = parse_family(entry, f"families[{i}]")
        apart.append(tv(world.distribution(f.target, given={f.factor: f.value}),
                        world.distribution(f.target, do={f.factor: f.value})))
    assert min(apart) < 1e-9 and max(apart) > 0.3  # one where they agree, others far apart


def test_the_causal_pipeline_reports_the_tv_table(ray_session, tmp_path):
    config = load_config("configs/tiny.yaml", {
        "data.generator": "scm", "data.scm_samples": 2000, "data.strides": {}, "data.holdout": [],
        "scm.edges": [list(e) for e in CAUSAL_EDGES], "scm.tables": "given",
        "scm.given": {f: t.tolist() for f, t in causal_tables().items()},
        "train.epochs": 1, "pipeline.num_queries": 30, "pipeline.family_samples": 96,
        "pipeline.families": [{"target": "shape", "factor": "scale", "value": 5}]})
    from cvae.pipeline import run_pipeline

    summary = run_pipeline(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    rows = {r["kind"]: r for r in report["families"]}
    assert summary["families"] == report["families"] and set(rows) == set(FAMILY_KINDS)
    assert all(r["samples"] == 96 and r["tv_images"] is not None for r in rows.values())
    assert rows["condition"]["tv_classes"] < 0.2 and rows["intervene"]["tv_classes"] < 0.2
    assert rows["condition"]["tv_condition_vs_intervene"] == pytest.approx(
        tv(causal_scm().distribution("shape", given={"scale": 5}), causal_scm().tables["shape"]), abs=1e-4)
    assert (tmp_path / "run" / "eval" / "figures" / "families.png").is_file()
    assert "Conditioning versus intervening" in (tmp_path / "run" / "eval" / "report.md").read_text()
    assert any("families" in line for line in summary["headline"])
    # the counterfactual rows are scored in the causal world
    assert report["world"]["classes_agree"] == 1.0 and report["overall"]["descendants"] is not None
    answers, _ = read_output(tmp_path / "run" / "answers")
    images = answers.filter(pa.compute.starts_with(answers["query_id"], "family"))
    assert images.num_rows == 2 * 96 and decode_image(images["image"][0].as_py()).shape == (64, 64)
