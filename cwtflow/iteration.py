"""What one CWT iteration needs and reports, and the contract of the parts of a run.

`CWT.analyze` (`cwtflow.engine`) drives a run from three parts that know nothing of each other
or of the estimator:

- its `Settings`, one frozen value built once by the estimator and handed down (kernels, the
  `cwtflow.core.Cleaning` rule, stopping rule, history, longitude wrap, FFT threads);
- a `Step`, which computes the state after one more iteration (whole map in memory, or tiles
  through dask: `cwtflow.tiled`);
- a `Sink`, which materialises each new state and keeps the iterations (in memory, or a zarr
  store: `cwtflow.store_writer`).

Each iteration is reported as an `IterationInfo`; `run_summary` turns the reports into the attrs
of a final state, the same for a run just finished and for a run read back from its store
(`cwtflow.history`), and `iteration_table` into the table both show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import xarray as xr
from astropy.table import Table

from .core import Cleaning
from .kernels import CWTKernels

__all__ = [
    "IterationInfo",
    "Settings",
    "Sink",
    "Step",
    "iteration_table",
    "run_summary",
    "variance_ratio",
]


@dataclass(frozen=True)
class Settings:
    """Everything that determines a run, as one immutable value (see `cwtflow.engine.CWT`)."""

    kernels: CWTKernels
    cleaning: Cleaning
    max_iter: int = 10
    tol: float = 1e-5
    keep_history: bool = False
    wrap_lon: bool | None = None
    fft_workers: int = 1
    #: "float64" (the exact path) or "float32" (half the memory and bytes, faster FFTs)
    dtype: str = "float64"
    #: Gaussian PSF sigma (deg) the run was set up for (``CWT(psf=...)``), or None; it does
    #: not change the iteration, it lets the catalog find the PSF in the result or store.
    psf_sigma_deg: float | None = None

    def parameters(self) -> dict[str, Any]:
        """All settings that determine the numbers, JSON-ready (kernels included); the
        spelling stored in result files and stores."""
        return {
            **self.kernels.to_dict(),
            "max_iter": self.max_iter,
            "tol": self.tol,
            "significance_threshold": self.cleaning.threshold,
            "significance_island_threshold": self.cleaning.island_threshold,
            "remove_isolated": self.cleaning.remove_isolated,
            "keep_history": self.keep_history,
            "wrap_lon": self.wrap_lon,
            "dtype": self.dtype,
            "psf_sigma_deg": self.psf_sigma_deg,
        }


@dataclass(frozen=True)
class IterationInfo:
    """What one iteration reports: its number (1-based), the residual variance, the relative
    change of that variance (NaN for the first iteration), convergence, and the support size
    (pixels in the 2-D support)."""

    iteration: int
    residual_variance: float
    variance_ratio: float
    converged: bool
    support_size: int

    def attrs(self) -> dict[str, Any]:
        """JSON-ready form stored in the attrs of the state after this iteration."""
        ratio = None if math.isnan(self.variance_ratio) else self.variance_ratio
        return {
            "iteration": self.iteration,
            "residual_variance": self.residual_variance,
            "variance_ratio": ratio,
            "converged": self.converged,
            "support_size": self.support_size,
        }

    @classmethod
    def from_attrs(cls, row: Any) -> IterationInfo:
        """The inverse of `attrs` (raises KeyError, TypeError or ValueError on a bad row)."""
        ratio = row["variance_ratio"]
        return cls(
            iteration=int(row["iteration"]),
            residual_variance=float(row["residual_variance"]),
            variance_ratio=math.nan if ratio is None else float(ratio),
            converged=bool(row["converged"]),
            support_size=int(row["support_size"]),
        )


def variance_ratio(previous: float | None, current: float) -> float:
    """``|v_prev - v| / v_prev``; NaN when there is no previous variance."""
    if previous is None:
        return math.nan
    if previous == 0:
        return 0.0 if current == 0 else math.inf
    return abs(previous - current) / previous


def run_summary(infos: Sequence[IterationInfo], parameters: dict[str, Any]) -> dict[str, Any]:
    """Attrs of a run's final state: ``iterations``, ``converged``, ``residual_variance`` (one
    value per iteration), the run ``parameters`` and the per-iteration ``table`` (as
    `IterationInfo.attrs`)."""
    return {
        "iterations": len(infos),
        "converged": bool(infos and infos[-1].converged),
        "residual_variance": [i.residual_variance for i in infos],
        "parameters": parameters,
        "table": [i.attrs() for i in infos],
    }


def iteration_table(infos: Sequence[IterationInfo]) -> Table:
    """Per-iteration statistics (iterations 1..n): residual variance, variance ratio,
    converged, support size (pixels)."""
    return Table(
        rows=[
            (i.iteration, i.residual_variance, i.variance_ratio, i.converged, i.support_size)
            for i in infos
        ],
        names=("iteration", "residual_variance", "variance_ratio", "converged", "support_size"),
        dtype=(np.int64, np.float64, np.float64, bool, np.int64),
    )


class Step(Protocol):
    """One iteration: ``step(state) -> (new_state, moments)``.

    ``new_state`` holds every `cwtflow.state.STATE_VARS` (numpy, or lazy dask); ``moments`` is
    `cwtflow.core.residual_moments` of the map (shape (4,)) or of each tile (lazy, (ty, tx,
    4)), merged by `cwtflow.core.combine_moments`.
    """

    def __call__(self, state: xr.Dataset) -> tuple[xr.Dataset, Any]: ...

    def tile_work(self, align: tuple[int, int]) -> Any:
        """The next iteration as functions of one tile (`cwtflow.tiled.TileWork`) for a sink
        that holds the previous state and runs it tile by tile, or None (whole map, or tile
        edges that are not multiples of the sink's chunks ``align``); taking it counts as
        taking the step."""
        ...


class Sink(Protocol):
    """Where the iterations of a run go: `start`, then `write` and `complete` per iteration,
    `finish` and `close` at the end."""

    def start(
        self, state: xr.Dataset, *, checks: dict[str, Any] | None = None
    ) -> tuple[xr.Dataset, list[IterationInfo]]:
        """The state to continue from (``state`` is the initial one) and the iterations
        already done (a resumed run). ``checks``: `cwtflow.maps.pixel_checks` of a lazy input,
        to compute in the same computation as the first read of the inputs and pass to
        `cwtflow.maps.raise_pixel_errors` (None: the input was checked already)."""
        ...

    def write(
        self,
        k: int,
        state: xr.Dataset,
        moments: Any,
    ) -> tuple[xr.Dataset, np.ndarray]:
        """Materialise iteration ``k``; the state to continue from and the moments (numpy)."""
        ...

    def complete(self, k: int, state: xr.Dataset, info: IterationInfo) -> xr.Dataset:
        """Mark iteration ``k`` done with its ``info``; the state, its attrs updated."""
        ...

    def finish(self, state: xr.Dataset) -> xr.Dataset:
        """The final state (``state``, the last one `complete` returned, or the same values as
        the sink keeps them), once everything the sink writes is written."""
        ...

    @property
    def history(self) -> list[xr.Dataset]:
        """The states kept (with ``keep_history``: the initial one, then every iteration)."""
        ...

    def close(self) -> None:
        """Release what the sink holds (a store's lock), after the run or on an error."""
        ...
