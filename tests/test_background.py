"""The writer thread behind the compute (cwtflow.background): order, bound, failures."""

from __future__ import annotations

import threading
import time

import pytest

from cwtflow.background import BackgroundWriter


def test_jobs_run_in_order_on_one_thread_and_at_most_waiting_wait() -> None:
    done: list[tuple[int, str]] = []
    gate = threading.Event()

    def job(i: int) -> None:
        if i == 0:
            gate.wait(5)
        done.append((i, threading.current_thread().name))

    writer = BackgroundWriter(2, "test-writer")
    writer.submit(job, 0)
    writer.submit(job, 1)
    assert writer.pending
    blocked = threading.Thread(target=writer.submit, args=(job, 2))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # two jobs have not ended: the third waits for a slot
    gate.set()
    blocked.join(5)
    writer.wait()
    assert not writer.pending
    assert [i for i, _ in done] == [0, 1, 2]
    assert {name for _, name in done} == {"test-writer_0"}
    writer.close()


def test_a_failure_skips_the_later_jobs_and_is_raised_once() -> None:
    done: list[int] = []

    def job(i: int) -> None:
        if i == 1:
            raise OSError("disk gone")
        done.append(i)

    writer = BackgroundWriter(4, "test-writer")
    for i in range(4):
        writer.submit(job, i)
    with pytest.raises(OSError, match="disk gone"):
        writer.wait()
    assert done == [0]  # 2 and 3 came after the failure: skipped (a failed write never sealed)
    writer.submit(job, 5)  # raised once: the writer goes on
    writer.wait()
    assert done == [0, 5]
    writer.submit(job, 1)
    with pytest.raises(OSError):
        writer.close()


def test_after_close_jobs_run_in_the_caller_and_close_can_stay_quiet() -> None:
    names: list[str] = []

    def job(fail: bool) -> None:
        names.append(threading.current_thread().name)
        if fail:
            raise OSError("disk gone")

    writer = BackgroundWriter(1, "test-writer")
    writer.submit(job, True)
    writer.close(raise_error=False)  # a caller already failing: waits only
    assert names == ["test-writer_0"]
    assert not any(t.name.startswith("test-writer") for t in threading.enumerate())
    writer.submit(job, False)
    assert names[-1] == threading.current_thread().name
    with pytest.raises(OSError):
        writer.submit(job, True)
