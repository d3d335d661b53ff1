"""Failures of a cluster during a run, made into one `ClusterError` each, and quiet logs.

- `NoWorkerWatchdog`: a thread that fails the run's pending tasks once the cluster has had no
  worker (or no answering scheduler) for a set time, instead of waiting forever;
- `failure_message`: one line for a task that killed its workers, a lost scheduler, cancelled
  tasks or a time-out;
- `quiet_logs` and `QuietWorkerLogs`: distributed's tracebacks of connections that broke and
  were repaired (a worker killed and restarted by its nanny) stay off stderr while a run lasts,
  in this process and in the worker processes of a local cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from distributed import Client
from distributed.comm import CommClosedError
from distributed.diagnostics.plugin import WorkerPlugin

__all__ = [
    "NO_WORKER_TIMEOUT",
    "NO_WORKER_TIMEOUT_ENV",
    "NoWorkerWatchdog",
    "QuietWorkerLogs",
    "failure_message",
    "quiet_logs",
]

#: Seconds a run waits with no worker in the cluster before failing with `ClusterError`.
NO_WORKER_TIMEOUT = 60.0
#: Environment variable overriding `NO_WORKER_TIMEOUT` (seconds).
NO_WORKER_TIMEOUT_ENV = "CWTFLOW_NO_WORKER_TIMEOUT"


class NoWorkerWatchdog:
    """Thread failing the client's pending futures once the cluster has had no worker (or no
    reachable scheduler) for ``timeout`` seconds; `reason` then says why."""

    def __init__(self, client: Client, timeout: float, interval: float | None = None) -> None:
        self.client = client
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4) if interval is None else interval
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cwtflow-watchdog", daemon=True)

    def __enter__(self) -> NoWorkerWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)  # a daemon stuck in a call may stay

    def _workers(self) -> int | None:
        """Number of workers, ``None`` if the scheduler does not answer."""
        if self.client.status != "running":
            return None
        try:
            return len(self.client.nthreads())
        except Exception:
            return None

    def _run(self) -> None:
        since = time.monotonic()
        while not self._stop.wait(self.interval):
            workers = self._workers()
            if workers:
                since = time.monotonic()
                continue
            if time.monotonic() - since < self.timeout:
                continue
            address = getattr(self.client.scheduler, "address", "?")
            what = "no worker" if workers == 0 else "no answer from the scheduler"
            self.reason = (
                f"the dask cluster at {address} has had {what} for {self.timeout:g} s "
                f"({NO_WORKER_TIMEOUT_ENV} sets this limit)"
            )
            self._fail_pending()
            return

    def _fail_pending(self) -> None:
        reason = self.reason

        def cancel() -> None:
            for state in list(self.client.futures.values()):
                state.cancel(reason=reason, msg=reason)

        with contextlib.suppress(Exception):
            self.client.loop.add_callback(cancel)


def failure_message(exc: BaseException, client: Client) -> str | None:
    """One line saying how the cluster failed, or ``None`` if ``exc`` is not a cluster failure."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    address = getattr(client.scheduler, "address", "?")
    if isinstance(exc, KilledWorker):
        return (
            f"task {exc.task!r} was running on {exc.allowed_failures + 1} workers that died "
            f"(last {exc.last_worker.address}); the cluster at {address} kills it every time "
            "(out of memory?)"
        )
    if isinstance(exc, CommClosedError) or (
        isinstance(exc, OSError | asyncio.CancelledError | TimeoutError)
        and client.status != "running"
    ):
        return f"lost the dask scheduler at {address} ({type(exc).__name__}: {exc})"
    if isinstance(exc, FutureCancelledError):
        return f"tasks were cancelled on the dask cluster at {address}: {exc}"
    if isinstance(exc, TimeoutError):
        return f"the dask cluster at {address} did not answer in time: {exc}"
    return None


#: Log records of broken connections that the cluster repairs (a dead worker's peers, its
#: heartbeats): tracebacks on stderr that say nothing a failed run does not say itself.
_TRANSIENT = re.compile(
    r"Worker stream died|during heartbeat|Failed to reconnect|Connection to .* closed|"
    r"Stream is closed|Nanny .* failed to start|Worker process .* (was killed|exited)|"
    r"Restarting worker|Failed to communicate|Removing worker .* caused the cluster to lose|"
    r"Waiting to connect|Unable to connect|Received heartbeat from unregistered|"
    r"Timed out trying to connect|Lost connection|Close client connection|"
    r"marked as failed because \d+ workers died"
)


class _QuietFilter(logging.Filter):
    """Drops distributed's log records of transient connection failures."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError | asyncio.CancelledError):  # CommClosedError is an OSError
            return False
        try:
            message = record.getMessage()
        except Exception:
            return True
        return _TRANSIENT.search(message) is None


_FILTER = _QuietFilter()


def _quiet_handlers() -> list[logging.Handler]:
    handlers = []
    for name in ("distributed", ""):
        handlers.extend(logging.getLogger(name).handlers)
    return handlers


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Keep `_QuietFilter` on the handlers of distributed's logs while the block runs."""
    handlers = [h for h in _quiet_handlers() if _FILTER not in h.filters]
    for handler in handlers:
        handler.addFilter(_FILTER)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_FILTER)


class QuietWorkerLogs(WorkerPlugin):
    """`_QuietFilter` in the worker processes of a local cluster (they share our stderr); the
    scheduler hands the plugin to workers that a nanny restarts as well."""

    name = "cwtflow-quiet-logs"

    def setup(self, worker: Any) -> None:
        for handler in _quiet_handlers():
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)

    def teardown(self, worker: Any) -> None:
        for handler in _quiet_handlers():
            handler.removeFilter(_FILTER)
