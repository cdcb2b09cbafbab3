"""cvae.malloc: with glibc, freed big blocks stay in the process (no fresh page faults)."""
import platform
import subprocess
import sys

# Six live 16 MiB arrays (96 MiB), all freed, five times over: glibc's defaults trim the
# heap beyond twice its last mmap size after each round, so every round faults most of
# the memory in again; with keep_freed_memory the later rounds reuse it.
PROBE = """
import resource, sys
import numpy as np
from cvae.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def round_():
    arrays = [np.ones(2 * 2**20) for _ in range(6)]
    return sum(a[-1] for a in arrays)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_keep_freed_memory_stops_the_page_faults_of_big_temporaries():
    if platform.libc_ver()[0] != "glibc":
        from cvae.malloc import keep_freed_memory

        assert keep_freed_memory() is False  # nothing to tune there, and it says so
        return
    pages = 6 * 16 * 2**20 // 4096 * 4  # every page of every round
    default, kept = faults("default"), faults("keep")
    assert default > pages // 20, f"glibc's defaults faulted only {default} pages: the probe shows nothing"
    assert kept < pages // 200, f"{kept} page faults in four rounds with freed memory kept"
