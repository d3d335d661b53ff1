"""One writer at a time: the lock file of a run's zarr store.

A process that writes a store (a run, ``cwtflow catalog`` keeping its catalog) first creates
``<store>/cwtflow.lock`` atomically (``O_CREAT | O_EXCL``) with its owner: host, pid, the
process's start time and a random token. It removes the file when done, on errors too; a
second writer finds the file and is refused with a `StoreError` naming the owner.

A lock outlives its owner only when that process was killed. Such a lock is *stale* when it
was taken on this host and its pid is gone, or belongs to a process with another start time
(a reused pid); the next writer takes a stale lock over with a warning. A lock taken on
another host cannot be checked from here: it is refused, and once its owner is known to be
gone it is broken with ``cwtflow unlock <store>`` (`break_lock`) or by deleting the file.

Taking over is race-free enough for a stale lock wanted by two writers at once: the file is
renamed away (one rename wins), checked to be the stale one (else put back), then created anew
with ``O_EXCL``. A writer also checks that it still owns the lock before each completion
marker it writes (`StoreLock.check`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import StoreError

__all__ = ["LOCK_NAME", "LockOwner", "StoreLock", "break_lock", "read_lock"]

LOCK_NAME = "cwtflow.lock"
#: Start times of one process agree to the clock tick; a reused pid starts later than this.
_START_TOLERANCE = 0.5
#: How long a lock file that is being created (empty, partial) is waited for.
_CREATING_WAIT = 2.0

logger = logging.getLogger(__name__)


def _start_time(pid: int) -> float | None:
    """Start time (seconds since the epoch) of process ``pid``; None when there is none."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is installed where tests run
        return _proc_start_time(pid)
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # alive, start time hidden: assume it is the owner
        return float("nan")


def _proc_start_time(pid: int) -> float | None:  # pragma: no cover - psutil fallback
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return float("nan")
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LockOwner:
    """Who holds a store's lock."""

    host: str
    pid: int
    started: float
    token: str
    created: str = ""

    @classmethod
    def me(cls) -> LockOwner:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            started=_start_time(pid) or 0.0,
            token=uuid.uuid4().hex,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.created or '?'}"

    def is_stale(self) -> bool:
        """Taken on this host by a process that is gone (or a reused pid); never for another
        host (that cannot be checked from here)."""
        if self.host != socket.gethostname():
            return False
        started = _start_time(self.pid)
        if started is None:
            return True
        return started == started and abs(started - self.started) > _START_TOLERANCE


def read_lock(store: str | os.PathLike[str]) -> LockOwner | None:
    """The owner of the lock of ``store``; None when it is not locked.

    Raises StoreError when the lock file is unreadable (not written by cwtflow, or left empty
    by a process killed while creating it and older than a few seconds).
    """
    path = Path(store) / LOCK_NAME
    deadline = time.monotonic() + _CREATING_WAIT
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the lock file {path}: {exc}") from None
        try:
            data = json.loads(text)
            return LockOwner(
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=float(data["started"]),
                token=str(data["token"]),
                created=str(data.get("created", "")),
            )
        except (ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{store}: unreadable lock file {path}; if no cwtflow process writes this "
                    f"store, remove it with `cwtflow unlock {store}`"
                ) from None
            time.sleep(0.05)  # being written by its creator


def break_lock(store: str | os.PathLike[str]) -> LockOwner | None:
    """Remove the lock of ``store`` (``cwtflow unlock``); returns the owner it named.

    Refused when the owner is a live process on this host. The caller vouches that an owner
    on another host is gone.
    """
    path = Path(store) / LOCK_NAME
    try:
        owner = read_lock(store)
    except StoreError:
        path.unlink(missing_ok=True)
        return None
    if owner is None:
        return None
    if owner.host == socket.gethostname() and not owner.is_stale():
        raise StoreError(
            f"{store} is being written by a running process ({owner.describe()}); "
            "stop it instead of unlocking"
        )
    path.unlink(missing_ok=True)
    return owner


class StoreLock:
    """The lock of one store, held by this process between `acquire` and `release`."""

    def __init__(self, store: str | os.PathLike[str]) -> None:
        self.store = Path(store)
        self.path = self.store / LOCK_NAME
        self.owner: LockOwner | None = None
        self._finalizer: Any = None

    @property
    def held(self) -> bool:
        return self.owner is not None

    def acquire(self) -> StoreLock:
        """Take the lock (taking over a stale one); StoreError naming the owner otherwise."""
        if self.owner is not None:
            return self
        me = LockOwner.me()
        for _ in range(20):
            if self._create(me):
                self.owner = me
                self._finalizer = weakref.finalize(self, _remove_if_owned, self.path, me.token)
                return self
            current = read_lock(self.store)
            if current is None:
                continue  # released meanwhile
            if current.is_stale():
                self._take_over(current)
                continue
            if current.host != socket.gethostname():
                raise StoreError(
                    f"{self.store} is locked by {current.describe()}; if that process is gone, "
                    f"break the lock with `cwtflow unlock {self.store}` (or delete {self.path})"
                )
            raise StoreError(
                f"{self.store} is being written by another cwtflow process "
                f"({current.describe()}); one writer at a time"
            )
        raise StoreError(f"{self.store}: could not take the lock {self.path}")

    def check(self) -> None:
        """Refuse to go on when the lock is no longer this process's."""
        current = read_lock(self.store)
        if self.owner is None or current is None or current.token != self.owner.token:
            held = "nobody" if current is None else current.describe()
            raise StoreError(f"{self.store}: this writer lost its lock (now held by {held})")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.owner = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _create(self, me: LockOwner) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(me), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: LockOwner) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another writer took it over first
        try:
            taken = json.loads(aside.read_text()).get("token")
        except (OSError, ValueError, AttributeError):
            taken = None
        if taken != stale.token:  # renamed a fresh lock of another writer: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            logger.warning(
                "%s: taking over the stale lock of %s (that process is gone)",
                self.store,
                stale.describe(),
            )
        aside.unlink(missing_ok=True)


def _remove_if_owned(path: Path, token: str) -> None:
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
