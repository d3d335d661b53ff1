"""Writes that run behind the compute: one thread, in order, and never past a failure.

The in-memory engine's iterations (`cwtflow.store_writer`) and the tiles of a local tiled
iteration (`cwtflow.store_tiles`) are written by a `BackgroundWriter` while the next iteration
or tile computes, on the core the single-threaded FFTs leave idle. The rules that keep a store
right: the jobs run one at a time in the order given; once one fails, the later ones are
skipped (a group whose write failed is never sealed); `wait` returns when every job given so
far has ended and raises the first failure; at most ``waiting`` jobs wait, so the planes they
hold cannot pile up; after `close` a job runs in the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """One thread running write jobs behind their caller (the rules: the module docstring).

    Parameters
    ----------
    waiting : int
        Most jobs given and not yet ended; `submit` blocks beyond.
    name : str
        Name prefix of the thread (seen in profiles and tests).
    """

    def __init__(self, waiting: int, name: str) -> None:
        self._slots = threading.BoundedSemaphore(waiting)
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._error: BaseException | None = None  # the first failure since the last `wait`
        self._closed = False

    @property
    def pending(self) -> bool:
        """Jobs were given since the last `wait` (they may have ended)."""
        return bool(self._pending)

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        """Run ``job(*args)`` in the thread after the jobs given before it (skipped if one of
        them failed); blocks while ``waiting`` jobs have not ended."""
        self._slots.acquire()

        def run() -> None:
            try:
                if self._error is None:
                    try:
                        job(*args)
                    except BaseException as exc:
                        self._error = exc
            finally:
                self._slots.release()

        with self._lock:
            closed = self._closed
            if not closed:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
                self._pending.append(self._pool.submit(run))
        if closed:
            run()
            self._raise()

    def wait(self) -> None:
        """Return once every job given has ended; raise the first failure among them."""
        with self._lock:
            pending, self._pending = self._pending, []
        wait_all(pending)
        self._raise()

    def close(self, *, raise_error: bool = True) -> None:
        """`wait`, then end the thread; later jobs run in their caller. ``raise_error=False``
        (a caller already failing) waits and drops a failure."""
        with self._lock:
            pending, self._pending = self._pending, []
            pool, self._pool, self._closed = self._pool, None, True
        wait_all(pending)
        if pool is not None:
            pool.shutdown()
        if raise_error:
            self._raise()
        self._error = None  # dropped: the caller has its own

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error
