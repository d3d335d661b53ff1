"""Dask cluster set-up for cwtflow runs: connect to a scheduler or start loopback workers.

A run executes either on dask's threaded scheduler in the calling process (the local default:
nothing to start, no serialisation) or on a `distributed` cluster given as a `Client`:

- `open_client(scheduler=ADDRESS)` or `open_client(scheduler_file=PATH)` connects to a running
  scheduler (see ``cluster/`` in the repository for local, HPC, Kubernetes and TLS recipes);
- `open_client(workers=N)` starts a `LocalCluster` of ``N`` worker processes bound to
  127.0.0.1 (never to a network interface unless ``host`` says so) and stops it on exit;
- `open_client()` yields ``None``: the local default.

Security model. Loopback keeps other machines out, not other users of the same machine, and
whoever can talk to a dask scheduler can run code in it and in its workers. So a local cluster
speaks TLS with credentials made for it (`distributed.security.Security.temporary`: a key and
a self-signed certificate that exist only in this process and the worker processes it
starts): a client without them cannot connect. A scheduler file is used only if it belongs to
the user and nobody else can write it. Connections to external schedulers take their TLS
credentials from dask's configuration (``distributed.comm.tls``) or from ``security=``. All of
this lives in `cwtflow.cluster_access`.

Failures. Every failure of the cluster during the ``with`` block of `open_client` (a task that
killed its workers, a scheduler gone, no worker left for ``no_worker_timeout`` seconds) ends as
one `ClusterError`; distributed's log tracebacks of connections that broke and were repaired
(a worker killed and restarted by its nanny) are kept off stderr while the block runs
(`cwtflow.cluster_faults`).

`TaskProgress` is a task progress bar for a cluster (dask's local diagnostics show nothing under
a `Client`, so a scheduler plugin counts tasks instead).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.security import Security
from distributed.utils import format_dashboard_link

from .cluster_access import (
    check_scheduler_file,
    connect,
    local_security,
    resolve,
    write_tls_credentials,
)
from .cluster_faults import (
    NO_WORKER_TIMEOUT,
    NO_WORKER_TIMEOUT_ENV,
    NoWorkerWatchdog,
    QuietWorkerLogs,
    failure_message,
    quiet_logs,
)
from .errors import ClusterError, InputError

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "LOOPBACK",
    "NO_WORKER_TIMEOUT",
    "NO_WORKER_TIMEOUT_ENV",
    "TaskProgress",
    "check_scheduler_file",
    "client_summary",
    "dashboard_link",
    "local_security",
    "open_client",
    "start_local_cluster",
    "write_tls_credentials",
]

#: Interface local clusters bind to unless told otherwise.
LOOPBACK = "127.0.0.1"
#: Environment variable overriding the default connection timeout of `open_client` (seconds).
CONNECT_TIMEOUT_ENV = "CWTFLOW_CONNECT_TIMEOUT"
_CONNECT_TIMEOUT = 10.0


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _seconds(value: Any, env: str, default: float) -> float:
    """``value`` if given, else the environment variable ``env``, else ``default``."""
    source = "argument"
    if value is None:
        value, source = os.environ.get(env), env
        if value is None or not str(value).strip():
            return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise InputError(f"{source}: a time in seconds must be a positive number, got {value!r}")
    return seconds


# --------------------------------------------------------------------------------------------
# Local cluster


def start_local_cluster(
    n_workers: int,
    *,
    threads_per_worker: int = 1,
    memory_limit: str | int | float | None = "auto",
    host: str = LOOPBACK,
    dashboard: bool = True,
    security: Security | None = None,
) -> LocalCluster:
    """Start a scheduler and ``n_workers`` worker processes on this machine, speaking TLS.

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
        Serve the scheduler dashboard on a free port of ``host`` (its pages need bokeh). It is
        plain HTTP and read-only: other users of the machine can look at it, not run code.
    security : distributed.security.Security, optional
        Credentials of the cluster; by default `local_security` (temporary credentials known
        only to this process and its workers). Clients made with ``Client(cluster)`` get them;
        a client given only the address is refused.

    Returns
    -------
    distributed.LocalCluster
        The running cluster (``tls://`` addresses); close it (or use it as a context manager)
        to stop the processes.
    """
    _check_count("n_workers", n_workers)
    _check_count("threads_per_worker", threads_per_worker)
    security = local_security() if security is None else security
    # the scheduler's HTTP server (health, metrics, dashboard pages) always runs: a free port
    # of ``host``, never a fixed one that another cluster on the machine may hold
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host=host,
        protocol="tls://" if security.require_encryption else None,
        security=security,
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


#: The name distributed gives the worker processes its nannies start.
_WORKER_PROCESS = "Dask Worker process (from Nanny)"


def _close_quietly(
    client: Client,
    cluster: LocalCluster | None,
    timeout: float,
    cluster_timeout: float | None = None,
    spare: frozenset[int] = frozenset(),
) -> None:
    """Close ``client`` (and ``cluster``, waiting up to ``cluster_timeout`` for its processes,
    then killing its worker processes left, all but the pids ``spare``) after a failure, with
    distributed's and tornado's logs of this process muted meanwhile: a worker being restarted
    while the cluster closes makes them log broken connections."""
    with _muted("distributed", "tornado"):
        with contextlib.suppress(Exception):
            client.close(timeout=timeout)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=timeout if cluster_timeout is None else cluster_timeout)
            _stop_worker_processes(spare)


def _worker_processes() -> frozenset[int]:
    """Process ids of the dask worker processes this process started (through its nannies)."""
    children = multiprocessing.active_children()
    return frozenset(p.pid for p in children if p.name == _WORKER_PROCESS and p.pid is not None)


def _stop_worker_processes(spare: frozenset[int]) -> None:
    """Kill the dask worker processes still alive but those in ``spare`` (alive before the
    cluster started), and wait for them: a nanny restarting a worker while its cluster closes
    (slow on a loaded machine) leaves a process that starts, finds the scheduler gone and
    writes its traceback to our stderr, after the run's error line."""
    for process in multiprocessing.active_children():
        if process.name == _WORKER_PROCESS and process.pid not in spare:
            process.kill()
            process.join(timeout=10)


@contextlib.contextmanager
def _muted(*names: str) -> Iterator[None]:
    """Silence the loggers ``names`` and their children while the block runs (children too:
    distributed's configuration gives some, ``tornado.application`` say, levels of their own)."""
    known = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in names]
    loggers = [logging.getLogger(name) for name in (*names, *known)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# The client of a run


@contextlib.contextmanager
def open_client(
    *,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | float | None = "auto",
    host: str = LOOPBACK,
    timeout: float | None = None,
    security: Security | None = None,
    no_worker_timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> Iterator[Client | None]:
    """Client for a run, from the CLI's ``--scheduler`` / ``--scheduler-file`` / ``--workers``.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tls://host:8786``, ``tcp://...``), or the path of an
        existing scheduler file.
    scheduler_file : path, optional
        Scheduler file written by ``dask scheduler --scheduler-file`` (or dask-jobqueue, or
        ``cluster/local/dask-local.sh``). It must belong to the user and not be writable by
        group or others (`check_scheduler_file`).
    workers : int, optional
        Start a `LocalCluster` of this many worker processes bound to ``host``, speaking TLS
        with temporary credentials (`start_local_cluster`); it is stopped when the context
        exits.
    threads_per_worker, memory_limit, host
        Settings of the local cluster (see `start_local_cluster`).
    timeout : float, optional
        Seconds to wait for a scheduler to answer (default 10, or the environment variable
        ``CWTFLOW_CONNECT_TIMEOUT``).
    security : distributed.security.Security, optional
        Credentials: for an external scheduler, those of dask's configuration
        (``distributed.comm.tls``, see ``cluster/tls``) by default; for ``workers``, temporary
        ones (`local_security`).
    no_worker_timeout : float, optional
        Fail once the cluster has had no worker, or its scheduler has not answered, for this
        many seconds while the block runs (default 60, or the environment variable
        ``CWTFLOW_NO_WORKER_TIMEOUT``). A local cluster also waits as long for a worker its
        nanny restarts before giving the worker up (distributed's lost-worker timeout, 15 s,
        is shorter than a restart on a loaded machine can take).
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
        More than one of the three options, a bad worker count, a bad address, or a scheduler
        file that is missing, not the user's, writable by others or not a scheduler file.
    ClusterError
        A scheduler that does not answer within ``timeout`` or refuses the credentials, a local
        cluster that does not start, and every failure of the cluster inside the block: a task
        that killed its workers (`distributed.KilledWorker`), the scheduler lost, no worker for
        ``no_worker_timeout`` seconds.
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
    timeout = _seconds(timeout, CONNECT_TIMEOUT_ENV, _CONNECT_TIMEOUT)
    no_worker_timeout = _seconds(no_worker_timeout, NO_WORKER_TIMEOUT_ENV, NO_WORKER_TIMEOUT)
    cluster: LocalCluster | None = None
    spare = _worker_processes()  # any other cluster's, left alone by a close after a failure
    lost = {"distributed.deploy.lost-worker-timeout": f"{no_worker_timeout}s"}
    with quiet_logs(), dask.config.set(lost if workers is not None else {}):
        if workers is not None:
            _check_count("workers", workers)
            try:
                cluster = start_local_cluster(
                    workers,
                    threads_per_worker=threads_per_worker,
                    memory_limit=memory_limit,
                    host=host,
                    security=security,
                )
            except (InputError, ClusterError):
                raise
            except Exception as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ClusterError(f"the local dask cluster did not start: {reason}") from None
            try:
                client = Client(cluster, set_as_default=False, timeout=timeout)
            except Exception as exc:
                _close_quietly_cluster(cluster, timeout)
                raise ClusterError(f"cannot connect to the local dask cluster: {exc}") from None
        else:
            address, target = resolve(scheduler, scheduler_file)
            client = connect(address, target, security, timeout)
        try:
            if cluster is not None:
                client.register_plugin(QuietWorkerLogs(), name=QuietWorkerLogs.name)
            if echo is not None:
                echo(client_summary(client))
            with NoWorkerWatchdog(client, no_worker_timeout) as watchdog:
                try:
                    yield client
                except Exception as exc:
                    if isinstance(exc, ClusterError | InputError):
                        raise
                    message = watchdog.reason or failure_message(exc, client)
                    if message is None:
                        raise
                    raise ClusterError(message) from exc
        except ClusterError:
            # the cluster's processes are waited for, so that none writes after the error
            _close_quietly(client, cluster, min(timeout, 5.0), timeout, spare)
            raise
        except BaseException:
            _close_quietly(client, cluster, timeout, spare=spare)
            raise
        else:
            client.close()
            if cluster is not None:
                cluster.close()


def _close_quietly_cluster(cluster: LocalCluster, timeout: float) -> None:
    with _muted("distributed", "tornado"), contextlib.suppress(Exception):
        cluster.close(timeout=timeout)


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
        Show nothing (the counts are still kept). The CLI disables the bar when stderr is
        not a terminal, so that a log file gets no ``\\r`` updates.

    `restart` starts a new bar counting from the tasks seen so far (one bar per iteration).
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
        self._base = (0, 0)  # (done, total) when the current bar started

    def poll(self) -> tuple[int, int, int]:
        """Ask the scheduler for (done, scheduled, erred) and update the bar."""
        done, total, erred = self.client.run_on_scheduler(_plugin_counts, self.name)
        self.done, self.total, self.erred = done, total, erred
        if self._bar is not None:
            self._bar.total = total - self._base[1]
            self._bar.n = done - self._base[0]
            self._bar.refresh()
        return done, total, erred

    def restart(self, desc: str | None = None) -> None:
        """Close the bar and open a new one (labelled ``desc``) for the tasks to come."""
        from tqdm.auto import tqdm

        if self._bar is not None:
            self._bar.close()
        self._base = (self.done, self.total)
        self.desc = desc or self.desc
        self._bar = tqdm(total=0, desc=self.desc, unit="task", file=self.file, disable=self.disable)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a poll during shutdown is not worth a crash
                self.poll()

    def __enter__(self) -> TaskProgress:
        self.client.register_plugin(_TaskCounter(), name=self.name)
        self.restart()
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
