"""The Ray job entry points, one per stage and the pipeline: each parses its arguments and
calls cvae, printing results on stdout and logging on stderr."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from cvae.errors import CvaeError


def reports_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A job's `main` that stops on a bad input with one line: a CvaeError (every error cvae
    raises on purpose) or a missing file becomes `error: <message>` on stderr and exit status
    2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def job(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (CvaeError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return job
