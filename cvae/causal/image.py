"""The image half of the structural causal model, and the three query kinds on the whole.

Exogenous noise: `U_z ~ N(0, I)` and `U_x ~ Uniform` per pixel. Mechanisms: `z = U_z`,
`x_i = 1[U_x,i < p_i]` with `p = sigmoid(decoder(z, factors))`. `ImageSCM` joins a
`FactorSCM` (cvae.model.factors) to a trained VAE as one batched Pyro model
(`ImageSCM.model`) and answers the three query kinds with `poutine.condition` and
`poutine.do` on it; a counterfactual is the three steps of Pearl's recipe: abduction of
every noise from the factual row, the action on the factor model, prediction.

Randomness: every random number is a counter-based hash of (row key, stream, counter),
where the row key mixes the query's seed and the sample number (`cvae.rng.row_keys`). So a
result depends only on its query row and the checkpoint: never on batch size, actors or order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import constraints

from cvae.data.grid import FACTOR_SIZES, FACTORS, IMAGE_SIZE, ModelGrid
from cvae.data.groundtruth import GroundTruth
from cvae.malloc import keep_freed_memory
from cvae.model.checkpoint import checkpoint_scm, load_checkpoint, model_grid
from cvae.model.factors import FactorSCM, ScmError
from cvae.rng import STREAM_PIXELS, STREAM_POSTERIOR, STREAM_Z, uniforms

NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
# Networks run on fixed-size, zero-padded chunks: a matrix product's rounding can depend on
# the number of rows, and results must not depend on how rows are batched.
NET_CHUNK = 256


@dataclass
class Noise:
    """The exogenous noise of m rows after abduction: a Gumbel vector per factor (used by
    counterfactual rows), the posterior factors of the other rows, U_z (m, z) and U_x (m, 4096)."""

    gumbel: dict[str, np.ndarray]
    known: np.ndarray
    u_z: torch.Tensor
    u_x: torch.Tensor
    drawn: Drawn | None = None


@dataclass
class Drawn:
    """Canvases of the factual pass (m, ...) and the classes (m, 5) they were drawn at, -1 in
    rows not drawn. For a decoder that draws a canvas from (z, some factors) and then places
    it (cvae.model.networks), the prediction reuses a row's canvas when the action leaves
    those factors unchanged: same z, same inputs, so the same numbers without redrawing."""

    canvas: torch.Tensor
    classes: np.ndarray


@dataclass
class Answer:
    """Per sample row: the generated world's classes (m, 5) and binary images (m, 64, 64)."""

    classes: np.ndarray
    images: np.ndarray


class ImageSCM:
    """FactorSCM + the VAE decoder (mechanism of x) and encoder (abduction of z)."""

    def __init__(self, vae, factors: FactorSCM, abduct_z: str = "mean", ground_truth=None,
                 device: str | torch.device | None = None, grid: ModelGrid | None = None):
        if abduct_z not in ("mean", "sample"):
            raise ScmError(f"abduct_z must be 'mean' or 'sample', got {abduct_z!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae = vae.to(self.device).eval()
        self.factors = factors
        self.abduct_z = abduct_z
        self.z_dim = vae.z_dim
        self.ground_truth = ground_truth
        # The classes the model answers (its checkpoint's declaration): queries naming any
        # other are refused (cvae.serve.queries), and the factor SCM draws only these.
        self.grid = grid or ModelGrid.whole()
        self.factors = factors.on_classes(self.grid.classes)
        keep_freed_memory()  # the answer path's big float64 temporaries (cvae.malloc)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None) -> ImageSCM:
        """Load the VAE and the SCM recorded in the checkpoint's meta ("scm", "config", "manifest")."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae, meta = load_checkpoint(directory, device=dev)
        factors = checkpoint_scm(meta)
        abduct_z = (meta.get("config") or {}).get("scm", {}).get("abduct_z", "mean")
        ground_truth = None
        if meta.get("manifest"):
            ground_truth = GroundTruth.from_manifest(meta["manifest"])
        return cls(vae, factors, abduct_z=abduct_z, ground_truth=ground_truth, device=dev,
                   grid=model_grid(meta))

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

    def pixel_probs(self, z: torch.Tensor, classes: torch.Tensor, drawn: Drawn | None = None) -> torch.Tensor:
        """p = sigmoid(decoder(z, classes)) in float64, (m, 4096); `drawn` canvases reused where they fit."""
        return self._decode(z, classes, drawn)[0]

    def _decode(self, z: torch.Tensor, classes: torch.Tensor,
                drawn: Drawn | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """p in float64 and the canvases it was placed from (None for decoders without one).
        With `drawn`, only the rows whose canvas factors differ from its classes are drawn
        again (its canvas tensor is updated in place)."""
        z, classes = z.to(self.device), classes.to(self.device)
        factors = self.vae.canvas_factors
        if factors is None:
            (logits,) = self._net(self.vae.decode, z, classes)
            return logits.double().sigmoid_(), None
        if drawn is None:
            (canvas,) = self._net(self.vae.draw, z, classes)
        else:
            canvas, columns = drawn.canvas, [FACTORS.index(f) for f in factors]
            changed = (drawn.classes[:, columns] != classes.cpu().numpy()[:, columns]).any(axis=1)
            redraw = torch.as_tensor(np.flatnonzero(changed), device=self.device)
            if len(redraw):
                (canvas[redraw],) = self._net(self.vae.draw, z[redraw], classes[redraw])
        (logits,) = self._net(self.vae.place, canvas, classes)
        return logits.double().sigmoid_(), canvas

    # ----------------------------------------------------------------- the Pyro model

    def factor_model(self, n: int) -> torch.Tensor:
        """Exogenous Gumbels U_<f> and the factor sites, in topological order; (n, 5) classes."""
        with pyro.plate("rows", n):
            return self._factors(n)

    def _factors(self, n: int) -> torch.Tensor:
        classes = torch.zeros(n, len(FACTORS), dtype=torch.long)
        for f in self.factors.order:
            i = FACTORS.index(f)
            g = pyro.sample(f"U_{f}", StandardGumbel((n,), FACTOR_SIZES[f]))
            value = self.factors.mechanism(f, classes.numpy(), g.numpy())
            classes[:, i] = pyro.sample(f, dist.Delta(torch.as_tensor(value, dtype=torch.long), validate_args=False))
        return classes

    def image_model(self, classes: torch.Tensor, drawn: Drawn | None = None) -> torch.Tensor:
        """U_z ~ N(0, I), z = U_z; U_x ~ Uniform per pixel, x = 1[U_x < p]; (m, 4096) uint8.
        `drawn`: canvases already drawn at these z (see `Drawn`), a saving only."""
        with pyro.plate("rows", len(classes)):
            return self._pixels(classes, drawn)

    def _pixels(self, classes: torch.Tensor, drawn: Drawn | None = None) -> torch.Tensor:
        u_z = pyro.sample("U_z", dist.Normal(torch.zeros(self.z_dim), 1.0, validate_args=False).to_event(1))
        z = pyro.deterministic("z", u_z, event_dim=1)
        p = self.pixel_probs(z, classes, drawn).cpu()
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
        row keys. Rows must be valid (see cvae.serve.queries). Pearl's three steps, for every
        kind at once: `abduct` the exogenous noise, `act` on the factor model, `predict` pixels.
        """
        is_cf = kinds == "counterfactual"
        noise = self.abduct(is_cf, given, do, factual, factual_images, keys)
        classes = self.act(noise, do, is_cf)
        x = self.predict(classes, noise.u_z, noise.u_x, noise.drawn)
        return Answer(classes.numpy(), x.numpy().reshape(len(kinds), IMAGE_SIZE, IMAGE_SIZE))

    def abduct(self, is_cf: np.ndarray, given: np.ndarray, do: np.ndarray, factual: np.ndarray,
               factual_images: np.ndarray, keys: np.ndarray) -> Noise:
        """The exogenous noise of every row: for a counterfactual, its posterior given the
        factual row (the Gumbels exactly, z from q(z | x, y), U_x given the pixels); for
        conditioning and intervening, the prior's, with the non-intervened factors drawn from
        the exact (mutilated) posterior given the evidence."""
        m = len(is_cf)
        # All rows of one kind (the usual bulk case): slices instead of gathers and scatters.
        cf = slice(None) if is_cf.all() else np.flatnonzero(is_cf)
        fwd = np.flatnonzero(~is_cf)
        known = np.zeros((m, len(FACTORS)), dtype=np.int64)
        if len(fwd):
            u = uniforms(keys[fwd], STREAM_POSTERIOR, len(FACTORS))
            known[fwd] = self.factors.sample_posterior(given[fwd], do[fwd], u)
        u_z = torch.as_tensor(_normals(uniforms(keys, STREAM_Z, self.z_dim)), dtype=torch.float32)
        u_x = torch.as_tensor(uniforms(keys, STREAM_PIXELS, NUM_PIXELS))
        gumbel = {f: np.zeros((m, FACTOR_SIZES[f])) for f in FACTORS}
        drawn = None
        if is_cf.any():
            for f, g in self.factors.abduct_gumbels(factual[cf], keys[cf]).items():
                gumbel[f][cf] = g
            images = torch.as_tensor(factual_images[cf])
            y = torch.as_tensor(factual[cf])
            z = self._abduct_z(images.float(), y, u_z[cf])
            u_z[cf] = z
            p, canvas = self._decode(z, y)
            p = p.cpu()
            if canvas is not None and isinstance(cf, slice):  # kept for the prediction (`Drawn`)
                drawn = Drawn(canvas, factual.copy())
            elif canvas is not None:
                drawn = Drawn(canvas.new_zeros((m,) + canvas.shape[1:]), np.full((m, len(FACTORS)), -1))
                drawn.canvas[torch.as_tensor(cf, device=canvas.device)] = canvas
                drawn.classes[cf] = factual[cf]
            v = u_x[cf]
            # x = 1 -> U = p v in (0, p); x = 0 -> U = p + (1 - p) v in [p, 1): the same p gives back
            # x exactly (p v < p in float64 for every v the generator makes, as v <= 1 - 2^-33,
            # and p > 0). Computed in place: these are (m, 4096) float64 arrays.
            below = p * v
            above = (1 - p).mul_(v).add_(p)
            u_x[cf] = torch.where(images > 0, below, above, out=above)
        return Noise(gumbel, known, u_z, u_x, drawn)

    def act(self, noise: Noise, do: np.ndarray, is_cf: np.ndarray) -> torch.Tensor:
        """The factors under the action: one run of the factor model per intervention pattern
        (Pyro's do fixes a site for every row of a run), counterfactual rows driven by their
        abducted Gumbels, the others by their posterior factors; (m, 5) classes."""
        classes = torch.zeros(len(do), len(FACTORS), dtype=torch.long)
        patterns, inverse = np.unique(np.concatenate([do >= 0, is_cf[:, None]], axis=1), axis=0,
                                      return_inverse=True)
        for p, pattern in enumerate(patterns):
            rows = np.flatnonzero(inverse.reshape(-1) == p)
            intervened, counterfactual = pattern[:5], pattern[5]
            if counterfactual:
                data = {f"U_{f}": torch.as_tensor(noise.gumbel[f][rows]) for f in FACTORS}
            else:
                data = {f: torch.as_tensor(noise.known[rows, i]) for i, f in enumerate(FACTORS) if not intervened[i]}
            actions = {f: torch.as_tensor(do[rows, i]) for i, f in enumerate(FACTORS) if intervened[i]}
            run = poutine.do(poutine.condition(self.factor_model, data=data), data=actions)
            trace = poutine.trace(run).get_trace(len(rows))
            classes[rows] = trace.nodes["_RETURN"]["value"]
        return classes

    def predict(self, classes: torch.Tensor, u_z: torch.Tensor, u_x: torch.Tensor,
                drawn: Drawn | None = None) -> torch.Tensor:
        """The pixels: one run of the image model over all rows, its noise conditioned; (m, 4096) uint8."""
        run = poutine.condition(self.image_model, data={"U_z": u_z, "U_x": u_x})
        return run(classes, drawn)

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


class StandardGumbel(dist.TorchDistribution):
    """Gumbel(0, 1) noise, k of them per row (event shape (k,)), in float64: the prior of a
    factor's exogenous U_f. torch's Gumbel is a uniform under four transforms, and building
    one per site (with the plate's expansion) took 40 times as long as tracing the site
    with this one; the density is the same (tests/test_scm.py)."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(self, batch_shape: tuple | torch.Size, k: int):
        super().__init__(torch.Size(batch_shape), torch.Size([k]), validate_args=False)

    def expand(self, batch_shape, _instance=None) -> StandardGumbel:
        return StandardGumbel(batch_shape, self.event_shape[0])

    def rsample(self, sample_shape=()) -> torch.Tensor:
        finfo = torch.finfo(torch.float64)
        u = torch.rand(self._extended_shape(torch.Size(sample_shape)), dtype=torch.float64)
        u.clamp_(finfo.tiny, 1 - finfo.eps)
        return -(-u.log()).log()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return -(value + torch.exp(-value)).sum(-1)


def _normals(u: np.ndarray) -> np.ndarray:
    """Standard normals by inverse CDF of (0, 1) uniforms."""
    return torch.special.ndtri(torch.as_tensor(u)).numpy()
