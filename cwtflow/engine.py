"""The public CWT estimator: settings in the constructor, `CWT.analyze` runs the iteration."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import xarray as xr

from . import core
from .errors import InputError
from .iteration import IterationInfo, Settings, Sink, Step, run_summary, variance_ratio
from .kernels import CWTKernels
from .maps import is_allsky, validate_maps, wcs_from_attrs
from .psf import as_psf
from .state import initial_state, new_state
from .store_writer import ZarrSink
from .tiled import TiledStep

__all__ = ["CWT"]


class CWT:
    """Iterative multi-scale wavelet filter (Terrier et al. 2001) as specified in
    ``docs/algorithm.md``.

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
    psf : astropy Quantity or cwtflow.psf.PSF, optional
        The instrument's PSF (a Gaussian sigma as an angle, e.g. ``0.15 * u.deg``). It does not
        change the iteration: it is recorded in the run's parameters (``psf_sigma_deg``, in
        result files and stores) so that `cwtflow.find_sources` uses it. Build matching
        kernels with `CWTKernels.from_psf`.

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
        psf: Any = None,
    ) -> None:
        if not isinstance(kernels, CWTKernels):
            raise InputError(f"kernels must be a CWTKernels, got {type(kernels).__name__}")
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
            raise InputError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (np.isfinite(tol) and tol >= 0):
            raise InputError(f"tol must be a non-negative number, got {tol!r}")
        if not (np.isfinite(significance_threshold) and significance_threshold > 0):
            # pixels without variance under the kernel (E == 0) have significance 0, so a
            # threshold at or below 0 would call them significant
            raise InputError(
                "significance_threshold must be a finite number above 0, "
                f"got {significance_threshold!r}"
            )
        if significance_island_threshold is not None and not np.isfinite(
            significance_island_threshold
        ):
            raise InputError("significance_island_threshold must be finite or None")
        #: Every setting of the run as one frozen value: what the steps and sinks receive.
        self.settings = Settings(
            kernels=kernels,
            cleaning=core.Cleaning(
                threshold=float(significance_threshold),
                remove_isolated=bool(remove_isolated),
                island_threshold=(
                    None
                    if significance_island_threshold is None
                    else float(significance_island_threshold)
                ),
            ),
            max_iter=int(max_iter),
            tol=float(tol),
            keep_history=bool(keep_history),
            wrap_lon=wrap_lon,
            fft_workers=int(fft_workers),
            psf_sigma_deg=None if psf is None else float(as_psf(psf).sigma.to_value("deg")),
        )
        self.history: list[xr.Dataset] = []

    # the constructor's settings, read-only (change them by building a new estimator)
    kernels = property(lambda self: self.settings.kernels)
    max_iter = property(lambda self: self.settings.max_iter)
    tol = property(lambda self: self.settings.tol)
    significance_threshold = property(lambda self: self.settings.cleaning.threshold)
    significance_island_threshold = property(lambda self: self.settings.cleaning.island_threshold)
    remove_isolated = property(lambda self: self.settings.cleaning.remove_isolated)
    keep_history = property(lambda self: self.settings.keep_history)
    wrap_lon = property(lambda self: self.settings.wrap_lon)
    fft_workers = property(lambda self: self.settings.fft_workers)
    psf_sigma_deg = property(lambda self: self.settings.psf_sigma_deg)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"CWT({params})"

    def parameters(self) -> dict[str, Any]:
        """All settings that determine the numbers, JSON-ready (kernels included)."""
        return self.settings.parameters()

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
        chunks: int | tuple[int, int] | dict[str, int] | None = None,
        store: str | os.PathLike[str] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        callback: Callable[[IterationInfo], None] | None = None,
        client: Any = None,
    ) -> xr.Dataset:
        """Run the iteration on ``data`` and return the final state.

        Parameters
        ----------
        data : xarray.Dataset
            ``counts`` and ``background`` on (y, x) with the WCS in ``attrs["wcs"]`` (see
            `cwtflow.make_maps`, `cwtflow.read_maps`). Not modified. A dask-backed Dataset runs
            tile by tile (its chunks are the tiles).
        chunks : int or (int, int) or dict, optional
            Tile size (y, x) in pixels: chunk ``data`` and run tile by tile through dask.
        store : path, optional
            Zarr store receiving the inputs once and every iteration as its own group.
        resume : bool
            Continue the run in ``store`` from its last complete iteration.
        overwrite : bool
            Replace an existing ``store`` instead of refusing it.
        callback : callable, optional
            Called with an `IterationInfo` after every iteration (logging, progress bars).
        client : distributed.Client, optional
            Run this call on that cluster (its scheduler serves every computation of the call;
            see `cwtflow.cluster.open_client`). The run is always tiled: an in-memory ``data``
            without ``chunks`` is cut into tiles of `CLUSTER_TILE` pixels per axis, and the
            result (and ``history``) of an in-memory ``data`` without ``store`` is gathered back
            into numpy; a dask-backed result stays on the cluster (compute it with the client).

        Returns
        -------
        xarray.Dataset
            The state after the last iteration (lazy and backed by the store when ``store`` is
            given). ``attrs`` record ``iterations``, ``converged``, ``residual_variance`` (one
            value per iteration) and the run ``parameters``.
        """
        if client is not None:
            return self._analyze_on(
                client,
                data,
                chunks=chunks,
                store=store,
                resume=resume,
                overwrite=overwrite,
                callback=callback,
            )
        data = validate_maps(data)
        if chunks is not None:
            data = data.chunk(_chunk_spec(chunks))
        settings = self.settings
        wrap = self.wraps(data)
        step: Step
        if _is_lazy(data):
            step = TiledStep(settings, data, wrap)
        else:
            step = _InMemoryStep(settings, data, wrap)
        sink: Sink
        if store is not None:
            sink = ZarrSink(store, settings, data, resume=resume, overwrite=overwrite)
        elif resume:
            raise InputError("resume=True needs a store to resume from")
        else:
            sink = _MemorySink(keep=settings.keep_history)
        state, done = sink.start(initial_state(data, self.kernels))
        infos: list[IterationInfo] = list(done)
        while len(infos) < self.max_iter and not (infos and infos[-1].converged):
            k = len(infos) + 1
            new, moments = step(state)
            state, moments = sink.write(k, new, moments, independent_tiles=step.independent_tiles)
            variance, support_size = core.combine_moments(moments)
            previous = infos[-1].residual_variance if infos else None
            info = self._info(k, variance, previous, support_size)
            state = sink.complete(k, state, info)
            infos.append(info)
            if callback is not None:
                callback(info)
        self.history = sink.history
        state.attrs.update(run_summary(infos, self.parameters()))
        return state

    def _analyze_on(
        self, client: Any, data: xr.Dataset, *, chunks: Any, store: Any, **kwargs: Any
    ) -> xr.Dataset:
        """`analyze` with ``client`` as the scheduler of every computation of the call."""
        from distributed import Client

        if not isinstance(client, Client):
            raise InputError(f"client must be a distributed.Client, got {type(client).__name__}")
        in_memory = isinstance(data, xr.Dataset) and not _is_lazy(data)
        if chunks is None and in_memory:
            chunks = CLUSTER_TILE
        # the client itself stays out of dask's config: a LocalCluster's nannies copy the config
        # into every worker process they (re)start, and a Client cannot be pickled
        with client.as_current(), dask.config.set(scheduler="dask.distributed"):
            state = self.analyze(data, chunks=chunks, store=store, **kwargs)
            if in_memory and store is None:
                state = state.compute()
                self.history = [h.compute() for h in self.history]
        return state

    def _info(
        self, k: int, variance: float, previous: float | None, support_size: int
    ) -> IterationInfo:
        ratio = variance_ratio(previous, variance)
        converged = k > 1 and ratio < self.tol
        return IterationInfo(k, variance, ratio, converged, support_size)


#: Tile size (pixels per axis) of an in-memory map run on a cluster without ``chunks``.
CLUSTER_TILE = 1024


def _is_lazy(data: xr.Dataset) -> bool:
    return any(var.chunks is not None for var in data.variables.values())


def _chunk_spec(chunks: int | tuple[int, int] | dict[str, int]) -> dict[str, int]:
    """Normalise a tile size to xarray's ``{"y": ny, "x": nx}``."""
    if isinstance(chunks, dict):
        spec = {dim: chunks[dim] for dim in ("y", "x") if dim in chunks}
    elif np.ndim(chunks) == 0:
        spec = {"y": chunks, "x": chunks}
    else:
        ny, nx = chunks
        spec = {"y": ny, "x": nx}
    for dim, size in spec.items():
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise InputError(f"chunk size along {dim} must be a positive integer, got {size!r}")
    return {dim: int(size) for dim, size in spec.items()}


class _InMemoryStep:
    """One iteration on whole-map numpy arrays; kernel and input spectra are kept across calls."""

    def __init__(self, settings: Settings, data: xr.Dataset, wrap: bool) -> None:
        self.settings = settings
        self.wrap = wrap
        self.counts = np.asarray(data["counts"].values, dtype=np.float64)
        self.background = np.asarray(data["background"].values, dtype=np.float64)
        workers = settings.fft_workers
        grid = core.fft_shape(self.counts.shape, settings.kernels.halo, periodic=(False, wrap))
        self.spectra = core.kernel_spectra(settings.kernels, grid)
        self.const = core.image_spectra(self.counts, self.background, shape=grid, workers=workers)
        self.approx_bkg = core.convolve_approx(self.background, self.spectra, workers=workers)

    #: the whole map is one numpy array: no tiles to compute apart
    independent_tiles = None

    def __call__(self, state: xr.Dataset) -> tuple[xr.Dataset, np.ndarray]:
        """The state after one more iteration and its `core.residual_moments`, shape (4,)."""
        settings, cleaning = self.settings, self.settings.cleaning
        model = state["model"].values
        transform, error_sq, approx = core.convolve_step(
            self.counts,
            self.background,
            model,
            state["approx"].values,
            self.spectra,
            const_spectra=self.const,
            workers=settings.fft_workers,
        )
        # the planes returned are fresh views of one buffer: E goes in place of E**2
        sig = None if cleaning.local else np.empty(model.shape)
        support = state["support"].values.copy()
        for i in range(transform.shape[0]):
            mask = core.error_and_mask(transform[i], error_sq[i], cleaning.threshold, sig=sig)
            support[i] |= core.clean_mask(mask, sig, cleaning, wrap_x=self.wrap)
        error = error_sq
        transform_2d, model = core.update_model(model, support, transform)
        arrays = {
            "counts": self.counts,
            "background": self.background,
            "model": model,
            "approx": approx,
            "approx_bkg": self.approx_bkg,
            "transform_2d": transform_2d,
            "transform_3d": transform,
            "error": error,
            "support": support,
        }
        moments = core.residual_moments(self.counts, model, approx, support)
        return new_state(state, arrays, settings.kernels), moments


class _MemorySink:
    """Where iterations go without a store: kept in memory (all of them with ``keep``).

    A lazy (tiled) state is persisted, so the task graph of the next iteration starts from
    materialised chunks instead of growing with the iterations.
    """

    def __init__(self, *, keep: bool) -> None:
        self.keep = keep
        self.history: list[xr.Dataset] = []

    def start(self, state: xr.Dataset) -> tuple[xr.Dataset, list[IterationInfo]]:
        """The state to start from and the iterations already done (none in memory)."""
        if _is_lazy(state):
            (state,) = dask.persist(state)
        if self.keep:
            self.history.append(state)
        return state, []

    def write(
        self, k: int, state: xr.Dataset, moments: Any, *, independent_tiles: Any = None
    ) -> tuple[xr.Dataset, np.ndarray]:
        """Materialise iteration ``k`` and its ``moments`` (`core.residual_moments`, of the
        map or per tile); returns the state to continue from and the moments as numpy."""
        if _is_lazy(state):
            state, moments = dask.persist(state, moments)
        return state, np.asarray(dask.compute(moments)[0])

    def complete(self, k: int, state: xr.Dataset, info: IterationInfo) -> xr.Dataset:
        """Mark iteration ``k`` done: its attrs record ``info``."""
        state.attrs.update(info.attrs())
        if self.keep:
            self.history.append(state)
        return state
