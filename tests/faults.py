"""Fault drills for the training tests, handed to run_training as its step_hook.

Ray workers cannot import the tests folder, so the tests register this module with Ray's
cloudpickle by value: the hook travels to the workers as code.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


class KillOnce:
    """SIGKILL the worker of `rank` at step `step` of epoch `epoch`, once: a marker file in
    the run folder (holding the killed pid) stops it firing again after the restart."""

    def __init__(self, epoch: int, step: int, rank: int):
        self.at = (epoch, step, rank)

    def marker(self, run_dir: str) -> Path:
        return Path(run_dir) / ".killed-{}-{}-{}".format(*self.at)

    def __call__(self, epoch: int, step: int, rank: int, run_dir: str) -> None:
        if (epoch, step, rank) != self.at:
            return
        marker = self.marker(run_dir)
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
