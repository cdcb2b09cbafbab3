"""Keep freed memory in the process, so big temporaries are not page-faulted in afresh.

glibc's malloc hands every block above its mmap threshold straight back to the kernel on
free, and trims the heap top above its trim threshold. The answer path makes and drops
several (rows, 4096) float64 arrays per chunk (pixel noise, probabilities; 16 MiB at the
512 rows of cvae.serve.queries.ANSWER_CHUNK), so each one came back as fresh pages: 4,000
in-process counterfactuals took 200,000 to 250,000 page faults and 0.4 to 0.6 s of kernel
time, and about 300 faults with this. Blocks above the ceiling (32 MiB) still come back fresh.
Training is the same story: every step frees and reallocates its activations and
gradients, and 240 one-thread steps at batch 64 took 1.2 M page faults (sprite) to 4.7 M
(mlp, whose 16 MiB weight gradients fall either side of glibc's moving mmap threshold, so
a process ran at 540 or at 790 images/s by luck); with this, about 85,000 and 130,000.
Both the query engine (ImageSCM) and every training worker call it.
PyTorch's CPU tuning guide makes the same point for its own tensors (it recommends jemalloc
or tcmalloc, which cannot be preloaded from inside Python).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 512 * 2**20  # freed memory kept beyond this goes back to the kernel

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once; False where the C
    library is not glibc (macOS, musl): nothing changes there."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
