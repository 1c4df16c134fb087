"""Process-wide settings that make CPU training faster: keep freed memory in the process.

A NiN training step on a CPU allocates and frees the same tens of MB of activations every step. glibc's
malloc serves blocks that large with ``mmap`` and hands them back with ``munmap`` when freed, so every step
the kernel maps fresh pages and zeroes them again: measured here, 3–5 s of system time per 18 steps and
roughly a fifth of the step (docs/performance.md). `keep_freed_memory` tells glibc to serve large blocks from
its heap and never to trim the heap, so the pages of one step are reused by the next. Memory use then stays
at the peak of a step instead of falling between steps; nothing else changes.

    from nin.runtime import keep_freed_memory
    keep_freed_memory()          # once, early; `nin train`, `nin evaluate`, `nin predict` and `nin bench` call it

Set ``NIN_KEEP_FREED_MEMORY=0`` to leave malloc as it is. Off Linux/glibc the call does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse (no mmap for large blocks, no heap trimming).

    Returns True when the setting is in force (now or from an earlier call), False when it was not applied:
    not glibc, or ``NIN_KEEP_FREED_MEMORY=0``. Idempotent; affects allocations made after the call.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("NIN_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Order matters: with mmap off first, no large block allocated in between can be mmapped.
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
