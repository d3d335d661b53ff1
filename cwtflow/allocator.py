"""Large temporary arrays from the heap in processes where the C allocator was told otherwise.

A tile task allocates and frees many arrays of a few MiB (FFT grids, planes of the state).
glibc serves an allocation above its *mmap threshold* with a fresh ``mmap``: every page of it
is faulted in (and zeroed by the kernel) when first written, and unmapped when freed. Its
default threshold is dynamic: it rises to the size of the largest block freed, up to 32 MiB on
64-bit systems, so a loop of same-size arrays soon reuses heap memory. Setting any of the
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` environment variables
freezes the threshold at 128 KiB instead — and dask's nanny sets ``MALLOC_TRIM_THRESHOLD_``
in every worker process it starts (``distributed.nanny.pre-spawn-environ``). Measured with
``benchmarks/bench_throughput.py`` on this repository's 2048-pixel map with 512-pixel tiles,
that made the same tile task take twice as long in a worker process as in the driver's threads.

`heap_for_large_arrays` restores the ceiling of glibc's dynamic threshold (32 MiB) in such a
process, once, with ``mallopt``, and keeps as much free memory at the top of each heap when it
trims one (``M_TOP_PAD``; the tasks run in threads, whose heaps are trimmed down to the pad on
every free otherwise): about the allocation pattern glibc has without the environment
variable. Memory beyond that is still given back to the system (dask's trim threshold is kept);
a worker holds its tiles' temporaries in its heap between tasks (about 80 MiB more at 512-pixel
tiles). Nothing changes where the threshold was not frozen, where the user chose one
(``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``), or on other C libraries. The tile tasks
call it (`cwtflow.tiled`), so it takes effect on any cluster's workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

__all__ = ["MMAP_THRESHOLD", "heap_for_large_arrays"]

#: The mmap threshold set: glibc's ceiling for its dynamic threshold on 64-bit systems.
MMAP_THRESHOLD = 32 * 2**20
#: ``mallopt`` parameter numbers (glibc's malloc.h): mmap threshold, top pad.
_M_MMAP_THRESHOLD, _M_TOP_PAD = -3, -2
#: Environment variables that freeze glibc's dynamic mmap threshold when set.
_FREEZING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _start_environment() -> dict[str, str]:
    """The environment this process started with (the one glibc read): a process's
    ``os.environ`` may have changed since (dask's nanny sets its variables in the process
    that starts the workers, where they have no effect on the allocator)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _frozen_by_environment() -> bool:
    """Whether this process's mmap threshold is frozen by the environment and not chosen."""
    env = _start_environment()
    if "MALLOC_MMAP_THRESHOLD_" in env or "mmap" in env.get("GLIBC_TUNABLES", ""):
        return False
    return any(name in env for name in _FREEZING)


@functools.cache
def heap_for_large_arrays() -> bool:
    """Set glibc's mmap threshold and top pad to `MMAP_THRESHOLD` if the environment froze the
    threshold at 128 KiB (see the module docstring); once per process (two threads racing
    the first call both set the same values). Returns whether this process's threshold is
    (now) set by this function."""
    if not sys.platform.startswith("linux") or not _frozen_by_environment():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TOP_PAD, MMAP_THRESHOLD)
    )
