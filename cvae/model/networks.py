"""The supervised VAE: p(x | y, z) p(z) with Bernoulli pixels, guide q(z | x, y).

Images are flat float tensors (B, 4096) of 0/1; the factor classes y are (B, 5)
int64 and enter the networks as concatenated one-hot codes (3+6+40+32+32 = 113).
`forward` returns the negative ELBO summed over the batch, so wrapping the module in
DistributedDataParallel averages the ELBO's gradients across Ray Train workers.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from torch.nn import functional as F

from cvae.data.grid import FACTOR_SIZES, FACTORS, IMAGE_SIZE

NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
LABEL_DIM = sum(FACTOR_SIZES.values())  # 113


def one_hot(classes: torch.Tensor) -> torch.Tensor:
    """(B, 5) factor classes to the (B, 113) concatenated one-hot code."""
    return torch.cat(
        [F.one_hot(classes[:, i], FACTOR_SIZES[f]) for i, f in enumerate(FACTORS)], dim=1
    ).float()


def channels_last(h: torch.Tensor) -> torch.Tensor:
    """Feature maps in NHWC order. With the conv weights in it too (SupervisedVAE), the
    conv models answer queries 1.25x (one thread) to 1.4x (two) faster on CPU than in NCHW,
    and train slightly faster; the values are the same."""
    return h.contiguous(memory_format=torch.channels_last)


def relu() -> nn.ReLU:
    """In place: overwriting each layer's output instead of allocating another map of the
    same size makes the sprite model's query passes about 1.2x faster on CPU (measured at
    the engine's 256-row chunk); the values are the same, and autograd allows it here."""
    return nn.ReLU(inplace=True)


class MLPEncoder(nn.Module):
    """The original notebook's encoder: 4096+labels -> 1000 -> 1000 -> z, softplus."""

    def __init__(self, z_dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(NUM_PIXELS + LABEL_DIM, hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.Softplus(),
        )
        self.loc = nn.Linear(hidden, z_dim)
        self.scale = nn.Linear(hidden, z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([x, y], dim=1))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


class MLPDecoder(nn.Module):
    """The original notebook's decoder: z+labels -> 1000 -> 1000 -> 1000 -> 4096 logits."""

    def __init__(self, z_dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(z_dim + LABEL_DIM, hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, NUM_PIXELS),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([z, y], dim=1))


class ConvEncoder(nn.Module):
    """Burgess et al. 2018: four 4x4 stride-2 convs of 32 channels (`channels`), then
    256 -> 256 -> z; the labels join the flattened conv features."""

    def __init__(self, z_dim: int, hidden: int = 256, label_dim: int = LABEL_DIM, channels: int = 32):
        super().__init__()
        c = channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), relu(),
            nn.Conv2d(c, c, 4, 2, 1), relu(),
            nn.Conv2d(c, c, 4, 2, 1), relu(),
            nn.Conv2d(c, c, 4, 2, 1), relu(),
        )
        self.fc = nn.Sequential(
            nn.Linear(c * 4 * 4 + label_dim, 256), relu(),
            nn.Linear(256, 256), relu(),
        )
        self.loc = nn.Linear(256, z_dim)
        self.scale = nn.Linear(256, z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.convs(channels_last(x.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE))).flatten(1)
        h = self.fc(torch.cat([h, y], dim=1))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


def burgess_fc(in_dim: int, side: int, channels: int = 32) -> nn.Sequential:
    """The transposed encoder's dense part: in_dim -> 256 -> 256 -> channels x side x side."""
    return nn.Sequential(
        nn.Linear(in_dim, 256), relu(),
        nn.Linear(256, 256), relu(),
        nn.Linear(256, channels * side * side), relu(),
    )


class OneMapTransposedConv(nn.ConvTranspose2d):
    """ConvTranspose2d(channels, 1, 4, 2, 1), the upsamplers' last layer, computed as one
    matrix product (each input pixel's 16 kernel taps) and sixteen strided adds.

    The same function and parameters as the layer it stands for, so checkpoints load
    unchanged; only float32 rounding differs (outputs within 1e-5). Why: PyTorch's oneDNN
    kernel runs this one-output-channel shape at about 14 GFLOP/s on CPU against 150 to 300
    for the 32-channel layers, so it took about a third of the sprite networks' query time;
    this form takes under a third of the kernel's time (docs/scaling.md). Only on the CPU
    without gradients (queries, evaluation): with them, the kernel's forward and backward
    together take half the time of this form's, whose backward is sixteen strided
    gradients. On a GPU the networks are under a tenth of an answer's time (docs/scaling.md),
    and cuDNN's kernel stays.
    """

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 1, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        b, c, h, w = x.shape
        # (b, h, w, kernel row, kernel column); read strided below rather than permuted into a
        # copy first, which took a quarter of the layer's time.
        taps = (x.permute(0, 2, 3, 1).reshape(-1, c) @ self.weight.reshape(c, 16)).view(b, h, w, 4, 4)
        # Input pixel (i, j) adds tap (ky, kx) to output pixel (2i - 1 + ky, 2j - 1 + kx); the
        # sum is built with a one-pixel border all round, which padding 1 then crops.
        out = x.new_zeros(b, 2 * h + 2, 2 * w + 2)
        for ky in range(4):
            for kx in range(4):
                out[:, ky:ky + 2 * h:2, kx:kx + 2 * w:2] += taps[..., ky, kx]
        return (out[:, 1:-1, 1:-1] + self.bias).unsqueeze(1)


def burgess_upsampler(doublings: int, channels: int = 32) -> nn.Sequential:
    """4x4 stride-2 transposed convs of `channels` channels, each doubling the side; one output map."""
    layers: list[nn.Module] = []
    for _ in range(doublings - 1):
        layers += [nn.ConvTranspose2d(channels, channels, 4, 2, 1), relu()]
    return nn.Sequential(*layers, OneMapTransposedConv(channels))


class ConvDecoder(nn.Module):
    """The transpose of ConvEncoder: (z, labels) -> 256 -> 256 -> 32x4x4 -> 64x64 logits."""

    def __init__(self, z_dim: int, hidden: int = 256, channels: int = 32):
        super().__init__()
        self.channels = channels
        self.fc = burgess_fc(z_dim + LABEL_DIM, 4, channels)
        self.deconvs = burgess_upsampler(4, channels)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = channels_last(self.fc(torch.cat([z, y], dim=1)).view(-1, self.channels, 4, 4))
        return self.deconvs(h).flatten(1)


CANVAS = 48  # the sprite canvas: a shape (33x33 at most) with a margin for learning
SHAPE_DIM = FACTOR_SIZES["shape"] + FACTOR_SIZES["scale"] + FACTOR_SIZES["orientation"]  # 49


def translation(num_positions: int) -> torch.Tensor:
    """(num_positions, 64, CANVAS) 0/1 matrices, the position maps' starting guess: at
    position class k, frame row r reads canvas row r - k + CANVAS // 2 - 16, so each class
    step moves the shape one whole pixel and the canvas centre lands on frame pixels 16..47.
    Official dSprites steps 32/31 pixel, so this guess is up to a pixel off and the maps
    are learned from there. Frame rows the canvas does not reach read nothing."""
    frame = torch.arange(IMAGE_SIZE).view(1, -1, 1)
    canvas = torch.arange(CANVAS).view(1, 1, -1)
    k = torch.arange(num_positions).view(-1, 1, 1)
    return (canvas == frame - k + CANVAS // 2 - 16).float()


class SpriteDecoder(nn.Module):
    """Draws the shape from (z, shape, scale, orientation) on a 48x48 canvas with the
    conv decoder's layers, then moves it into the 64x64 frame:
    frame = T_y[posY] (canvas - b) T_x[posX]^T + b, with one linear map T per position
    class and a learned background logit b. Position acts on the canvas as a linear map
    of rows and columns, so the canvas network never has to learn each shape again at
    every position.

    What each position class does is learned from data: the maps are parameters that start
    from a guess of whole-pixel steps (`translation`) and are fitted with the rest of the
    network, so they can learn sub-pixel steps (official dSprites moves 32/31 pixel per
    class) and whatever else the data's positions do. `learn_translation=False` freezes
    them at the guess (the comparison in the README; checkpoints of older versions)."""

    def __init__(self, z_dim: int, hidden: int = 256, learn_translation: bool = True, channels: int = 32):
        super().__init__()
        self.channels = channels
        self.fc = burgess_fc(z_dim + SHAPE_DIM, 6, channels)
        self.deconvs = burgess_upsampler(3, channels)  # 6 -> 48
        self.background = nn.Parameter(torch.tensor(-5.0))
        # Parameters either way (DDP syncs a buffer every step, a frozen parameter once).
        self.move_x = nn.Parameter(translation(FACTOR_SIZES["pos_x"]), learn_translation)
        self.move_y = nn.Parameter(translation(FACTOR_SIZES["pos_y"]), learn_translation)

    CANVAS_FACTORS = ("shape", "scale", "orientation")  # what `draw` reads of the labels

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.place(self.draw(z, y), y)

    def draw(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 48, 48) canvas logits of (z, shape, scale, orientation) in the one-hot code y."""
        h = channels_last(self.fc(torch.cat([z, y[:, :SHAPE_DIM]], dim=1)).view(-1, self.channels, 6, 6))
        return self.deconvs(h).squeeze(1)

    def place(self, canvas: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 48, 48) canvas logits at the positions in the one-hot code y -> (B, 4096)."""
        pos_x = y[:, SHAPE_DIM:SHAPE_DIM + FACTOR_SIZES["pos_x"]].argmax(1)
        pos_y = y[:, SHAPE_DIM + FACTOR_SIZES["pos_x"]:].argmax(1)
        # Each row's maps picked by index: the same values as the product of the one-hot code
        # with all the maps, with which `place` took 1.7x as long at two threads.
        frame = self.move_y[pos_y] @ (canvas - self.background) @ self.move_x[pos_x].transpose(1, 2)
        return frame.flatten(1) + self.background


WARP_CANVAS = 48  # the warp canvas: 48x48 logits spanning 32 frame pixels (1.5 per pixel)
WARP_SPAN = 32  # frame pixels the canvas spans: the largest shape (a turned square, about 29 px) fits
# (WarpDecoder.sampling_grid relies on WARP_SPAN / 2 being a power of two.)
DRAW_DIM = FACTOR_SIZES["shape"] + FACTOR_SIZES["scale"]  # 9: what the canvas network sees
ORIENTATION_STEP = 2 * torch.pi / 39  # radians per class: 40 classes over [0, 2*pi] inclusive


def class_values(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The orientation, pos_x and pos_y classes of a one-hot code y, as float (B,) each."""
    start = DRAW_DIM
    out = []
    for f in ("orientation", "pos_x", "pos_y"):
        out.append(y[:, start:start + FACTOR_SIZES[f]].argmax(1).float())
        start += FACTOR_SIZES[f]
    return out[0], out[1], out[2]


def label_features(y: torch.Tensor) -> torch.Tensor:
    """(B, 113) one-hot code -> (B, 17) features that vary smoothly with the class values:
    shape and scale one-hot, the orientation angle as cos and sin of 1, 2 and 4 times it,
    and the positions in [-1, 1]. An unseen orientation or position is then between seen
    ones, not an untrained code (the warp model's encoder)."""
    orientation, pos_x, pos_y = class_values(y)
    angle = orientation * ORIENTATION_STEP
    harmonics = [f(k * angle) for k in (1, 2, 4) for f in (torch.cos, torch.sin)]
    positions = [pos_x / 15.5 - 1, pos_y / 15.5 - 1]
    return torch.cat([y[:, :DRAW_DIM], torch.stack(harmonics + positions, 1)], dim=1)


class WarpEncoder(ConvEncoder):
    """ConvEncoder whose labels enter as `label_features` instead of one-hot codes."""

    def __init__(self, z_dim: int, hidden: int = 256, channels: int = 32):
        super().__init__(z_dim, hidden, label_dim=DRAW_DIM + 8, channels=channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x, label_features(y))


class WarpDecoder(nn.Module):
    """Draws an upright shape from (z, shape, scale) on a canvas, then turns and moves it
    into the frame with one bilinear resampling (a spatial transformer): frame pixel p
    reads the canvas at R(-angle) (p - centre). Angle and centre are functions of the
    class *values*, angle = angle_step * orientation + angle_offset and
    centre = origin + step * position, so a class the model never saw is drawn by the same
    mechanism as the seen ones; the six numbers start at the renderer's geometry
    (cvae.data.render: counter-clockwise on screen, 2*pi/39 per class; centres at
    15.5 + 32/31 * class) and are learned. The canvas holds logits at 1.5 samples per frame
    pixel, so sub-pixel turns and steps move the drawn edge continuously."""

    def __init__(self, z_dim: int, hidden: int = 256, channels: int = 32):
        super().__init__()
        self.channels = channels
        self.fc = burgess_fc(z_dim + DRAW_DIM, 6, channels)
        self.deconvs = burgess_upsampler(3, channels)  # 6 -> 48
        self.background = nn.Parameter(torch.tensor(-5.0))
        # The geometry, as corrections in units that make one optimiser step small: Adam moves
        # every parameter by about lr a step, and a raw angle step moves class 39 by 39 times that.
        self.geometry = nn.Parameter(torch.zeros(6))  # angle step, angle offset, origin x, y, step x, y

    def angles_and_centres(self, orientation, pos_x, pos_y):
        """The turn (radians) and the centre (column, row in pixels) of each class value."""
        g = self.geometry
        angle = ORIENTATION_STEP * (1 + 1e-3 * g[0]) * orientation + 1e-2 * g[1]
        centre_x = 15.5 + 1e-2 * g[2] + (32 / 31) * (1 + 1e-3 * g[4]) * pos_x
        centre_y = 15.5 + 1e-2 * g[3] + (32 / 31) * (1 + 1e-3 * g[5]) * pos_y
        return angle, centre_x, centre_y

    CANVAS_FACTORS = ("shape", "scale")  # what `draw` reads of the labels

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.place(self.draw(z, y), y)

    def draw(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 48, 48) upright canvas logits of (z, shape, scale) in the one-hot code y."""
        h = channels_last(self.fc(torch.cat([z, y[:, :DRAW_DIM]], dim=1)).view(-1, self.channels, 6, 6))
        return self.deconvs(h).squeeze(1)

    def place(self, canvas: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 48, 48) upright canvas logits, turned and moved per the one-hot code y -> (B, 4096)."""
        frame = F.grid_sample((canvas - self.background).unsqueeze(1).contiguous(), self.sampling_grid(y),
                              mode="bilinear", padding_mode="zeros", align_corners=False)
        return frame.flatten(1) + self.background

    def sampling_grid(self, y: torch.Tensor) -> torch.Tensor:
        """(B, 64, 64, 2): where each frame pixel reads the canvas, in grid_sample's
        normalised coordinates (the canvas spans -1..1, that is WARP_SPAN frame pixels)."""
        angle, centre_x, centre_y = self.angles_and_centres(*class_values(y))
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Frame pixel (r, c) has its centre at (c, r). With rows pointing down, turning by
        # -angle counter-clockwise on screen is (dx, dy) -> (dx cos - dy sin, dx sin + dy cos).
        pixels = torch.arange(IMAGE_SIZE, dtype=y.dtype, device=y.device)
        dx = pixels.view(1, 1, -1) - centre_x.view(-1, 1, 1)  # (B, 1, 64)
        dy = pixels.view(1, -1, 1) - centre_y.view(-1, 1, 1)  # (B, 64, 1)
        # Scaled first: half is a power of two, so scaling before or after rounds alike.
        dx, dy = dx / (WARP_SPAN / 2), dy / (WARP_SPAN / 2)
        cos, sin = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
        if torch.is_grad_enabled():  # training: out= takes no gradients
            return torch.stack([dx * cos - dy * sin, dx * sin + dy * cos], dim=-1)
        # Queries: written straight into the grid's two planes, where stacking copied both;
        # bitwise the same (tests/test_model.py).
        grid = dx.new_empty(len(y), IMAGE_SIZE, IMAGE_SIZE, 2)
        torch.sub(dx * cos, dy * sin, out=grid[..., 0])
        torch.add(dx * sin, dy * cos, out=grid[..., 1])
        return grid


ARCHITECTURES = {
    "mlp": (MLPEncoder, MLPDecoder),
    "conv": (ConvEncoder, ConvDecoder),
    "sprite": (ConvEncoder, SpriteDecoder),
    "warp": (WarpEncoder, WarpDecoder),
}


CHANNELS = 32  # the conv layers' width (Burgess et al.), where a model spec does not say


class SupervisedVAE(nn.Module):
    """`channels`: the width of the conv layers (conv, sprite, warp; the mlp has none);
    `encoder_channels` the encoder's, when it differs (default: `channels`)."""

    def __init__(self, arch: str = "sprite", z_dim: int = 50, hidden: int = 1000,
                 learn_translation: bool = True, channels: int = CHANNELS, encoder_channels: int | None = None):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
        encoder, decoder = ARCHITECTURES[arch]
        self.arch, self.z_dim, self.hidden = arch, z_dim, hidden
        self.learn_translation = bool(learn_translation)
        conv = arch != "mlp"
        self.channels = channels if conv else CHANNELS
        self.encoder_channels = (encoder_channels or channels) if conv else CHANNELS
        self.encoder = encoder(z_dim, hidden, **({"channels": self.encoder_channels} if conv else {}))
        extra = {"learn_translation": self.learn_translation} if arch == "sprite" else {}
        self.decoder = decoder(z_dim, hidden, **extra, **({"channels": self.channels} if conv else {}))
        self.to(memory_format=torch.channels_last)  # conv weights as NHWC (see channels_last)
        self.elbo = Trace_ELBO()

    @classmethod
    def from_config(cls, model) -> SupervisedVAE:
        """A fresh module for a config's `model` section (cvae.config.ModelConfig)."""
        learn = True if model.learn_translation is None else model.learn_translation
        return cls(model.arch, model.z_dim, model.hidden, learn, model.channels, model.encoder_channels)

    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """p(z) = N(0, I); p(x | y, z) = Bernoulli(sigmoid(decoder(z, y))) per pixel."""
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            logits = self.decoder(z, one_hot(y))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """q(z | x, y) = Normal(encoder(x, y)), diagonal."""
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x, one_hot(y))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative ELBO summed over the batch (nats), differentiable."""
        return self.elbo.differentiable_loss(self.model, self.guide, x, y)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, y): loc and scale, (B, z_dim) each; y as (B, 5) classes."""
        return self.encoder(x, one_hot(y))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pixel logits (B, 4096) of p(x | y, z); y as (B, 5) classes."""
        return self.decoder(z, one_hot(y))

    @property
    def canvas_factors(self) -> tuple[str, ...] | None:
        """The factors the decoder's canvas depends on (with z), for decoders that draw a
        canvas and then place it (`draw`, `place`); None for the others."""
        return getattr(self.decoder, "CANVAS_FACTORS", None)

    def draw(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The decoder's canvas of (z, y), y as (B, 5) classes: `decode` is `place` of it."""
        return self.decoder.draw(z, one_hot(y))

    def place(self, canvas: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pixel logits (B, 4096) of a canvas placed at the classes y (B, 5)."""
        return self.decoder.place(canvas, one_hot(y))

    def spec(self) -> dict:
        """What rebuilds this module: SupervisedVAE(**spec)."""
        spec = {"arch": self.arch, "z_dim": self.z_dim, "hidden": self.hidden}
        if self.arch == "sprite":
            spec["learn_translation"] = self.learn_translation
        # Widths are named only when not the default, so older specs stay as they were.
        if self.channels != CHANNELS:
            spec["channels"] = self.channels
        if self.encoder_channels != self.channels:
            spec["encoder_channels"] = self.encoder_channels
        return spec
