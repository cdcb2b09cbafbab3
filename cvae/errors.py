"""The project's errors: one base class, `CvaeError`, that every error cvae raises on purpose
derives from, so a job catches that one class and prints its message (a `ValueError`, so
`except ValueError` keeps working). The errors of one module live beside its code; these
are the ones several packages raise."""


class CvaeError(ValueError):
    """A problem with the inputs, the config, the data or an output location, said in one
    readable line that names what is at fault (a job prints it and exits with status 2)."""


class ConfigError(CvaeError):
    """A config (or flag) value that cannot be used, with the key at fault named."""


class DataError(CvaeError):
    """Data that cannot be trusted or used: damaged, truncated, missing or inconsistent."""


class OutputLocationError(CvaeError):
    """An output path or URI that cannot be opened, created or written (unknown scheme, bad
    bucket, no access, a read-only or virtual filesystem such as /proc)."""


class OutputExistsError(OutputLocationError):
    """An output folder that already holds a finished (committed) output, which a job would
    replace: refused unless the caller asks to overwrite it."""


class OutputBusyError(OutputLocationError):
    """An output folder another live job holds the lease on (cvae.serve.lease): two writers into one
    folder would delete each other's staged files."""
