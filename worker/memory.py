"""Memory a large message used goes back to the system once it is freed (docs/performance.md,
"Large requests: memory").

glibc serves a large allocation with a mapping of its own, unmapped when freed, but each
such free raises its threshold to the size freed: after one 5 MiB body, the next ones come
from the heap, where a small allocation left above them keeps every page below it for
good (+30 MiB after twenty, measured). A fixed threshold keeps every large buffer a
mapping of its own. Elsewhere than glibc (musl, macOS) there is no such threshold to fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3): M_MMAP_THRESHOLD; setting it at all turns the dynamic raise off. 128 KiB is
# glibc's own starting value: buffers of half the request limit and more are mapped.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def return_large_frees() -> bool:
    """Fix the allocator's mmap threshold (once, at start); False where it has none."""
    libc = _libc()
    if libc is None:
        return False
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        log.warning("could not fix the allocator's mmap threshold; memory may stay high")
    return done
