"""splitmix64 hashing of uint64 arrays: counter-based random numbers that depend only on
their inputs, never on batching or order."""
from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_parts(*parts) -> np.ndarray:
    """One uint64 hash per element of the broadcast parts, chained in order."""
    h = GOLDEN
    with np.errstate(over="ignore"):
        for part in parts:
            h = mix((h ^ np.asarray(part, dtype=np.uint64)) + GOLDEN)
    return h
