"""What the ``cwtflow`` commands share at run time: logging to stderr (logger ``cwtflow``),
the command line for provenance records, and a run of `CWT.analyze` with per-iteration log
lines and progress bars (iterations; tasks of the current iteration on a tiled or cluster run),
drawn only on a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from .cli_options import analyze_kwargs

if TYPE_CHECKING:  # heavy modules load when a command needs them (fast --help)
    import xarray as xr
    from astropy.table import Table

    from .engine import CWT
    from .iteration import IterationInfo

__all__ = [
    "LocalTasks",
    "LogHandler",
    "analyze",
    "cluster_progress",
    "command_line",
    "find_sources_logged",
    "format_info",
    "is_tty",
    "logged_warnings",
    "logger",
    "one_line",
    "setup_logging",
    "summary",
]

logger = logging.getLogger("cwtflow")


def one_line(message: str) -> str:
    return " ".join(str(message).split())


class LogHandler(logging.Handler):
    """Log records on stderr (looked up at each record), above any progress bar; warnings
    and errors as one ``cwtflow: warning: ...`` line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                message = f"cwtflow: {record.levelname.lower()}: {one_line(message)}"
            tqdm.write(message, file=sys.stderr)
        except Exception:  # logging must never end the program
            self.handleError(record)


def setup_logging(ctx: click.Context, options: dict[str, Any]) -> bool:
    """Set the ``cwtflow`` logger's level from the command's and the group's ``--quiet`` /
    ``--verbose``; returns whether the run is quiet (no progress bars)."""
    group = ctx.find_root().params
    quiet = bool(options.pop("quiet", False) or group.get("quiet"))
    verbose = bool(options.pop("verbose", False) or group.get("verbose"))
    for handler in [h for h in logger.handlers if isinstance(h, LogHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(LogHandler())
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return quiet


def command_line() -> list[str]:
    """The command line of this invocation (``cwtflow`` and its arguments)."""
    return list(click.get_current_context().find_root().meta.get("cwtflow.argv", ["cwtflow"]))


def is_tty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def format_info(info: IterationInfo) -> str:
    ratio = "n/a" if math.isnan(info.variance_ratio) else f"{info.variance_ratio:.3e}"
    flag = " (converged)" if info.converged else ""
    return (
        f"iteration {info.iteration}: residual variance {info.residual_variance:.6g}, "
        f"variance ratio {ratio}, support {info.support_size} pixels{flag}"
    )


class LocalTasks:
    """Progress of the tasks dask's local scheduler runs (a tiled run without a cluster): one
    bar per iteration, through a dask callback."""

    def __init__(self) -> None:
        from dask.callbacks import Callback

        self._bar: Any = None
        self.restart("tasks, iteration 1")
        bar = self

        class Counter(Callback):
            def _start_state(self, dsk: Any, state: Any) -> None:
                keys = ("ready", "waiting", "running", "finished")
                bar.add(sum(len(state.get(k, ())) for k in keys))

            def _posttask(self, *args: Any) -> None:
                bar.step()

        self.callback = Counter()

    def restart(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=0, desc=desc, unit="task", file=sys.stderr, leave=False)

    def add(self, n: int) -> None:
        self._bar.total += n
        self._bar.refresh()

    def step(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def analyze(
    cwt: CWT,
    data: xr.Dataset,
    options: Mapping[str, Any],
    *,
    quiet: bool,
    on_iteration: Any = None,
) -> xr.Dataset:
    """Run `CWT.analyze` with a log line per iteration and, on a terminal (unless quiet),
    progress bars: iterations, and the tasks of the current iteration for a tiled or cluster
    run."""
    with (
        tqdm(
            total=cwt.max_iter,
            desc="CWT",
            unit="it",
            file=sys.stderr,
            disable=True if quiet else None,
            leave=False,
        ) as bar,
        cluster_progress(options, quiet=quiet) as (client, tasks),
    ):
        local = None
        if client is None and options.get("chunks") is not None and is_tty() and not quiet:
            local = tasks = LocalTasks()

        def report(info: IterationInfo) -> None:
            logger.info(format_info(info))
            bar.update(1)
            if on_iteration is not None:
                on_iteration(info)
            if tasks is not None:
                tasks.restart(f"tasks, iteration {info.iteration + 1}")

        with local.callback if local is not None else contextlib.nullcontext():
            try:
                return cwt.analyze(data, callback=report, client=client, **analyze_kwargs(options))
            finally:
                if local is not None:
                    local.close()


@contextlib.contextmanager
def cluster_progress(options: Mapping[str, Any], *, quiet: bool) -> Iterator[tuple[Any, Any]]:
    """The dask client of ``--scheduler`` / ``--workers`` (None without either: dask's threaded
    scheduler in this process), and its task progress (one bar per iteration, on a terminal)."""
    from .cluster import TaskProgress, open_client

    scheduler, workers = options.get("scheduler"), options.get("workers")
    with open_client(scheduler=scheduler, workers=workers, echo=logger.info) as client:
        if client is None:
            yield None, None
            return
        disable = quiet or not is_tty()
        with TaskProgress(client, file=sys.stderr, desc="tasks", disable=disable) as tasks:
            yield client, tasks


def summary(state: xr.Dataset) -> str:
    converged = "converged" if state.attrs.get("converged") else "not converged"
    support = state.attrs.get("support_size", "?")
    return f"{state.attrs.get('iterations', '?')} iterations, {converged}, support {support} pixels"


@contextlib.contextmanager
def logged_warnings() -> Iterator[None]:
    """Turn the `UserWarning` raised inside the block into ``cwtflow`` log warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    for warning in caught:
        logger.warning(str(warning.message))


def find_sources_logged(state: xr.Dataset, **options: Any) -> Table:
    """`cwtflow.find_sources` with its warnings as log lines."""
    from .catalog import find_sources

    with logged_warnings():
        return find_sources(state, **options)
