"""Who may use a cwtflow cluster: TLS credentials, scheduler addresses and scheduler files.

Loopback keeps other machines out, not other users of the same machine, and whoever can talk to
a dask scheduler can run code in it and in its workers. So a cluster cwtflow starts speaks TLS
with credentials made for it (`local_security`, `write_tls_credentials`), a scheduler file is
trusted only when it belongs to the user and nobody else can write it
(`check_scheduler_file`), and a connection is tried once, with a timeout, before a `Client` is
built (`connect`), so that a bad address fails fast with one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import dask
from distributed import Client
from distributed.security import Security

from .errors import ClusterError, InputError

__all__ = [
    "check_address",
    "check_scheduler_file",
    "client_security",
    "connect",
    "local_security",
    "resolve",
    "write_tls_credentials",
]


# --- credentials ----------------------------------------------------------------------------


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


# --- scheduler files and addresses ---------------------------------------------------------

_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")
_ADDRESS = re.compile(
    r"^(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(?P<port>\d+)$"
)


def check_address(address: Any, where: str) -> str:
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
    return check_address(content["address"], f"scheduler file {name!r}")


def client_security(address: str, security: Security | None) -> Security:
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


def connect(address: str, target: str, security: Security | None, timeout: float) -> Client:
    security = client_security(address, security)
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


def resolve(
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
    address = check_address(scheduler, "--scheduler")
    return address, f"dask scheduler at {address}"
