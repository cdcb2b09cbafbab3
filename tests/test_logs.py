"""Logs and progress: one configuration for the jobs; progress lines, not bars, in files."""
import logging

import pytest

from cvae.logs import configure, progress


def test_progress_says_every_tenth_once_when_not_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="cvae")
    with progress(20, "rendering", unit="shards") as bar:
        for _ in range(20):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("rendering: 10% (2 of 20 shards")
    assert lines[-1].startswith("rendering: 100% (20 of 20 shards")
    caplog.clear()
    with progress(0, "counting") as bar:  # a total learned on the way
        bar.set(3, 12)
        bar.set(12, 12)
    assert [r.getMessage()[:14] for r in caplog.records][-1] == "counting: 100%"


def test_configure_checks_the_level_and_sends_cvae_records_to_stderr(capsys):
    with pytest.raises(ValueError, match="log level must be one of"):
        configure("LOUD")
    configure("WARNING")
    logging.getLogger("cvae.pipeline").info("not shown")
    logging.getLogger("cvae.pipeline").warning("shown")
    err = capsys.readouterr().err
    assert "shown" in err and "not shown" not in err
    configure("INFO")


def test_a_train_worker_shows_ray_trains_per_report_line_only_at_debug():
    """Ray Train's "Reporting training result ... TrainingReport(...)" logger, named by its
    file's path, is outside `ray.train` and its LoggingConfig: quiet_train_worker sets it."""
    from ray.train.v2._internal.execution import context

    from cvae.logs import quiet_train_worker

    try:
        configure("INFO")
        quiet_train_worker()
        assert not context.logger.isEnabledFor(logging.INFO)
        configure("DEBUG")
        context.logger.setLevel(logging.NOTSET)
        quiet_train_worker()
        assert context.logger.level == logging.NOTSET  # left to Ray's own configuration
    finally:
        context.logger.setLevel(logging.NOTSET)
        for name in ("cvae", "jobs"):
            logging.getLogger(name).propagate = True
        configure("INFO")
