"""Keep freed memory in the process for CPU training, instead of handing it back to the kernel.

A CPU training step allocates and frees the same activation and gradient buffers, tens of megabytes each,
every step. glibc's malloc serves blocks that large with mmap and unmaps them when they are freed, so the
next step maps them again and the kernel zeroes every page on first touch. With mmap off and the heap's
top kept, freed blocks are reused, as preloading jemalloc or tcmalloc does. What it measured
(scripts/bench_allocator.py): docs/performance.md (Speed, Freed memory).

The setting lasts for the rest of the process. Other C libraries (musl, macOS, Windows) are left as they
are, and so is a process whose malloc is not glibc's (a preloaded allocator ignores mallopt).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The heap's free top is handed back only beyond this; the largest value mallopt's int takes.
KEEP_BYTES = 2**31 - 1

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; False where the C library is not glibc or refuses."""
    global _kept
    if _kept:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    _kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    return _kept


def _glibc_mallopt() -> Any:
    """glibc's mallopt, or None on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = ctypes.CDLL(None)  # the symbols already loaded: the C library the process runs on
        process.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return process.mallopt
    except (OSError, AttributeError):
        return None
