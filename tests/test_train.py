"""Training with Ray Train at tiny size: local mode, two real workers, resume after a
rerun and after a SIGKILLed worker, and the job's command line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cvae.config import load_config
from cvae.data.grid import ModelGrid
from cvae.data.reader import load_split
from cvae.data.shards import split_shards, write_dataset
from cvae.model.checkpoint import load_checkpoint, load_meta, load_optimizer_state
from cvae.model.networks import SupervisedVAE
from cvae.model.run import reconstruct
from cvae.model.train import learning_rate, run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_config(**train):
    return load_config(CONFIG, {f"train.{k}": v for k, v in train.items()})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-data")
    write_dataset(load_config(CONFIG), path)
    return path


def reconstruction_nats(model: SupervisedVAE, data: dict) -> float:
    """Bernoulli negative log-likelihood per image of the test images under their
    reconstructions (decoded from the posterior mean)."""
    images = torch.from_numpy(data["imgs"])
    probs = torch.from_numpy(reconstruct(model, images, torch.from_numpy(data["classes"])))
    probs = probs.clamp(1e-6, 1 - 1e-6).double()
    x = images.double()
    return float(-(x * probs.log() + (1 - x) * (1 - probs).log()).sum(dim=(1, 2)).mean())


def check_checkpoint(path: str, epoch: int) -> SupervisedVAE:
    model, meta = load_checkpoint(path)
    assert meta["epoch"] == epoch
    assert set(meta) >= {"config", "manifest", "scm", "epoch", "metrics", "history", "model"}
    assert meta["manifest"]["counts"]["train"] > 0
    assert [r["epoch"] for r in meta["history"]] == list(range(1, epoch + 1))
    assert (Path(path) / "optimizer.pt").is_file()
    return model


def test_long_epochs_show_progress_inside_the_epoch(tiny_data, tmp_path, monkeypatch, caplog):
    """Progress is logged (stderr in a job), never printed to stdout, which keeps the results."""
    from cvae.model import train as train_module
    monkeypatch.setattr(train_module, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    caplog.set_level("INFO", logger="cvae")
    run_training(tiny_config(num_workers=0, epochs=1, max_steps_per_epoch=4), tiny_data, tmp_path, run_name="p")
    lines = [line for line in caplog.messages if line.startswith("epoch 1/1: ")]
    assert [line.split(" steps)")[0].split("(")[1] for line in lines] == [f"{k} of 4" for k in (1, 2, 3, 4)]
    assert lines[-1].startswith("epoch 1/1: 100% (4 of 4 steps), train ") and "nats/image so far" in lines[-1]


def test_every_training_process_keeps_freed_memory(tiny_data, tmp_path, monkeypatch):
    """The loop tunes malloc before its first step (cvae.malloc: fewer page faults per step)."""
    from cvae.model import train as train_module
    events = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: events.append("malloc") or True)
    config = tiny_config(num_workers=0, epochs=1, max_steps_per_epoch=2)
    run_training(config, tiny_data, tmp_path, run_name="m",
                 step_hook=lambda epoch, step, rank, run_dir: events.append(f"step {step}"))
    assert events == ["malloc", "step 0", "step 1"]


def test_local_mode_starts_no_ray_of_its_own(monkeypatch):
    """Recording where rank 0 ran must not ask Ray's runtime context in local mode: that
    auto-starts an unsecured Ray, and a later secured init_ray in the process then fails."""
    import ray

    from cvae.model.train import placement

    def no_init(*args, **kwargs):
        raise AssertionError("local mode started a Ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a process without a Ray
    monkeypatch.setattr(ray, "init", no_init)
    [rank0] = placement(0, ["manifest.json"], staged=False)
    assert (rank0["rank"], rank0["node_id"], rank0["files"]) == (0, "local", ["manifest.json"])


def test_local_mode_trains_a_model_that_reconstructs(tiny_data, tmp_path):
    config = tiny_config(num_workers=0, epochs=3)
    result = run_training(config, tiny_data, tmp_path, run_name="local")

    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert all(r["workers"] == 1 and r["attempt"] == 0 for r in result.history)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]
    assert all(np.isfinite(r[f"{s}_loss"]) for r in result.history for s in ("validation", "test"))
    assert "holdout_loss" in result.history[-1]  # tiny.yaml holds one combination out
    assert result.best_by == "validation_loss"
    model = check_checkpoint(result.latest_checkpoint, 3)
    # keep_checkpoints: 2 -- the best two by validation loss, and the latest in any case.
    assert len(list(Path(result.run_dir).glob("checkpoint_epoch_*"))) <= 3
    assert Path(result.best_checkpoint).is_dir()
    for key in ("metrics_json", "metrics_csv", "loss_curve", "reconstructions"):
        assert Path(result.files[key]).stat().st_size > 0, key
    assert json.loads(Path(result.files["metrics_json"]).read_text())[-1]["epoch"] == 3

    test = load_split(tiny_data, "test", limit=64)
    torch.manual_seed(123)
    untrained = SupervisedVAE(**model.spec()).eval()
    trained_nats, untrained_nats = reconstruction_nats(model, test), reconstruction_nats(untrained, test)
    assert trained_nats < 0.5 * untrained_nats, (trained_nats, untrained_nats)

    # Local mode resumes too: a rerun with the same name and more epochs continues.
    again = run_training(tiny_config(num_workers=0, epochs=4), tiny_data, tmp_path, run_name="local")
    assert [(r["epoch"], r["attempt"]) for r in again.history] == [(1, 0), (2, 0), (3, 0), (4, 1)]


def test_the_cosine_schedule_falls_from_lr_to_a_hundredth_and_training_follows_it(tiny_data, tmp_path):
    cosine, constant = tiny_config(lr_schedule="cosine").train, tiny_config().train
    rates = [learning_rate(cosine, step, 6) for step in range(6)]
    assert rates[0] == cosine.lr and rates[-1] == pytest.approx(cosine.lr / 100)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert {learning_rate(constant, step, 6) for step in range(6)} == {constant.lr}

    # Two epochs of three steps: the optimizer saved after each epoch holds the lr of that
    # epoch's last step (steps 2 and 5 of 6).
    config = tiny_config(num_workers=0, epochs=2, max_steps_per_epoch=3, lr_schedule="cosine")
    result = run_training(config, tiny_data, tmp_path, run_name="cosine")
    for epoch, step in ((1, 2), (2, 5)):
        state = load_optimizer_state(Path(result.run_dir) / f"checkpoint_epoch_{epoch:05d}")
        assert state["param_groups"][0]["lr"] == pytest.approx(rates[step]), epoch


def test_accumulating_batches_takes_one_adam_step_per_k_batches(tiny_data, tmp_path):
    """Seven batches with accumulate 2: Adam steps after batches 2, 4, 6 and, at the end of
    the epoch, 7; the weights still move and the loss stays finite."""
    steps = {}
    for accumulate in (1, 2):
        config = tiny_config(num_workers=0, epochs=1, batch_size=16, accumulate=accumulate,
                             max_steps_per_epoch=7, eval_every=5)
        result = run_training(config, tiny_data, tmp_path / str(accumulate), run_name="acc")
        state = load_optimizer_state(result.latest_checkpoint)["state"]
        steps[accumulate] = {int(s["step"]) for s in state.values()}
        assert np.isfinite(result.history[-1]["train_loss"])
    assert steps == {1: {7}, 2: {4}}


@pytest.mark.parametrize("validation_fraction, best_by, best_epoch", [
    (0.05, "validation_loss", 2),  # validation chooses, whatever the test loss says
    (0.0, "test_loss", 3),  # no validation split: test loss chooses
])
def test_best_checkpoint_is_chosen_by_validation_loss(tmp_path, monkeypatch, validation_fraction,
                                                      best_by, best_epoch):
    import cvae.model.train as train_module

    config = load_config(CONFIG, {"data.validation_fraction": validation_fraction,
                                  "train.num_workers": 0, "train.epochs": 3,
                                  "train.max_steps_per_epoch": 1})
    write_dataset(config, tmp_path / "data")
    # Losses per split and epoch that disagree: validation is lowest at epoch 2, test at 3.
    losses = {"validation": [5.0, 1.0, 3.0], "test": [5.0, 4.0, 2.0], "holdout": [1.0, 1.0, 1.0]}
    calls = {split: 0 for split in losses}

    def fake_split_loss(model, reader, device):
        calls[reader.split] += 1
        return losses[reader.split][calls[reader.split] - 1]

    monkeypatch.setattr(train_module, "split_loss", fake_split_loss)
    result = run_training(config, tmp_path / "data", tmp_path / "train", run_name="best")
    assert calls == {"validation": 3 if validation_fraction else 0, "test": 3, "holdout": 3}
    assert result.best_by == best_by
    assert result.best_metrics["epoch"] == best_epoch
    assert Path(result.best_checkpoint).name == f"checkpoint_epoch_{best_epoch:05d}"
    assert ("validation_loss" in result.history[0]) == bool(validation_fraction)


def test_two_workers_survive_a_sigkill_mid_epoch_and_a_rerun_resumes(
        ray_session, tiny_data, tmp_path, monkeypatch):
    # Worker rank 1 SIGKILLs itself at step 3 of epoch 2: mid-epoch, after the epoch-1
    # checkpoint. FailureConfig(max_failures=2) restarts the worker group, which resumes
    # from the latest checkpoint that Ray Train hands to the workers.
    import faults
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(faults)  # the workers cannot import tests/
    drill = faults.KillOnce(epoch=2, step=3, rank=1)
    result = run_training(tiny_config(num_workers=2, epochs=2, max_failures=2),
                          tiny_data, tmp_path, run_name="two", step_hook=drill)
    marker = drill.marker(result.run_dir)
    assert marker.is_file() and int(marker.read_text()) > 0  # the kill really happened
    # Every epoch exactly once; epoch 1 survived from the first attempt and the restart
    # began at the interrupted epoch 2: less than one epoch of work was lost.
    assert [(r["epoch"], r["attempt"]) for r in result.history] == [(1, 0), (2, 1)]
    assert all(r["workers"] == 2 for r in result.history)
    train_rows = json.loads((tiny_data / "manifest.json").read_text())["counts"]["train"]
    # Each worker reads its own shards; together they cover the train split once an epoch.
    assert all(r["train_images"] == train_rows for r in result.history)
    assert all(np.isfinite(r["test_loss"]) for r in result.history)
    check_checkpoint(result.latest_checkpoint, 2)
    # The checkpoint records each rank's node and files: disjoint shards covering the train split.
    placement = load_meta(result.latest_checkpoint)["placement"]
    assert [p["rank"] for p in placement] == [0, 1] and all(p["node_id"] for p in placement)
    train_files = {e["file"] for e in split_shards(json.loads((tiny_data / "manifest.json").read_text()), "train")}
    shards = [set(p["files"]) & train_files for p in placement]
    assert shards[0] and shards[1] and not shards[0] & shards[1] and shards[0] | shards[1] == train_files

    # A rerun with the same run name and storage path: Ray Train reloads its snapshot and
    # hands the latest checkpoint to the workers, which continue at epoch 3 with the
    # optimizer state. (The marker stops the kill from firing again.) This time the
    # output folder is given as a file:// URI: the same storage, through pyarrow.
    again = run_training(tiny_config(num_workers=2, epochs=3), tiny_data, f"file://{tmp_path}",
                         run_name="two")
    assert [(r["epoch"], r["attempt"]) for r in again.history] == [(1, 0), (2, 1), (3, 2)]
    assert again.history[-1]["train_loss"] < again.history[0]["train_loss"]
    assert again.latest_checkpoint == f"file://{tmp_path}/two/checkpoint_epoch_00003"
    assert again.files["reconstructions"] == f"file://{tmp_path}/reconstructions.png"
    model = check_checkpoint(str(tmp_path / "two" / "checkpoint_epoch_00003"), 3)
    test = load_split(tiny_data, "test", limit=64)
    torch.manual_seed(123)
    assert reconstruction_nats(model, test) < reconstruction_nats(SupervisedVAE(**model.spec()), test)


def test_two_workers_train_the_sprite_model_and_its_position_maps(ray_session, tiny_data, tmp_path):
    """The sprite architecture under DDP: the position maps are parameters that move
    away from their whole-pixel starting guess, and the model learns."""
    from cvae.model.networks import translation

    # accumulate 2: DDP skips the all-reduce of every other batch (no_sync) and still learns.
    config = load_config(CONFIG, {"model.arch": "sprite", "train.num_workers": 2, "train.epochs": 2,
                                  "train.lr": 3e-3, "train.accumulate": 2})
    result = run_training(config, tiny_data, tmp_path, run_name="sprite")
    model = check_checkpoint(result.latest_checkpoint, 2)
    assert model.spec() == {"arch": "sprite", "z_dim": 8, "hidden": 64, "learn_translation": True}
    assert not torch.equal(model.decoder.move_x, translation(32))
    assert not torch.equal(model.decoder.move_y, translation(32))
    test = load_split(tiny_data, "test", limit=64)
    torch.manual_seed(123)
    untrained = SupervisedVAE(**model.spec()).eval()
    assert reconstruction_nats(model, test) < 0.5 * reconstruction_nats(untrained, test)


def test_two_workers_train_the_warp_model_and_declare_what_it_answers(ray_session, tiny_data, tmp_path):
    """The default architecture under DDP: its geometry corrections move, the model learns,
    and every checkpoint declares its grid with the coverage measured (two epochs on 4,608
    images draw unseen classes far below IoU 0.95, so the grid stays the training grid)."""
    config = load_config(CONFIG, {"model.arch": "warp", "train.num_workers": 2, "train.epochs": 2,
                                  "train.lr": 3e-3})
    result = run_training(config, tiny_data, tmp_path, run_name="warp")
    model = check_checkpoint(result.latest_checkpoint, 2)
    assert model.spec() == {"arch": "warp", "z_dim": 8, "hidden": 64}
    assert model.decoder.geometry.abs().sum() > 0
    test = load_split(tiny_data, "test", limit=64)
    torch.manual_seed(123)
    untrained = SupervisedVAE(**model.spec()).eval()
    assert reconstruction_nats(model, test) < 0.5 * reconstruction_nats(untrained, test)
    meta = load_meta(result.latest_checkpoint)
    assert set(meta["coverage"]) == {"orientation", "pos_x", "pos_y"}
    assert all(0 <= c["unseen_iou"] < 0.95 and not c["answered"] for c in meta["coverage"].values())
    assert ModelGrid.from_dict(meta["grid"]) == ModelGrid.of_manifest(meta["manifest"])
    assert "unseen classes measured at reconstruction IoU" in meta["grid"]["why"]["orientation"]
    # Its SCM draws the classes it declares: every 10th orientation, as trained.
    assert (np.flatnonzero(np.asarray(meta["scm"]["tables"]["orientation"])) == np.arange(0, 40, 10)).all()


def test_a_checkpoint_whose_coverage_widens_its_grid_widens_its_scm(tiny_data, tmp_path, monkeypatch):
    """The SCM saved with a checkpoint draws the classes its grid declares: where coverage
    declares the whole grid, dSprites' uniform factors over the whole grid, not only the
    strided classes trained on (which refused counterfactuals of every other source)."""
    from cvae.model import report

    measured = {"orientation": {"unseen_iou": 0.99, "seen_iou": 0.99, "images": 4, "answered": True}}
    monkeypatch.setattr(report, "measure_coverage", lambda *args, **kwargs: (ModelGrid.whole(), measured))
    result = run_training(tiny_config(num_workers=0, epochs=1, max_steps_per_epoch=2), tiny_data, tmp_path,
                          run_name="widened")
    meta = load_meta(result.latest_checkpoint)
    assert ModelGrid.from_dict(meta["grid"]).is_whole() and meta["coverage"] == measured
    assert np.allclose(meta["scm"]["tables"]["orientation"], 1 / 40)
    assert np.allclose(meta["scm"]["tables"]["pos_x"], 1 / 32)


def test_job_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from jobs.train import main

    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["--config", str(CONFIG), "--data", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err
    assert "no dataset at" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("epochs: 2", "epochs: 0"))
    assert main(["--config", str(bad)]) == 2
    assert "train.epochs: must be > 0" in capsys.readouterr().err
