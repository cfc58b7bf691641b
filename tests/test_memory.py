"""The allocator's mmap threshold is fixed at start (worker.memory): a freed large buffer
goes back to the system, whatever is live around it."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from worker import memory

_PROBE = """
import ctypes, sys
from worker import memory
fixed = sys.argv[1] == "fixed"
if fixed:
    assert memory.return_large_frees()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss()
live = []
for n in range(20):
    buffer = bytearray(5 * 2**20)
    buffer[::4096] = b"x" * len(buffer[::4096])
    live.append(bytearray(2000))  # stays, above the freed buffer when it came from the heap
    del buffer
print(rss() - before)
"""


def _grown(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(done.stdout)


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="glibc's allocator only"
)
def test_a_fixed_threshold_gives_large_frees_back() -> None:
    assert memory.return_large_frees()
    # In a fresh interpreter: MiB grown after twenty 5 MiB buffers freed, a small live
    # allocation made after each (left to move, the threshold keeps about 5 MiB here).
    assert _grown("fixed") < 2
