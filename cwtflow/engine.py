"""The public CWT estimator: settings in the constructor, `CWT.analyze` runs the iteration."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from . import core
from .errors import InputError
from .kernels import CWTKernels
from .maps import is_allsky, validate_maps, wcs_from_attrs
from .state import initial_state, new_state

__all__ = ["CWT", "IterationInfo"]


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


def variance_ratio(previous: float | None, current: float) -> float:
    """``|v_prev - v| / v_prev``; NaN when there is no previous variance."""
    if previous is None:
        return math.nan
    if previous == 0:
        return 0.0 if current == 0 else math.inf
    return abs(previous - current) / previous


class CWT:
    """Iterative multi-scale wavelet filter (Terrier et al. 2001) as specified in the cwtflow
    algorithm reference.

    Parameters
    ----------
    kernels : CWTKernels
        Wavelet and approximation kernels.
    max_iter : int
        Maximum number of iterations (>= 1).
    tol : float
        Stop when the relative change of the residual variance is below ``tol``.
    significance_threshold : float
        A pixel of scale ``i`` is significant where ``T_i / E_i`` exceeds this.
    significance_island_threshold : float, optional
        Drop connected components whose maximum significance is below this.
    remove_isolated : bool
        Drop one-pixel components.
    keep_history : bool
        Keep the state before the first and after every iteration in `history`.
    wrap_lon : bool, optional
        Periodic convolutions and components in longitude. ``None`` (default) wraps exactly when
        the map is a CAR grid spanning 360 deg; ``False`` forces the reference (zero) boundary.
    fft_workers : int
        Threads scipy.fft may use per convolution (1 inside dask tiles).

    Attributes
    ----------
    history : list of xarray.Dataset
        After `analyze` with ``keep_history``: initial state, then one state per iteration.
    """

    def __init__(
        self,
        kernels: CWTKernels,
        *,
        max_iter: int = 10,
        tol: float = 1e-5,
        significance_threshold: float = 3.0,
        significance_island_threshold: float | None = None,
        remove_isolated: bool = True,
        keep_history: bool = False,
        wrap_lon: bool | None = None,
        fft_workers: int = 1,
    ) -> None:
        if not isinstance(kernels, CWTKernels):
            raise InputError(f"kernels must be a CWTKernels, got {type(kernels).__name__}")
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
            raise InputError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (np.isfinite(tol) and tol >= 0):
            raise InputError(f"tol must be a non-negative number, got {tol!r}")
        if not np.isfinite(significance_threshold):
            raise InputError(
                f"significance_threshold must be finite, got {significance_threshold!r}"
            )
        if significance_island_threshold is not None and not np.isfinite(
            significance_island_threshold
        ):
            raise InputError("significance_island_threshold must be finite or None")
        self.kernels = kernels
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.significance_threshold = float(significance_threshold)
        self.significance_island_threshold = (
            None if significance_island_threshold is None else float(significance_island_threshold)
        )
        self.remove_isolated = bool(remove_isolated)
        self.keep_history = bool(keep_history)
        self.wrap_lon = wrap_lon
        self.fft_workers = int(fft_workers)
        self.history: list[xr.Dataset] = []

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"CWT({params})"

    def parameters(self) -> dict[str, Any]:
        """All settings that determine the numbers, JSON-ready (kernels included)."""
        return {
            **self.kernels.to_dict(),
            "max_iter": self.max_iter,
            "tol": self.tol,
            "significance_threshold": self.significance_threshold,
            "significance_island_threshold": self.significance_island_threshold,
            "remove_isolated": self.remove_isolated,
            "keep_history": self.keep_history,
            "wrap_lon": self.wrap_lon,
        }

    def wraps(self, data: xr.Dataset) -> bool:
        """Whether longitude is periodic for ``data`` under this estimator's ``wrap_lon``."""
        allsky = is_allsky(wcs_from_attrs(data.attrs), (data.sizes["y"], data.sizes["x"]))
        if self.wrap_lon is None:
            return allsky
        if self.wrap_lon and not allsky:
            raise InputError("wrap_lon=True needs a CAR map spanning 360 deg of longitude")
        return bool(self.wrap_lon)

    def analyze(
        self,
        data: xr.Dataset,
        *,
        callback: Callable[[IterationInfo], None] | None = None,
    ) -> xr.Dataset:
        """Run the iteration on ``data`` and return the final state.

        Parameters
        ----------
        data : xarray.Dataset
            ``counts`` and ``background`` on (y, x) with the WCS in ``attrs["wcs"]`` (see
            `cwtflow.make_maps`, `cwtflow.read_maps`). Not modified.
        callback : callable, optional
            Called with an `IterationInfo` after every iteration (logging, progress bars).

        Returns
        -------
        xarray.Dataset
            The state after the last iteration. ``attrs`` record ``iterations``, ``converged``,
            ``residual_variance`` (one value per iteration) and the run ``parameters``.
        """
        data = validate_maps(data)
        wrap = self.wraps(data)
        step = _InMemoryStep(self, data, wrap)
        sink = _MemorySink(keep=self.keep_history)
        state = sink.start(initial_state(data, self.kernels))
        variances: list[float] = []
        converged = False
        for k in range(1, self.max_iter + 1):
            new, stats = step(state)
            state, stats = sink.write(k, new, stats)
            info = self._info(
                k,
                stats["residual_variance"],
                variances[-1] if variances else None,
                stats["support_size"],
            )
            state = sink.complete(k, state, info)
            variances.append(info.residual_variance)
            converged = info.converged
            if callback is not None:
                callback(info)
            if converged:
                break
        self.history = sink.history
        state.attrs.update(
            {
                "iterations": len(variances),
                "converged": converged,
                "residual_variance": variances,
                "parameters": self.parameters(),
            }
        )
        return state

    def _keep_mask(self, sig: np.ndarray, wrap: bool) -> np.ndarray:
        return core.clean_support(
            sig,
            self.significance_threshold,
            remove_isolated=self.remove_isolated,
            island_threshold=self.significance_island_threshold,
            wrap_x=wrap,
        )

    def _info(
        self, k: int, variance: float, previous: float | None, support_size: int
    ) -> IterationInfo:
        ratio = variance_ratio(previous, variance)
        converged = k > 1 and ratio < self.tol
        return IterationInfo(k, variance, ratio, converged, support_size)


class _InMemoryStep:
    """One iteration on whole-map numpy arrays; kernel and input spectra are kept across calls."""

    def __init__(self, cwt: CWT, data: xr.Dataset, wrap: bool) -> None:
        self.cwt = cwt
        self.wrap = wrap
        self.counts = np.asarray(data["counts"].values, dtype=np.float64)
        self.background = np.asarray(data["background"].values, dtype=np.float64)
        grid = core.fft_shape(self.counts.shape, cwt.kernels.halo, periodic=(False, wrap))
        self.spectra = core.kernel_spectra(cwt.kernels, grid)
        self.const = core.image_spectra(
            self.counts, self.background, shape=grid, workers=cwt.fft_workers
        )
        self.approx_bkg = core.convolve_approx(
            self.background, self.spectra, workers=cwt.fft_workers
        )

    def __call__(self, state: xr.Dataset) -> tuple[xr.Dataset, dict[str, Any]]:
        """The state after one more iteration, and its ``residual_variance``/``support_size``."""
        cwt = self.cwt
        model = state["model"].values
        transform, error_sq, approx = core.convolve_step(
            self.counts,
            self.background,
            model,
            state["approx"].values,
            self.spectra,
            const_spectra=self.const,
            workers=cwt.fft_workers,
        )
        error, sig = core.significance(transform, error_sq)
        support = state["support"].values.copy()
        for i in range(sig.shape[0]):
            support[i] |= cwt._keep_mask(sig[i], self.wrap)
        transform_2d, model = core.update_model(model, support, transform)
        residual = self.counts - (model + approx)
        stats = {
            "residual_variance": float(residual.var()),
            "support_size": int(support.any(axis=0).sum()),
        }
        arrays = {
            "counts": self.counts,
            "background": self.background,
            "model": model,
            "approx": approx,
            "approx_bkg": self.approx_bkg,
            "transform_2d": transform_2d,
            "transform_3d": np.ascontiguousarray(transform),
            "error": error,
            "support": support,
        }
        return new_state(state, arrays, cwt.kernels), stats


class _MemorySink:
    """Where iterations go without a store: kept in memory (all of them with ``keep``)."""

    def __init__(self, *, keep: bool) -> None:
        self.keep = keep
        self.history: list[xr.Dataset] = []

    def start(self, state: xr.Dataset) -> xr.Dataset:
        if self.keep:
            self.history.append(state)
        return state

    def write(
        self, k: int, state: xr.Dataset, stats: dict[str, Any]
    ) -> tuple[xr.Dataset, dict[str, Any]]:
        """Materialise iteration ``k``; returns the state to continue from and concrete stats."""
        return state, stats

    def complete(self, k: int, state: xr.Dataset, info: IterationInfo) -> xr.Dataset:
        """Mark iteration ``k`` done: its attrs record ``info``."""
        state.attrs.update(info.attrs())
        if self.keep:
            self.history.append(state)
        return state
