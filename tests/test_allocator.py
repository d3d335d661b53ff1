"""`cwtflow.allocator`: in a process whose environment froze glibc's mmap threshold (as dask's
nanny does for its workers), large temporaries come from the heap after the call; elsewhere
nothing changes. Each case runs in a fresh interpreter (the setting is per process)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt",
)

# Whether a fresh 4 MiB array is a mapping of its own (glibc's mallinfo2: bytes in mmapped
# chunks while it lives), in a thread (a tile task runs in a worker's thread), before and after
# the call. (Page faults would not tell: with transparent huge pages a mapping faults per 2 MiB.)
_SCRIPT = """
import ctypes, threading
import numpy as np
from cwtflow.allocator import heap_for_large_arrays

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped():
    out = []
    def loop():
        for _ in range(5):  # a few rounds: glibc's own dynamic threshold adapts on the first
            before = libc.mallinfo2().hblkhd
            a = np.empty(2**19)
            a[:] = 1.0
            out.append(libc.mallinfo2().hblkhd - before)
            del a
    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    return out[-1]

before = mapped()
changed = heap_for_large_arrays()
print(before, mapped(), changed, heap_for_large_arrays())
"""


def _run(**env: str) -> tuple[int, int, bool, bool]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    before, after, changed, again = out.stdout.split()
    return int(before), int(after), changed == "True", again == "True"


def test_frozen_threshold_is_lifted() -> None:
    before, after, changed, again = _run(MALLOC_TRIM_THRESHOLD_="65536")
    assert changed and again
    assert before >= 4 * 2**20  # the frozen threshold maps every array afresh
    assert after == 0  # from the heap


@pytest.mark.parametrize(
    "env",
    [{}, {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}],
    ids=["not-frozen", "chosen-by-the-user"],
)
def test_left_alone(env: dict[str, str]) -> None:
    _, after, changed, again = _run(**env)
    assert not changed and not again
    # glibc's dynamic threshold serves the array from the heap; the user's stays: a mapping
    assert (after >= 4 * 2**20) if env else (after == 0)


def test_variables_set_after_start_do_not_count() -> None:
    """dask's nanny sets its variables in the process that starts the workers, where the
    allocator never read them: nothing to undo there."""
    script = (
        "import os; os.environ['MALLOC_TRIM_THRESHOLD_'] = '65536'\n"
        "from cwtflow.allocator import heap_for_large_arrays\n"
        "print(heap_for_large_arrays())"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=clean, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False"]
