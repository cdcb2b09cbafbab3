"""The model and its checkpoints, without Ray: shapes, learning, and safe loading."""
import os
import pickle

import numpy as np
import pytest
import torch

from cvae.checkpoint import (
    CheckpointError, load_checkpoint, load_optimizer_state, save_checkpoint,
)
from cvae.model import CANVAS, SupervisedVAE, one_hot
from cvae.render import render, sprites


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 4096, generator=g) < 0.1).float()
    sizes = torch.tensor([3, 6, 40, 32, 32])
    y = (torch.rand(n, 5, generator=g) * sizes).long()
    return x, y


@pytest.mark.parametrize("arch,hidden", [("mlp", 32), ("conv", 256), ("sprite", 256)])
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


def test_sprite_decoder_translates_exactly_as_the_renderer_places_shapes():
    """A canvas holding a sprite, moved by the decoder's position maps, is the rendered
    image at every position: positions are translations by construction."""
    decoder = SupervisedVAE("sprite", z_dim=2).decoder
    sprite_rows = sprites()
    rng = np.random.default_rng(0)
    classes = np.column_stack([rng.integers(0, n, 64) for n in (3, 6, 40, 32, 32)])
    y = one_hot(torch.as_tensor(classes))
    canvas = torch.zeros(64, CANVAS, CANVAS)
    at = CANVAS // 2 - 16  # the sprite's centre pixel (16) on the canvas centre
    for i, (shape, scale, orientation, _, _) in enumerate(classes):
        canvas[i, at:at + 33, at:at + 33] = torch.as_tensor(sprite_rows[shape, scale, orientation])
    with torch.no_grad():
        decoder.background.fill_(0.0)
        frames = decoder.place(canvas, y).view(-1, 64, 64)
    assert torch.equal(frames, torch.as_tensor(render(classes)).float())


def test_sprite_translation_is_frozen_unless_learned():
    frozen = SupervisedVAE("sprite", z_dim=2)
    learned = SupervisedVAE("sprite", z_dim=2, learn_translation=True)
    assert not frozen.decoder.move_x.requires_grad and learned.decoder.move_x.requires_grad
    assert frozen.spec() == {"arch": "sprite", "z_dim": 2, "hidden": 1000, "learn_translation": False}
    x, y = _batch()
    opt = torch.optim.Adam(frozen.parameters(), lr=1e-2)
    before = frozen.decoder.move_y.clone()
    frozen(x, y).backward()
    opt.step()
    assert torch.equal(frozen.decoder.move_y, before)


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
