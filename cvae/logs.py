"""Logs and progress, the standard library's way.

Modules log to `logging.getLogger(__name__)` (all under `cvae`); the job entry points call
`configure(level)` once, which sends those records to stderr as plain lines, so stdout
keeps only a job's results (its summary). Used as a library, cvae says nothing below
WARNING until the caller configures logging.

`progress(total, what)` counts long work: a tqdm bar on a terminal, and in a file or a
pipe (a cluster job's log) a line at every 10% instead of a bar redrawn in place.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Ray's warning that an actor's constructor arguments sit in the object store: Ray Data's
# and Ray Train's own actors always trip it (ray-project/ray#57733), at level E.
RAY_ACTOR_ARGS_WARNING = "has constructor arguments in the object store and max_restarts > 0"


def configure(level: str = "INFO") -> None:
    """Send the `cvae` and `jobs` loggers to stderr at `level` (one of LEVELS).

    Below DEBUG, worker lines Ray forwards to this process skip RAY_ACTOR_ARGS_WARNING
    (Ray's RAY_DEDUP_LOGS_SKIP_REGEX, read when Ray is imported, so set here before it is;
    a value the user set is kept). The same line from this process's own Ray core (the
    query job's actor pool) is printed by Ray's C++ logger, which no setting reaches short
    of hiding every Ray error."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if level != "DEBUG":
        os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", re.escape(RAY_ACTOR_ARGS_WARNING))
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    for name in ("cvae", "jobs"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)  # (records still reach the root logger: none is set up in a job)


def ray_detail() -> bool:
    """Whether Ray's own INFO lines are wanted: only at --log-level DEBUG. Below that a
    job shows its own stage lines, its progress and real warnings (Ray's always)."""
    return logging.getLogger("cvae").isEnabledFor(logging.DEBUG)


def ray_train_level() -> str:
    """The level of Ray Train's own `ray.train` logs (ray.train.LoggingConfig): its INFO
    lines only at DEBUG."""
    return "INFO" if ray_detail() else "WARNING"


def quiet_ray_data() -> None:
    """Ray Data's INFO lines (its progress tables when stderr is not a terminal, "execution
    finished") only at DEBUG, by the level of its `ray.data` logger; call it after Ray Data
    is imported, which sets that level."""
    if not ray_detail():
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_train_worker() -> None:
    """In a Ray Train worker process, after `configure`: our records once (Ray Train sets up
    a console handler on the root logger there, which would print them a second time), and
    Ray Train's per-report INFO line only at DEBUG.

    That line ("Reporting training result 1: TrainingReport(...)", every epoch from every
    worker) comes from a logger Ray 2.60 names by its file's path, outside `ray.train`, so
    LoggingConfig(log_level=...) does not reach it: its level is set here on the logger
    object itself, and a Ray that has moved the module keeps its line."""
    for name in ("cvae", "jobs"):
        logging.getLogger(name).propagate = False
    if ray_detail():
        return
    try:
        from ray.train.v2._internal.execution import context  # (Ray's own; imported already in a worker)
    except ImportError:
        return
    if isinstance(getattr(context, "logger", None), logging.Logger):
        context.logger.setLevel(logging.WARNING)


def add_level_option(parser) -> None:
    """The jobs' `--log-level` option (call `configure(args.log_level)` after parsing)."""
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, type=str.upper,
                        help="messages and progress on stderr (default INFO; DEBUG adds Ray's own lines); "
                             "results go to stdout")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (it may be replaced)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class progress:
    """Count `total` units of `what` (a context manager; call `update(n)` as work is done)."""

    def __init__(self, total: int, what: str, logger: logging.Logger | None = None, unit: str = "it"):
        self.total, self.what, self.unit = max(int(total), 1), what, unit
        self.log = logger or logging.getLogger("cvae")
        self.done, self.next_tenth, self.bar = 0, 1, None
        self.started = time.perf_counter()

    def __enter__(self) -> progress:
        if sys.stderr.isatty() and self.log.isEnabledFor(logging.INFO):
            from tqdm import tqdm  # only for a terminal

            self.bar = tqdm(total=self.total, desc=self.what, unit=self.unit, leave=False)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        while self.next_tenth <= 10 and self.done * 10 >= self.next_tenth * self.total:
            self.log.info("%s: %d%% (%d of %d %s, %.0f s)", self.what, self.next_tenth * 10, self.done,
                          self.total, self.unit, time.perf_counter() - self.started)
            self.next_tenth += 1

    def set(self, done: int, total: int) -> None:
        """Report `done` of `total` (for callers that count themselves)."""
        self.total = max(int(total), 1)
        if self.bar is not None:
            self.bar.total = self.total
        self.update(done - self.done)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
