"""Dask cluster set-up for cwtflow runs: connect to a scheduler or start loopback workers.

A run executes either on dask's threaded scheduler in the calling process (the local default:
nothing to start, no serialisation) or on a `distributed` cluster given as a `Client`:

- `open_client(scheduler=ADDRESS)` or `open_client(scheduler_file=PATH)` connects to a running
  scheduler (see ``cluster/`` in the repository for local, HPC, Kubernetes and TLS recipes);
- `open_client(workers=N)` starts a `LocalCluster` of ``N`` worker processes bound to
  127.0.0.1 (never to a network interface unless ``host`` says so) and stops it on exit;
- `open_client()` yields ``None``: the local default.

`progress` gives a task progress bar that works in both cases (dask's local diagnostics show
nothing under a `Client`, so on a cluster a scheduler plugin counts tasks instead).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import format_dashboard_link

from .errors import InputError

__all__ = [
    "LOOPBACK",
    "TaskProgress",
    "client_summary",
    "dashboard_link",
    "open_client",
    "progress",
    "start_local_cluster",
    "worker_pids",
]

#: Interface local clusters bind to unless told otherwise.
LOOPBACK = "127.0.0.1"


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def start_local_cluster(
    n_workers: int,
    *,
    threads_per_worker: int = 1,
    memory_limit: str | int | float | None = "auto",
    host: str = LOOPBACK,
    dashboard: bool = True,
) -> LocalCluster:
    """Start a scheduler and ``n_workers`` worker processes on this machine.

    Parameters
    ----------
    n_workers : int
        Worker processes (each under a nanny that restarts it if it dies).
    threads_per_worker : int
        Threads per worker process. cwtflow tiles hold the GIL little (FFTs release it), but one
        thread per process gives the most predictable memory per tile.
    memory_limit : str or int or float or None
        Per-worker memory limit as understood by `distributed` (``"auto"`` splits the machine's
        memory between the workers, ``"4GiB"``, bytes, a fraction, or ``None`` for no limit).
    host : str
        Interface the scheduler and workers bind to; loopback by default so that nothing is
        reachable from the network.
    dashboard : bool
        Serve the scheduler dashboard on a free port of ``host`` (its pages need bokeh).

    Returns
    -------
    distributed.LocalCluster
        The running cluster; close it (or use it as a context manager) to stop the processes.
    """
    _check_count("n_workers", n_workers)
    _check_count("threads_per_worker", threads_per_worker)
    # the scheduler's HTTP server (health, metrics, dashboard pages) always runs: a free port
    # of ``host``, never a fixed one that another cluster on the machine may hold
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host=host,
        memory_limit=memory_limit,
        dashboard_address=f"{host}:0",
        scheduler_kwargs={"dashboard": dashboard},
    )


def _scheduler_has_bokeh() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def dashboard_link(client: Client) -> str | None:
    """URL of the scheduler's dashboard, or ``None`` when it serves none.

    A scheduler without bokeh still answers HTTP (health, metrics) on the dashboard port, but
    has no dashboard pages: that counts as none.
    """
    info = client.scheduler_info(n_workers=0)
    port = info.get("services", {}).get("dashboard")
    if port is None:
        return None
    try:
        pages = client.run_on_scheduler(_scheduler_has_bokeh)
    except Exception:  # a scheduler that cannot import cwtflow: assume the pages are there
        pages = True
    if not pages:
        return None
    protocol, rest = client.scheduler.address.split("://", 1)
    host = "localhost" if protocol == "inproc" else rest.rsplit(":", 1)[0]
    return format_dashboard_link(host, port)  # honours distributed.dashboard.link


def worker_pids(client: Client) -> dict[str, int]:
    """Process id of every worker, by worker address (to inspect, or to kill one in a test)."""
    return client.run(os.getpid)


def client_summary(client: Client) -> str:
    """One line describing the cluster: scheduler address, workers, threads and dashboard."""
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    link = dashboard_link(client)
    dash = f"dashboard {link}" if link else "no dashboard (install bokeh to serve one)"
    plural = "" if len(workers) == 1 else "s"
    return (
        f"dask scheduler {client.scheduler.address}: {len(workers)} worker{plural}, "
        f"{threads} threads; {dash}"
    )


@contextlib.contextmanager
def open_client(
    *,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | float | None = "auto",
    host: str = LOOPBACK,
    timeout: float = 10.0,
    echo: Callable[[str], None] | None = None,
) -> Iterator[Client | None]:
    """Client for a run, from the CLI's ``--scheduler`` / ``--scheduler-file`` / ``--workers``.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``, ``tls://...``), or the path of an
        existing scheduler file. TLS settings come from dask's configuration
        (``distributed.comm.tls``, see ``cluster/tls``).
    scheduler_file : path, optional
        Scheduler file written by ``dask scheduler --scheduler-file`` (or dask-jobqueue).
    workers : int, optional
        Start a `LocalCluster` of this many worker processes bound to ``host``; it is stopped
        when the context exits.
    threads_per_worker, memory_limit, host
        Settings of the local cluster (see `start_local_cluster`).
    timeout : float
        Seconds to wait for a scheduler to answer.
    echo : callable, optional
        Receives one line describing the cluster (address, workers, dashboard), e.g. ``print``.

    Yields
    ------
    distributed.Client or None
        ``None`` when none of ``scheduler``, ``scheduler_file``, ``workers`` is given: runs then
        use dask's threaded scheduler in this process.

    Raises
    ------
    InputError
        More than one of the three options, a missing scheduler file, a scheduler that does not
        answer within ``timeout``, or a bad worker count.
    """
    given = [
        name
        for name, value in (
            ("scheduler", scheduler),
            ("scheduler_file", scheduler_file),
            ("workers", workers),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise InputError(f"give only one of scheduler, scheduler_file, workers (got {given})")
    if not given:
        yield None
        return
    with contextlib.ExitStack() as stack:
        if workers is not None:
            _check_count("workers", workers)
            cluster = stack.enter_context(
                start_local_cluster(
                    workers,
                    threads_per_worker=threads_per_worker,
                    memory_limit=memory_limit,
                    host=host,
                )
            )
            client = stack.enter_context(Client(cluster, set_as_default=False))
        else:
            client = stack.enter_context(_connect(scheduler, scheduler_file, timeout))
        if echo is not None:
            echo(client_summary(client))
        yield client


def _connect(
    scheduler: str | None, scheduler_file: str | os.PathLike[str] | None, timeout: float
) -> Client:
    if scheduler is not None and os.path.isfile(scheduler):
        scheduler, scheduler_file = None, scheduler  # a scheduler file given as the address
    if scheduler_file is not None:
        if not os.path.isfile(scheduler_file):
            raise InputError(f"scheduler file {os.fspath(scheduler_file)!r} does not exist")
        target = f"scheduler file {os.fspath(scheduler_file)!r}"
        kwargs: dict[str, Any] = {"scheduler_file": os.fspath(scheduler_file)}
    else:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise InputError(f"scheduler address must be a non-empty string, got {scheduler!r}")
        target = f"dask scheduler at {scheduler}"
        kwargs = {"address": scheduler}
    try:
        return Client(timeout=timeout, set_as_default=False, **kwargs)
    except (OSError, TimeoutError, ValueError, TypeError, RuntimeError) as exc:
        # unreachable or refusing scheduler, bad address, TLS settings missing or rejected
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot connect to {target}: {reason}") from None


class _TaskCounter(SchedulerPlugin):
    """Scheduler plugin counting tasks scheduled and finished since it was registered.

    A task counts as done once its result is in memory; a task scheduled again after losing
    its result (a dead worker) counts as not done until it finishes again.
    """

    def __init__(self) -> None:
        self.seen: set[Any] = set()
        self.done: set[Any] = set()
        self.erred = 0

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish in ("waiting", "queued", "processing", "no-worker"):
            self.seen.add(key)
            self.done.discard(key)
        elif finish == "memory":
            self.seen.add(key)
            self.done.add(key)
        elif finish == "erred":
            self.erred += 1

    def counts(self) -> tuple[int, int, int]:
        return len(self.done), len(self.seen), self.erred


def _plugin_counts(name: str, dask_scheduler: Any = None) -> tuple[int, int, int]:
    """Run on the scheduler: (done, scheduled, erred) of the named `_TaskCounter`."""
    return dask_scheduler.plugins[name].counts()


class TaskProgress:
    """Progress bar of the tasks a `distributed` cluster runs while the context is open.

    A scheduler plugin counts tasks (whoever submits them: `CWT.analyze`, zarr writes,
    analyses), and a thread of this process polls it every ``interval`` seconds into a tqdm bar.
    The scheduler must be able to import cwtflow (true for every recipe in ``cluster/``).

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster to watch.
    file : file-like, optional
        Where the bar is drawn (stderr by default).
    interval : float
        Seconds between polls.
    desc : str
        Label of the bar.
    disable : bool
        Show nothing (the counts are still kept).
    """

    def __init__(
        self,
        client: Client,
        *,
        file: IO[str] | None = None,
        interval: float = 0.5,
        desc: str = "tasks",
        disable: bool = False,
    ) -> None:
        self.client = client
        self.file = file if file is not None else sys.stderr
        self.interval = float(interval)
        self.desc = desc
        self.disable = disable
        self.name = f"cwtflow-progress-{id(self):x}-{os.getpid()}"
        self.done = 0
        self.total = 0
        self.erred = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None

    def poll(self) -> tuple[int, int, int]:
        """Ask the scheduler for (done, scheduled, erred) and update the bar."""
        done, total, erred = self.client.run_on_scheduler(_plugin_counts, self.name)
        self.done, self.total, self.erred = done, total, erred
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()
        return done, total, erred

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a poll during shutdown is not worth a crash
                self.poll()

    def __enter__(self) -> TaskProgress:
        from tqdm.auto import tqdm

        self.client.register_plugin(_TaskCounter(), name=self.name)
        self._bar = tqdm(total=0, desc=self.desc, unit="task", file=self.file, disable=self.disable)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.client.status == "running":
                self.poll()
                self.client.unregister_scheduler_plugin(self.name)
        finally:
            if self._bar is not None:
                self._bar.close()


def progress(
    client: Client | None = None, *, file: IO[str] | None = None, disable: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """A task progress bar for computations run inside the ``with`` block.

    With a ``client``: a `TaskProgress` fed by the scheduler. Without (threaded scheduler in
    this process): tqdm's dask callback.
    """
    if client is not None:
        return TaskProgress(client, file=file, disable=disable)
    from tqdm.dask import TqdmCallback

    return TqdmCallback(desc="tasks", unit="task", file=file or sys.stderr, disable=disable)
