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

# Minor page faults of writing a fresh 4 MiB array 50 times in a thread (a tile task runs in a
# worker's thread), before and after the call: every page faults again when each array is a
# new mapping (50 x 1024 pages), almost none when the heap is reused.
_SCRIPT = """
import resource, threading
import numpy as np
from cwtflow.allocator import heap_for_large_arrays

def faults():
    out = []
    def loop():
        start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(50):
            a = np.empty(2**19)
            a[:] = 1.0
            del a
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)
    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    return out[0]

before = faults()
changed = heap_for_large_arrays()
print(before, faults(), changed, heap_for_large_arrays())
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
    assert before > 50 * 256  # the frozen threshold maps every array afresh
    assert after < before / 20


@pytest.mark.parametrize(
    "env",
    [{}, {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}],
    ids=["not-frozen", "chosen-by-the-user"],
)
def test_left_alone(env: dict[str, str]) -> None:
    _, after, changed, again = _run(**env)
    assert not changed and not again
    if env:  # the user's threshold stays: still a mapping per array
        assert after > 50 * 256


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
