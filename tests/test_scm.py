"""The SCM: randomness, tables, exact abduction and posteriors, and the query guarantees."""
import numpy as np
import pyarrow as pa
import pyro
import pytest
import torch
from pyro import poutine

from cvae.causal.image import ImageSCM, StandardGumbel
from cvae.config import ScmConfig
from cvae.data.grid import FACTORS, classes_to_index, grid_indices, index_to_classes
from cvae.data.groundtruth import GroundTruth
from cvae.model.factors import FactorSCM, ScmError
from cvae.rng import row_keys, uniforms
from cvae.serve.queries import answer_queries
from scm_fixtures import CAUSAL_EDGES, causal_scm, causal_tables, tiny_vae

SHAPE, SCALE, ORIENT, POS_X, POS_Y = range(5)


def tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


def hist(values, k):
    return np.bincount(values, minlength=k) / len(values)


@pytest.fixture(scope="module")
def default_scm():
    return ImageSCM(tiny_vae(), FactorSCM.uniform(), ground_truth=GroundTruth("render"), device="cpu")


@pytest.fixture(scope="module")
def causal_image_scm():
    return ImageSCM(tiny_vae(), causal_scm(), ground_truth=GroundTruth("render"), device="cpu")


def test_uniforms_are_keyed_open_and_stream_separated():
    keys = row_keys(np.array([1, 1, 2, -5]), np.array([0, 1, 0, 0]))
    assert len(set(keys.tolist())) == 4
    u = uniforms(keys, 3, 1000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    assert np.array_equal(u[1:2], uniforms(keys[1:2], 3, 1000))  # a row alone: same numbers
    assert not np.allclose(u, uniforms(keys, 4, 1000))


def test_tables_round_trip_and_bad_specs():
    scm = causal_scm()
    again = FactorSCM.from_dict(scm.to_dict())
    assert again.edges == scm.edges and all(np.allclose(again.tables[f], scm.tables[f]) for f in FACTORS)
    assert scm.order.index("shape") < scm.order.index("scale") < scm.order.index("pos_y")
    with pytest.raises(ScmError, match="cycle"):
        FactorSCM([("shape", "scale"), ("scale", "shape")], {})
    with pytest.raises(ScmError, match="table for 'scale'.*shape"):
        FactorSCM(CAUSAL_EDGES, {**causal_tables(), "scale": np.full((6,), 1 / 6)})
    with pytest.raises(ScmError, match="missing"):
        FactorSCM(CAUSAL_EDGES, {"shape": np.full(3, 1 / 3)})
    with pytest.raises(ScmError, match="sum to 1"):
        FactorSCM([], {"shape": [0.5, 0.5, 0.5]})
    cfg = ScmConfig(edges=[list(e) for e in CAUSAL_EDGES], tables="given",
                    given={f: t.tolist() for f, t in causal_tables().items()})
    assert np.allclose(FactorSCM.from_config(cfg).tables["pos_y"], causal_tables()["pos_y"])


def test_fit_counts_with_smoothing():
    classes = index_to_classes(grid_indices({"orientation": 8, "pos_x": 4, "pos_y": 4}), with_color=False)
    classes = classes[classes[:, SHAPE] != 2]  # no hearts
    scm = FactorSCM.fit([("shape", "scale")], classes, smoothing=1.0)
    counts = np.bincount(classes[:, SHAPE], minlength=3) + 1.0
    assert np.allclose(scm.tables["shape"], counts / counts.sum())
    assert np.allclose(scm.tables["scale"][2], 1 / 6)  # unseen parent: smoothing only


def test_sample_follows_the_tables():
    scm = causal_scm()
    classes = scm.sample(20000, seed=1)
    assert np.array_equal(classes, scm.sample(20000, seed=1))
    for s in range(3):
        rows = classes[classes[:, SHAPE] == s]
        assert tv(hist(rows[:, SCALE], 6), scm.tables["scale"][s]) < 0.04


@pytest.mark.parametrize("scm", [FactorSCM.uniform(), causal_scm()], ids=["default", "causal"])
def test_abducted_gumbels_reproduce_the_observation(scm):
    observed = scm.sample(3000, seed=2)
    keys = row_keys(np.arange(3000), np.zeros(3000))
    assert np.array_equal(scm.forward(scm.abduct_gumbels(observed, keys)), observed)


def test_counterfactual_distribution_matches_rejection_sampling():
    """p(scale' | shape=0, scale=1 observed, do(shape=1)): top-down abduction vs the definition
    (prior noise kept only where it reproduces the observation)."""
    scm = causal_scm()
    n = 20000
    observed = np.tile([[0, 1, 0, 0, 0]], (n, 1))
    noise = scm.abduct_gumbels(observed, row_keys(np.arange(n), np.zeros(n)))
    do = np.tile([[1, -1, -1, -1, -1]], (n, 1))
    abducted = scm.forward(noise, do)[:, SCALE]
    # Rejection: only shape's and scale's noise matter for scale.
    rng = np.random.default_rng(0)
    m = 600000
    g_shape, g_scale = rng.gumbel(size=(m, 3)), rng.gumbel(size=(m, 6))
    shape = np.argmax(np.log(scm.tables["shape"]) + g_shape, axis=1)
    scale = np.argmax(scm.log_tables["scale"][shape] + g_scale, axis=1)
    keep = (shape == 0) & (scale == 1)
    rejected = np.argmax(scm.log_tables["scale"][np.full(keep.sum(), 1)] + g_scale[keep], axis=1)
    assert keep.sum() > 5000
    assert tv(hist(abducted, 6), hist(rejected, 6)) < 0.03
    # The counterfactual is not the interventional distribution: the noise carries over.
    assert tv(hist(abducted, 6), scm.tables["scale"][1]) > 0.05


def test_posterior_by_enumeration_matches_bayes():
    scm = causal_scm()
    n = 20000
    given = np.tile([[-1, -1, -1, -1, 20]], (n, 1))
    none = np.full((n, 5), -1)
    u = uniforms(row_keys(np.arange(n), np.zeros(n)), 1, 5)
    classes = scm.sample_posterior(given, none, u)
    assert (classes[:, POS_Y] == 20).all()
    joint = scm.tables["shape"][:, None] * scm.tables["scale"] * scm.tables["pos_y"][None, :, 20]
    assert tv(hist(classes[:, SHAPE], 3), joint.sum(1) / joint.sum()) < 0.03
    assert tv(hist(classes[:, SCALE], 6), joint.sum(0) / joint.sum()) < 0.03
    assert tv(hist(classes[:, ORIENT], 40), np.full(40, 1 / 40)) < 0.05


def test_conditioning_and_intervening_differ_as_the_graph_says():
    scm = causal_scm()
    n = 20000
    u = uniforms(row_keys(np.arange(n), np.zeros(n)), 1, 5)
    none = np.full((n, 5), -1)
    scale5 = np.tile([[-1, 5, -1, -1, -1]], (n, 1))
    seen = scm.sample_posterior(scale5, none, u)  # condition: evidence flows up to shape
    done = scm.sample_posterior(none, scale5, u)  # do: the ancestor keeps its prior
    posterior = scm.tables["shape"] * scm.tables["scale"][:, 5]
    assert tv(hist(seen[:, SHAPE], 3), posterior / posterior.sum()) < 0.03
    assert tv(hist(done[:, SHAPE], 3), scm.tables["shape"]) < 0.03
    assert tv(hist(seen[:, SHAPE], 3), hist(done[:, SHAPE], 3)) > 0.2
    # ... and both move the descendant pos_y the same way.
    assert tv(hist(done[:, POS_Y], 32), scm.tables["pos_y"][5]) < 0.05
    # do(shape) moves its descendant scale.
    shape2 = scm.sample_posterior(none, np.tile([[2, -1, -1, -1, -1]], (n, 1)), u)
    assert tv(hist(shape2[:, SCALE], 6), scm.tables["scale"][2]) < 0.03
    assert not scm.evidence_possible(np.array([[-1, 3, -1, -1, -1]]), np.array([[-1, 2, -1, -1, -1]]))[0]


def test_the_pyro_model_has_the_exogenous_and_endogenous_sites(default_scm):
    trace = poutine.trace(default_scm.model).get_trace(3)
    for name in [f"U_{f}" for f in FACTORS] + list(FACTORS) + ["U_z", "z", "U_x", "x"]:
        assert name in trace.nodes, name
    assert trace.nodes["x"]["value"].shape == (3, 4096)
    classes = poutine.do(default_scm.factor_model, data={"shape": torch.full((50,), 2)})(50)
    assert (classes[:, SHAPE] == 2).all() and len(set(classes[:, SCALE].tolist())) > 1


def test_the_factor_noise_prior_is_the_standard_gumbel():
    """StandardGumbel, the U_f sites' prior, against torch's Gumbel(0, 1): density, samples,
    and its expansion by a plate."""
    value = torch.linspace(-3, 8, 12, dtype=torch.float64).reshape(3, 4)
    want = torch.distributions.Gumbel(torch.zeros(3, 4, dtype=torch.float64), 1.0).log_prob(value).sum(-1)
    assert torch.allclose(StandardGumbel((3,), 4).log_prob(value), want, rtol=0, atol=1e-12)
    torch.manual_seed(0)
    draws = StandardGumbel((100_000,), 2).sample()
    assert draws.shape == (100_000, 2) and draws.dtype == torch.float64
    assert abs(draws.mean().item() - 0.5772) < 0.02 and abs(draws.var().item() - np.pi**2 / 6) < 0.05
    assert StandardGumbel((1,), 6).expand((5,)).sample().shape == (5, 6)
    with pyro.plate("rows", 7):
        site = poutine.trace(lambda: pyro.sample("U", StandardGumbel((), 3))).get_trace()
    assert site.nodes["U"]["value"].shape == (7, 3)


def counterfactuals(scm, sources, do: dict, **extra):
    n = len(sources)
    columns = {"query_id": [f"q{i}" for i in range(n)], "kind": ["counterfactual"] * n,
               "source_index": pa.array(sources, pa.int64())}
    columns.update({f"do_{f}": pa.array(v, pa.int64()) for f, v in do.items()})
    columns.update(extra)
    results, errors = answer_queries(scm, pa.table(columns))
    assert errors.num_rows == 0, errors.to_pylist()
    return results


def test_counterfactual_with_the_observed_value_returns_the_factual_image_exactly(default_scm):
    rng = np.random.default_rng(3)
    sources = rng.integers(0, 737280, 40)
    observed = index_to_classes(sources, with_color=False)
    for j, f in enumerate(FACTORS):
        results = counterfactuals(default_scm, sources, {f: observed[:, j]})
        truth = GroundTruth("render").images(sources)
        from cvae.data.images import decode_image
        got = np.stack([decode_image(b) for b in results.column("image").to_pylist()])
        assert np.array_equal(got, truth), f
        assert np.array_equal(np.stack([results.column(g).to_numpy() for g in FACTORS], 1), observed)


def test_default_counterfactual_changes_only_the_intervened_factor(default_scm):
    sources = np.arange(0, 737280, 9973)
    observed = index_to_classes(sources, with_color=False)
    for j, f in enumerate(FACTORS):
        new = (observed[:, j] + 1) % [3, 6, 40, 32, 32][j]
        results = counterfactuals(default_scm, sources, {f: new})
        world = np.stack([results.column(g).to_numpy() for g in FACTORS], 1)
        expected = observed.copy()
        expected[:, j] = new
        assert np.array_equal(world, expected)
        factual = np.stack([results.column(f"factual_{g}").to_numpy() for g in FACTORS], 1)
        assert np.array_equal(factual, observed)


def test_causal_counterfactual_moves_descendants_not_ancestors(causal_image_scm):
    scm = causal_image_scm.factors
    observed = scm.sample(300, seed=5)
    sources = np.array([int(i) for i in (observed @ np.array([6 * 40 * 32 * 32, 40 * 32 * 32, 32 * 32, 32, 1]))])
    results = counterfactuals(causal_image_scm, sources, {"scale": np.full(300, 5)})
    world = np.stack([results.column(g).to_numpy() for g in FACTORS], 1)
    assert np.array_equal(world[:, SHAPE], observed[:, SHAPE])  # ancestor untouched
    assert (world[:, SCALE] == 5).all()
    assert (world[:, POS_Y] != observed[:, POS_Y]).mean() > 0.5  # descendant responds
    assert np.array_equal(world[:, [ORIENT, POS_X]], observed[:, [ORIENT, POS_X]])


def test_answers_do_not_depend_on_batching(causal_image_scm):
    rng = np.random.default_rng(4)
    n = 30
    table = pa.table({
        "query_id": [f"id{i}" for i in range(n)],
        "kind": rng.choice(["condition", "intervene", "counterfactual"], n).tolist(),
        "num_samples": rng.integers(1, 4, n).tolist(),
    })
    kinds = table.column("kind").to_pylist()
    table = table.append_column("source_index", pa.array(
        [int(rng.integers(0, 737280)) if k == "counterfactual" else None for k in kinds], pa.int64()))
    table = table.append_column("do_scale", pa.array(
        [int(rng.integers(0, 6)) if k != "condition" else None for k in kinds], pa.int64()))
    table = table.append_column("given_pos_y", pa.array(
        [int(rng.integers(0, 32)) if k != "counterfactual" else None for k in kinds], pa.int64()))
    whole, errors = answer_queries(causal_image_scm, table, max_samples=8)
    assert errors.num_rows == 0, errors.to_pylist()
    parts = [answer_queries(causal_image_scm, table.slice(i, 7), max_samples=8)[0] for i in range(0, n, 7)]
    reversed_parts = [answer_queries(causal_image_scm, table.take(list(range(n))[::-1]), max_samples=8)[0]]
    key = [("query_id", "ascending"), ("sample", "ascending")]
    assert pa.concat_tables(parts).sort_by(key).equals(whole.sort_by(key))
    assert reversed_parts[0].sort_by(key).equals(whole.sort_by(key))


@pytest.mark.parametrize("arch", ["warp", "sprite"])
def test_prediction_reuses_the_factual_canvas_only_where_it_is_the_same(arch):
    """Decoders that draw a canvas and then place it: the counterfactual pass draws again
    only rows whose canvas factors the action changes, and the answers equal those of
    drawing every row again (bitwise: same z, same inputs)."""
    from cvae.model.networks import SupervisedVAE

    torch.manual_seed(0)
    vae = SupervisedVAE(arch, z_dim=4, channels=8).eval()
    scm = ImageSCM(vae, FactorSCM.uniform(), ground_truth=GroundTruth("render"), device="cpu")
    rng = np.random.default_rng(5)
    m = 40
    factual = index_to_classes(rng.integers(0, 737280, m), with_color=False)
    do = np.full((m, 5), -1)
    for i, j in enumerate(rng.integers(0, 5, m)):
        do[i, j] = rng.integers(0, [3, 6, 40, 32, 32][j])
    is_cf = np.ones(m, dtype=bool)
    keys = row_keys(np.arange(m, dtype=np.uint64), np.zeros(m, dtype=np.int64))
    images = GroundTruth("render").images(classes_to_index(factual)).reshape(m, -1)
    noise = scm.abduct(is_cf, np.full((m, 5), -1), do, factual, images, keys)
    classes = scm.act(noise, do, is_cf)
    drawn_rows = []
    draw = vae.draw
    vae.draw = lambda z, y: (drawn_rows.append(int((y.abs().sum(1) > 0).sum())), draw(z, y))[1]
    reused = scm.predict(classes, noise.u_z, noise.u_x, noise.drawn)
    vae.draw = draw
    fresh = scm.predict(classes, noise.u_z, noise.u_x)
    assert torch.equal(reused, fresh)
    columns = [FACTORS.index(f) for f in vae.canvas_factors]
    changed = (classes.numpy()[:, columns] != factual[:, columns]).any(axis=1)
    assert 0 < changed.sum() < m
    assert sum(drawn_rows) <= changed.sum()  # zero-padded chunk rows have y = 0 and are not counted
    assert scm.answer(np.array(["counterfactual"] * m), np.full((m, 5), -1), do, factual, images,
                      keys).images.reshape(m, -1).tolist() == fresh.numpy().tolist()
