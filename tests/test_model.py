"""The model and its checkpoints, without Ray: shapes, learning, and safe loading."""
import os
import pickle

import numpy as np
import pytest
import torch

from cvae.data.render import render
from cvae.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from cvae.model.networks import (
    CANVAS,
    WARP_CANVAS,
    WARP_SPAN,
    OneMapTransposedConv,
    SupervisedVAE,
    one_hot,
    translation,
)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 4096, generator=g) < 0.1).float()
    sizes = torch.tensor([3, 6, 40, 32, 32])
    y = (torch.rand(n, 5, generator=g) * sizes).long()
    return x, y


@pytest.mark.parametrize("arch,hidden", [("mlp", 32), ("conv", 256), ("sprite", 256), ("warp", 256)])
def test_shapes_and_loss(arch, hidden):
    model = SupervisedVAE(arch, z_dim=6, hidden=hidden, learn_translation=True)
    x, y = _batch()
    loc, scale = model.encode(x, y)
    assert loc.shape == scale.shape == (16, 6) and (scale > 0).all()
    assert model.decode(loc, y).shape == (16, 4096)
    loss = model(x, y)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = SupervisedVAE("mlp", z_dim=4, hidden=64)
    x, y = _batch(32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = model(x, y).item()
    for _ in range(30):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert model(x, y).item() < 0.5 * first


def test_the_starting_guess_moves_the_canvas_one_whole_pixel_per_class():
    decoder = SupervisedVAE("sprite", z_dim=2).decoder
    canvas = torch.zeros(32, CANVAS, CANVAS)
    canvas[:, CANVAS // 2, CANVAS // 2] = 1.0  # one dot at the canvas centre
    classes = torch.zeros(32, 5, dtype=torch.long)
    classes[:, 3] = torch.arange(32)  # pos_x 0..31
    classes[:, 4] = 31 - torch.arange(32)  # pos_y 31..0
    with torch.no_grad():
        decoder.background.fill_(0.0)
        frames = decoder.place(canvas, one_hot(classes)).view(-1, 64, 64)
    rows, cols = np.nonzero(frames.sum(0).numpy())
    assert sorted(cols) == list(range(16, 48)) and sorted(rows) == list(range(16, 48))
    assert torch.equal(frames[0, 47, 16], torch.tensor(1.0))


def centroid_x(images: torch.Tensor) -> torch.Tensor:
    mass = images.sum(dim=(1, 2))
    return (images * torch.arange(64.0)).sum(dim=(1, 2)) / mass


def test_the_position_maps_learn_official_steps_from_data():
    """The maps are learned, not a copy of a rule: with everything but the maps frozen
    and a canvas holding an ellipse, fitting rendered images at every pos_x moves the
    guess (whole pixels, 31 px from class 0 to 31) to the data's 32/31-pixel steps (32 px)."""
    torch.manual_seed(0)
    decoder = SupervisedVAE("sprite", z_dim=2).decoder
    assert decoder.move_x.requires_grad and decoder.move_y.requires_grad
    classes = np.array([(1, 5, 0, k, 0) for k in range(32)])
    images = torch.as_tensor(render(classes)).float()
    canvas = torch.full((CANVAS, CANVAS), -8.0)
    at = CANVAS // 2 - 16  # the frame's pixels 0..47 of class 0, drawn on the canvas
    canvas[at:, at:] = torch.as_tensor(render(classes[:1])[0, :CANVAS - at, :CANVAS - at]).float() * 16 - 8
    canvas = canvas.expand(32, -1, -1)
    y = one_hot(torch.as_tensor(classes))
    opt = torch.optim.Adam([decoder.move_x], lr=0.02)

    def decoded():
        return torch.sigmoid(decoder.place(canvas, y).view(-1, 64, 64))

    with torch.no_grad():
        decoder.background.fill_(-8.0)
        guess = centroid_x(decoded())
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy(decoded(), images.view(-1, 64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = centroid_x(decoded())
    truth = centroid_x(images)
    assert abs((guess[-1] - guess[0]).item() - 31) < 0.2
    assert abs((truth[-1] - truth[0]).item() - 32) < 0.2
    assert (learned - truth).abs().max() < 0.25 < (guess - truth).abs().max()


def test_sprite_translation_is_learned_unless_frozen():
    learned = SupervisedVAE("sprite", z_dim=2)
    frozen = SupervisedVAE("sprite", z_dim=2, learn_translation=False)
    assert learned.decoder.move_x.requires_grad and not frozen.decoder.move_x.requires_grad
    assert torch.equal(learned.decoder.move_x, translation(32))  # the starting guess
    assert learned.spec() == {"arch": "sprite", "z_dim": 2, "hidden": 1000, "learn_translation": True}
    assert frozen.spec() == {"arch": "sprite", "z_dim": 2, "hidden": 1000, "learn_translation": False}
    x, y = _batch()
    for model, changes in ((learned, True), (frozen, False)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        before = model.decoder.move_y.clone()
        model(x, y).backward()
        opt.step()
        assert torch.equal(model.decoder.move_y, before) is not changes


@pytest.mark.parametrize("side", [24, 32])  # the sprite and conv decoders' last layer
def test_the_one_map_transposed_conv_computes_the_layer_it_stands_for(side):
    torch.manual_seed(0)
    fast = OneMapTransposedConv(32).to(memory_format=torch.channels_last)
    plain = torch.nn.ConvTranspose2d(32, 1, 4, 2, 1)
    plain.load_state_dict(fast.state_dict())  # the same parameters: checkpoints load unchanged
    x = torch.randn(5, 32, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # queries: the matmul and strided adds
        out = fast(x)
        expected = plain(x)
    assert out.shape == expected.shape == (5, 1, 2 * side, 2 * side)
    assert (out - expected).abs().max() < 1e-5 < expected.abs().max()
    x.requires_grad_()  # training: PyTorch's own kernel, so gradients are the layer's
    fast(x).sum().backward()
    assert x.grad is not None and fast.weight.grad.shape == (32, 1, 4, 4)


def test_the_warp_grid_is_bitwise_the_same_with_and_without_gradients():
    """Queries build the sampling grid in place (no gradients), training by stacking: the
    same arithmetic, so the same bits, and only the training form carries gradients."""
    torch.manual_seed(0)
    decoder = SupervisedVAE("warp", z_dim=6, hidden=256).decoder
    with torch.no_grad():
        decoder.geometry.copy_(torch.randn(6))  # a trained geometry, not the starting zeros
    y = one_hot(_batch(64)[1])
    with torch.no_grad():
        queried = decoder.sampling_grid(y)
    trained = decoder.sampling_grid(y)
    assert queried.shape == (64, 64, 64, 2) and torch.equal(queried, trained.detach())
    assert trained.requires_grad and not queried.requires_grad


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        SupervisedVAE("resnet")


def test_checkpoint_round_trip_with_optimizer(tmp_path):
    torch.manual_seed(0)
    model = SupervisedVAE("mlp", z_dim=4, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _batch()
    opt.zero_grad()
    model(x, y).backward()
    opt.step()
    save_checkpoint(tmp_path, model, {"epoch": 3, "history": [{"epoch": 3}]}, opt)
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["epoch"] == 3 and meta["model"] == {"arch": "mlp", "z_dim": 4, "hidden": 32}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    state = load_optimizer_state(tmp_path)
    opt2 = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state)  # a state Adam accepts, read with weights_only
    assert int(opt2.state_dict()["state"][0]["step"]) == 1


@pytest.mark.parametrize("arch", ["conv", "sprite", "warp"])
def test_the_conv_width_is_in_the_spec_only_when_not_the_default(tmp_path, arch):
    """`channels` narrows every conv layer; a checkpoint records it and loads it back, and a
    model of the default width keeps the spec older checkpoints have."""
    assert "channels" not in SupervisedVAE(arch, z_dim=4).spec()
    narrow, wide = SupervisedVAE(arch, z_dim=4, channels=8), SupervisedVAE(arch, z_dim=4)

    def widths(model):
        convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
        return {(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, convs)}
    assert widths(narrow) <= {(1, 8), (8, 8), (8, 1)} and (8, 8) in widths(narrow)
    assert widths(wide) <= {(1, 32), (32, 32), (32, 1)} and (32, 32) in widths(wide)
    save_checkpoint(tmp_path, narrow, {"epoch": 1})
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["model"]["channels"] == 8 and loaded.spec() == narrow.spec()
    x, y = _batch()
    with torch.no_grad():
        assert torch.equal(loaded.decode(torch.zeros(len(y), 4), y), narrow.decode(torch.zeros(len(y), 4), y))
    thin = SupervisedVAE(arch, z_dim=4, encoder_channels=8)  # a narrow encoder only
    assert thin.spec()["encoder_channels"] == 8 and "channels" not in thin.spec()
    assert widths(thin.encoder) == {(1, 8), (8, 8)} and widths(thin.decoder) == widths(wide.decoder)


class _Exploit:
    """Unpickling this would run os.system: the attack a checkpoint must not allow."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["model.pt", "optimizer.pt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, target):
    model = SupervisedVAE("mlp", z_dim=4, hidden=32)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, {"epoch": 1}, torch.optim.Adam(model.parameters()))
    marker = tmp_path / "pwned"
    payload = {"encoder.loc.weight": _Exploit(marker)}
    # The crafted file is a real torch.save zip whose pickle calls os.system on load.
    torch.save(payload, ckpt / target)
    # Sanity: the payload is live -- a plain (unsafe) pickle load would run it.
    with open(tmp_path / "raw.pkl", "wb") as fh:
        pickle.dump(_Exploit(tmp_path / "control"), fh)
    with open(tmp_path / "raw.pkl", "rb") as fh:
        pickle.load(fh)
    assert (tmp_path / "control").exists()

    with pytest.raises(CheckpointError, match="refused to load"):
        if target == "model.pt":
            load_checkpoint(ckpt)
        else:
            load_optimizer_state(ckpt)
    assert not marker.exists(), "the malicious pickle ran code"


def test_truncated_weights_are_a_clear_error(tmp_path):
    model = SupervisedVAE("mlp", z_dim=4, hidden=32)
    save_checkpoint(tmp_path, model, {"epoch": 1})
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt: cannot be read"):
        load_checkpoint(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path)
    assert load_optimizer_state(tmp_path) is None


def test_warp_draws_an_upright_shape_at_any_orientation_and_position():
    """The warp decoder's geometry at its starting point is the renderer's: an upright
    heart put on its canvas, turned and moved to classes it never saw, matches the
    rendered image (counter-clockwise turns of 2*pi/39 a class, centres at 15.5 + 32/31 k)."""
    decoder = SupervisedVAE("warp", z_dim=2).decoder
    upright = torch.as_tensor(render(np.array([(2, 5, 0, 15, 15)]))).float().view(1, 1, 64, 64)
    # The canvas samples the upright image around its centre (15.5 + 32/31 * 15) at 1.5 per pixel.
    offsets = (torch.arange(WARP_CANVAS) + 0.5) / WARP_CANVAS * WARP_SPAN - WARP_SPAN / 2
    centre = 15.5 + 32 / 31 * 15
    at = (centre + offsets + 0.5) / 32 - 1  # frame pixel p -> grid_sample coordinate (p + 0.5) / 32 - 1
    grid = torch.stack(torch.meshgrid(at, at, indexing="xy"), -1).unsqueeze(0)
    canvas = torch.nn.functional.grid_sample(upright, grid, align_corners=False)[0, 0] * 16 - 8
    classes = np.array([(2, 5, o, x, y) for o, x, y in [(0, 15, 15), (5, 3, 28), (10, 20, 7), (27, 31, 0)]])
    with torch.no_grad():
        decoder.background.fill_(-8.0)
        drawn = decoder.place(canvas.expand(len(classes), -1, -1), one_hot(torch.as_tensor(classes))) > 0
    truth = torch.as_tensor(render(classes)).view(len(classes), -1) > 0
    iou = (drawn & truth).sum(1) / (drawn | truth).sum(1)
    assert (iou > 0.85).all(), iou
    turned_wrong_way = np.array([(2, 5, 39 - 10, 20, 7)])  # the mirror turn reads far worse
    wrong = torch.as_tensor(render(turned_wrong_way)).view(1, -1) > 0
    assert ((drawn[2] & wrong[0]).sum() / (drawn[2] | wrong[0]).sum()) < iou[2] - 0.3
