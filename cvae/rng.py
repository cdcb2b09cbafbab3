"""splitmix64 hashing of uint64 arrays: counter-based random numbers that depend only on
their inputs, never on batching or order. Every random number of the SCM, the query
generator and the evaluation comes from here."""
from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Streams of the SCM's generator: one per use, so no two uses share numbers.
STREAM_POSTERIOR = 1  # one uniform per factor (per connected component) for inverse-CDF sampling
STREAM_GUMBEL = 10  # + factor position: 1 + K uniforms for the top-down Gumbel abduction
STREAM_Z = 20  # z_dim uniforms -> normals (prior z, or the sample from q(z | x, y))
STREAM_PIXELS = 30  # 4096 uniforms: U_x
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


def seed_from_query_id(query_id: str) -> int:
    """A stable 64-bit seed for a query without one (not Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(query_id.encode("utf-8"), digest_size=8).digest(), "little")


def row_keys(seeds: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The key of (seed, sample number): all randomness of one sample derives from it."""
    seeds = np.asarray(seeds).astype(np.uint64)  # int64 seeds keep their bits
    samples = np.asarray(samples).astype(np.uint64)
    return mix(mix(seeds) ^ (samples * np.uint64(0xD1B54A32D192ED03) + GOLDEN))


def uniforms(keys: np.ndarray, stream: int, count: int) -> np.ndarray:
    """(n, count) float64 uniforms in the open interval (0, 1), from (key, stream, counter).

    Each 64-bit hash gives two 32-bit uniforms (low half first): half the hashing, and
    2^-32 resolution is ample for Gumbels, normals and pixel noise.
    """
    half = (count + 1) // 2
    with np.errstate(over="ignore"):
        base = mix(keys ^ mix(np.full(keys.shape, stream, dtype=np.uint64) + GOLDEN))
        counters = (np.arange(1, half + 1, dtype=np.uint64) * GOLDEN)[None, :]
        bits = mix(base[:, None] + counters)
    # Little-endian view: the (n, half) uint64 as (n, 2 * half) uint32, low then high halves.
    words = bits.astype("<u8", copy=False).view("<u4")[:, :count]
    out = words.astype(np.float64)
    out += 0.5
    out *= 2.0**-32
    return out


def gumbels(u: np.ndarray) -> np.ndarray:
    return -np.log(-np.log(u))
