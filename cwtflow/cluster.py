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
credentials from dask's configuration (``distributed.comm.tls``) or from ``security=``.

Failures. Every failure of the cluster during the ``with`` block of `open_client` (a task that
killed its workers, a scheduler gone, no worker left for ``no_worker_timeout`` seconds) ends as
one `ClusterError`; distributed's log tracebacks of connections that broke and were repaired
(a worker killed and restarted by its nanny) are kept off stderr while the block runs.

`TaskProgress` is a task progress bar for a cluster (dask's local diagnostics show nothing under
a `Client`, so a scheduler plugin counts tasks instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import dask
from distributed import Client, LocalCluster
from distributed.comm import CommClosedError
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.security import Security
from distributed.utils import format_dashboard_link

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
#: Seconds a run waits with no worker in the cluster before failing with `ClusterError`.
NO_WORKER_TIMEOUT = 60.0
#: Environment variable overriding `NO_WORKER_TIMEOUT` (seconds).
NO_WORKER_TIMEOUT_ENV = "CWTFLOW_NO_WORKER_TIMEOUT"
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
# Credentials


def _configured_tls() -> bool:
    """dask's configuration names TLS certificates (e.g. ``cluster/tls/dask-tls.yaml``)."""
    return bool(dask.config.get("distributed.comm.tls.ca-file", None))


def local_security() -> Security:
    """Security of a cluster started by this process: the TLS certificates of dask's
    configuration when it names some (``cluster/tls``), else temporary credentials made for
    this cluster alone (`Security.temporary`); encryption and authentication are required
    either way."""
    if _configured_tls():
        return Security(require_encryption=True)
    try:
        return Security.temporary()
    except ImportError as exc:  # pragma: no cover - cryptography is a dependency of cwtflow
        raise ClusterError(
            "TLS credentials for the cluster need the 'cryptography' package (pip install "
            "cryptography)"
        ) from exc


def write_tls_credentials(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Write temporary TLS credentials for a cluster of separate processes into ``directory``.

    The directory is created readable by its owner only (``0700``); the self-signed
    certificate (``cert.pem``) and its key (``key.pem``) are written ``0600``. Returns the dask
    configuration, as environment variables, that makes a scheduler, its workers and its
    clients use them (``DASK_DISTRIBUTED__COMM__TLS__...``; `distributed` reads them at
    import). Whoever can read the key can use the cluster: keep the directory private.
    """
    folder = Path(directory).expanduser()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise ClusterError(f"credentials folder {folder} belongs to another user")
    os.chmod(folder, 0o700)
    try:
        temporary = Security.temporary()
    except ImportError as exc:  # pragma: no cover - cryptography is a dependency of cwtflow
        raise ClusterError("TLS credentials need the 'cryptography' package") from exc
    files = {"cert.pem": temporary.tls_ca_file, "key.pem": temporary.tls_client_key}
    for name, text in files.items():
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    prefix = "DASK_DISTRIBUTED__COMM__"
    env = {f"{prefix}REQUIRE_ENCRYPTION": "True", f"{prefix}TLS__CA_FILE": cert}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"{prefix}TLS__{role}__CERT"] = cert
        env[f"{prefix}TLS__{role}__KEY"] = key
    return env


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


# --------------------------------------------------------------------------------------------
# Scheduler files and addresses

_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")
_ADDRESS = re.compile(
    r"^(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(?P<port>\d+)$"
)


def _check_address(address: Any, where: str) -> str:
    """A scheduler address ``scheme://host:port``, refused early with one clear message."""
    if not isinstance(address, str) or not address.strip():
        raise InputError(f"{where}: scheduler address must be a non-empty string, got {address!r}")
    match = _ADDRESS.match(address.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise InputError(
            f"{where}: {address!r} is neither a scheduler address (tls://host:port, "
            "tcp://host:port) nor an existing scheduler file"
        )
    scheme = match["scheme"] or dask.config.get("distributed.comm.default-scheme", "tcp")
    if scheme not in _SCHEMES:
        raise InputError(f"{where}: unknown protocol {scheme!r} in scheduler address {address!r}")
    return f"{scheme}://{match['host']}:{match['port']}"


def check_scheduler_file(path: str | os.PathLike[str]) -> str:
    """Address of the scheduler named in a scheduler file the user can trust.

    The file must exist, belong to the user running cwtflow, not be writable by group or
    others (whoever can write it could point the run at a scheduler of theirs), and hold the
    JSON that ``dask scheduler --scheduler-file`` writes. The checks apply to the file that is
    read (its open descriptor), not to whatever the path names a moment later.

    Raises
    ------
    InputError
        Missing, foreign, writable by others, or not a scheduler file.
    """
    name = os.fspath(path)
    try:
        fd = os.open(os.path.expanduser(name), os.O_RDONLY | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise InputError(f"scheduler file {name!r} is missing (no such file)") from None
    except OSError as exc:
        raise InputError(f"cannot read scheduler file {name!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"scheduler file {name!r} is not a regular file")
        if info.st_uid != os.getuid():
            raise InputError(
                f"refusing scheduler file {name!r}: it belongs to user id {info.st_uid}, not to "
                f"you ({os.getuid()}); only a file you own can name your scheduler"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InputError(
                f"refusing scheduler file {name!r}: group or others can write it (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); make it private with chmod go-w"
            )
        raw = f.read(1 << 20)
    try:
        content = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        content = None
    if not isinstance(content, dict) or "address" not in content:
        raise InputError(
            f"scheduler file {name!r} is not a dask scheduler file (JSON with an 'address')"
        )
    return _check_address(content["address"], f"scheduler file {name!r}")


def _client_security(address: str, security: Security | None) -> Security:
    security = Security() if security is None else security
    if address.startswith("tls://") and not (security.tls_ca_file and security.tls_client_cert):
        raise ClusterError(
            f"the scheduler at {address} speaks TLS and no client credentials are configured: "
            "set distributed.comm.tls (ca-file, client cert and key) in dask's configuration "
            "or environment (e.g. source the tls.env of cluster/local/dask-local.sh)"
        )
    return security


async def _probe(address: str, security: Security, timeout: float) -> None:
    """Open and close one connection to ``address`` (TLS handshake included)."""
    from distributed.comm import connect

    comm = await connect(address, timeout=timeout, **security.get_connection_args("client"))
    await comm.close()


def _connect(address: str, target: str, security: Security | None, timeout: float) -> Client:
    security = _client_security(address, security)
    started = time.monotonic()
    try:
        # a bare connection first: fails fast and cleanly where a half-built Client would
        # linger (and complain from its __del__) after refusing to connect
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            asyncio.run(asyncio.wait_for(_probe(address, security, timeout), timeout + 1))
        left = max(timeout - (time.monotonic() - started), 1.0)
        return Client(address, timeout=left, security=security, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError, RuntimeError) as exc:
        # unreachable or refusing scheduler, TLS credentials missing or rejected
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"cannot connect to {target}: {reason}") from None


# --------------------------------------------------------------------------------------------
# Failures: watchdog, error translation, quiet logs


class _NoWorkerWatchdog:
    """Thread failing the client's pending futures once the cluster has had no worker (or no
    reachable scheduler) for ``timeout`` seconds; `reason` then says why."""

    def __init__(self, client: Client, timeout: float, interval: float | None = None) -> None:
        self.client = client
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4) if interval is None else interval
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cwtflow-watchdog", daemon=True)

    def __enter__(self) -> _NoWorkerWatchdog:
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


def _failure_message(exc: BaseException, client: Client) -> str | None:
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
def _quiet_logs() -> Iterator[None]:
    """Keep `_QuietFilter` on the handlers of distributed's logs while the block runs."""
    handlers = [h for h in _quiet_handlers() if _FILTER not in h.filters]
    for handler in handlers:
        handler.addFilter(_FILTER)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_FILTER)


class _QuietWorkerLogs(WorkerPlugin):
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


def _close_quietly(client: Client, cluster: LocalCluster | None, timeout: float) -> None:
    with contextlib.suppress(Exception):
        client.close(timeout=timeout)
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close(timeout=timeout)


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
        ``CWTFLOW_NO_WORKER_TIMEOUT``).
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
    with _quiet_logs():
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
            address, target = _resolve(scheduler, scheduler_file)
            client = _connect(address, target, security, timeout)
        try:
            if cluster is not None:
                client.register_plugin(_QuietWorkerLogs(), name=_QuietWorkerLogs.name)
            if echo is not None:
                echo(client_summary(client))
            with _NoWorkerWatchdog(client, no_worker_timeout) as watchdog:
                try:
                    yield client
                except Exception as exc:
                    if isinstance(exc, ClusterError | InputError):
                        raise
                    message = watchdog.reason or _failure_message(exc, client)
                    if message is None:
                        raise
                    raise ClusterError(message) from exc
        except ClusterError:
            _close_quietly(client, cluster, min(timeout, 5.0))
            raise
        except BaseException:
            _close_quietly(client, cluster, timeout)
            raise
        else:
            client.close()
            if cluster is not None:
                cluster.close()


def _close_quietly_cluster(cluster: LocalCluster, timeout: float) -> None:
    with contextlib.suppress(Exception):
        cluster.close(timeout=timeout)


def _resolve(
    scheduler: str | None, scheduler_file: str | os.PathLike[str] | None
) -> tuple[str, str]:
    """(address, description) of ``--scheduler`` (address or file) or a scheduler file."""
    if scheduler is not None and isinstance(scheduler, str) and "://" not in scheduler:
        if os.path.lexists(os.path.expanduser(scheduler)) or scheduler.endswith(".json"):
            scheduler, scheduler_file = None, scheduler  # a scheduler file given as the address
    if scheduler_file is not None:
        name = os.fspath(scheduler_file)
        address = check_scheduler_file(name)
        return address, f"dask scheduler at {address} (scheduler file {name!r})"
    address = _check_address(scheduler, "--scheduler")
    return address, f"dask scheduler at {address}"


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
