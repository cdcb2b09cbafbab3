"""Errors about data (shards, manifests, official files), each naming the file at fault."""


class DataError(ValueError):
    """Data that cannot be trusted or used: damaged, truncated, missing or inconsistent."""


class OutputLocationError(ValueError):
    """An output path or URI that cannot be opened, created or written (unknown scheme, bad
    bucket, no access, a read-only or virtual filesystem such as /proc)."""


class OutputExistsError(OutputLocationError):
    """An output folder that already holds a finished (committed) output, which a job would
    replace: refused unless the caller asks to overwrite it."""


class OutputBusyError(OutputLocationError):
    """An output folder another live job holds the lease on (cvae.serve.lease): two writers into one
    folder would delete each other's staged files."""
