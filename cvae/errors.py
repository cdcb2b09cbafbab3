"""Errors about data (shards, manifests, official files), each naming the file at fault."""


class DataError(ValueError):
    """Data that cannot be trusted or used: damaged, truncated, missing or inconsistent."""
