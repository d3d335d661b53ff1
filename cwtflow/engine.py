"""The public CWT estimator: settings in the constructor, `CWT.analyze` runs the iteration."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import xarray as xr

from . import core
from .checks import flag, integer, number
from .defaults import CWT_DEFAULTS
from .errors import InputError, ParameterError
from .iteration import IterationInfo, Settings, Sink, Step, run_summary, variance_ratio
from .kernels import CWTKernels
from .maps import (
    is_allsky,
    pixel_checks,
    raise_pixel_errors,
    validate_layout,
    validate_maps,
    wcs_from_attrs,
)
from .psf import as_psf
from .resources import check_resources
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
    dtype : {"float64", "float32"}
        Floating-point type of the state. ``"float64"`` (default) is the exact path, equal to
        the reference to rounding. ``"float32"`` halves the memory and the bytes stored and
        speeds up the FFTs; its numbers differ from float64 at the 1e-6 relative level, which
        flips the support of pixels whose significance lies that close to the threshold
        (measured in ``benchmarks/bench_throughput.py``).
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
        max_iter: int = CWT_DEFAULTS["max_iter"],
        tol: float = CWT_DEFAULTS["tol"],
        significance_threshold: float = CWT_DEFAULTS["significance_threshold"],
        significance_island_threshold: float | None = CWT_DEFAULTS["significance_island_threshold"],
        remove_isolated: bool = CWT_DEFAULTS["remove_isolated"],
        keep_history: bool = CWT_DEFAULTS["keep_history"],
        wrap_lon: bool | None = CWT_DEFAULTS["wrap_lon"],
        fft_workers: int = CWT_DEFAULTS["fft_workers"],
        dtype: str = CWT_DEFAULTS["dtype"],
        psf: Any = None,
    ) -> None:
        if not isinstance(kernels, CWTKernels):
            raise ParameterError(f"kernels must be a CWTKernels, got {type(kernels).__name__}")
        max_iter = integer("max_iter", max_iter, low=1)
        tol = number("tol", tol, low=0.0)
        if not (_is_real(significance_threshold) and 0 < significance_threshold < math.inf):
            # pixels without variance under the kernel (E == 0) have significance 0, so a
            # threshold at or below 0 would call them significant
            raise ParameterError(
                "significance_threshold must be a finite number above 0, "
                f"got {significance_threshold!r}"
            )
        if significance_island_threshold is not None and not (
            _is_real(significance_island_threshold) and np.isfinite(significance_island_threshold)
        ):
            raise ParameterError(
                "significance_island_threshold must be finite or None, "
                f"got {significance_island_threshold!r}"
            )
        remove_isolated = flag("remove_isolated", remove_isolated)
        keep_history = flag("keep_history", keep_history)
        wrap_lon = flag("wrap_lon", wrap_lon, none=True)
        fft_workers = integer("fft_workers", fft_workers, low=1)
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
            max_iter=max_iter,
            tol=tol,
            keep_history=bool(keep_history),
            wrap_lon=wrap_lon,
            fft_workers=int(fft_workers),
            dtype=_dtype_name(dtype),
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
    dtype = property(lambda self: self.settings.dtype)
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
            Tile size (y, x) in pixels: chunk ``data`` and run tile by tile through dask. Any
            size from 1 pixel works, but the map may be cut into at most
            `cwtflow.resources.MAX_TILES` (100 000) tiles.
        store : path, optional
            Zarr store receiving the inputs once and every iteration as its own group.
        resume : bool
            Continue the run in ``store`` from its last complete iteration.
        overwrite : bool
            Replace an existing ``store`` instead of refusing it.
        callback : callable, optional
            Called with an `IterationInfo` after every iteration (logging, progress bars).
            With a ``store``, an in-memory run's iteration may still be being written then
            (in the background, sealed before the next one is written; see
            `cwtflow.store_writer`).
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

        Raises
        ------
        InputError
            Unusable ``data`` (see `cwtflow.validate_maps`).
        ParameterError
            An argument of the wrong type or value.
        ResourceError
            The run would not fit: see `cwtflow.resources.check_resources` (kernel against
            map size, memory, number of tiles). Checked before anything is written.
        StoreError
            ``store`` cannot be written or resumed.
        """
        if chunks is not None:
            chunks = _chunk_spec(chunks)
        if store is not None and not isinstance(store, str | os.PathLike):
            raise ParameterError(f"store must be a path, got {type(store).__name__}")
        resume, overwrite = flag("resume", resume), flag("overwrite", overwrite)
        if callback is not None and not callable(callback):
            raise ParameterError(f"callback must be callable, got {type(callback).__name__}")
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
        # a lazy input's pixels are checked in the computation that first reads them (the
        # sink's start: the store's input write, or the persist of the initial state)
        lazy_input = isinstance(data, xr.Dataset) and _is_lazy(data)
        data = validate_layout(data) if lazy_input else validate_maps(data)
        tiles = _tiles(data, chunks)  # counted before chunking: 1e6 chunks take a while
        settings = self.settings
        wrap = self.wraps(data)
        check_resources(
            self.kernels,
            (data.sizes["y"], data.sizes["x"]),
            tiles=tiles,
            in_memory_state=store is None or tiles is None,
            local=dask.config.get("scheduler", None) != "dask.distributed",
        )
        if chunks is not None:
            data = data.chunk(chunks)
        checks = pixel_checks(data) if lazy_input else None
        step: Step
        if _is_lazy(data):
            step = TiledStep(settings, data, wrap)
        else:
            step = _InMemoryStep(settings, data, wrap)
        sink: Sink
        if store is not None:
            options = {"resume": resume, "overwrite": overwrite, "local_inputs": not lazy_input}
            sink = ZarrSink(store, settings, data, **options)
        elif resume:
            raise InputError("resume=True needs a store to resume from")
        else:
            sink = _MemorySink(keep=settings.keep_history)
        with contextlib.closing(sink):  # a store sink holds the store's lock until closed
            state, done = sink.start(
                initial_state(data, self.kernels, dtype=settings.dtype), checks=checks
            )
            infos: list[IterationInfo] = list(done)
            while len(infos) < self.max_iter and not (infos and infos[-1].converged):
                k = len(infos) + 1
                # a store already holds the previous state: one task per tile reads its
                # windows, computes and writes (`ZarrSink.write_tiles`), when tiles are local
                work = step.tile_work(sink.chunks) if isinstance(sink, ZarrSink) else None
                if work is None:
                    new, moments = step(state)
                    state, moments = sink.write(k, new, moments)
                else:
                    state, moments = sink.write_tiles(k, state, work)
                variance, support_size = core.combine_moments(moments)
                previous = infos[-1].residual_variance if infos else None
                info = self._info(k, variance, previous, support_size)
                state = sink.complete(k, state, info)
                infos.append(info)
                if callback is not None:
                    callback(info)
            state = sink.finish(state)
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


def _dtype_name(dtype: Any) -> str:
    """``"float64"`` or ``"float32"`` from any spelling numpy understands."""
    try:
        name = None if dtype is None else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float64", "float32"):
        raise InputError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    return name


#: Tile size (pixels per axis) of an in-memory map run on a cluster without ``chunks``.
CLUSTER_TILE = 1024


def _is_lazy(data: xr.Dataset) -> bool:
    return any(var.chunks is not None for var in data.variables.values())


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _chunk_spec(chunks: Any) -> dict[str, int]:
    """Normalise a tile size to xarray's ``{"y": ny, "x": nx}``."""
    if isinstance(chunks, dict):
        unknown = [dim for dim in chunks if dim not in ("y", "x")]
        if unknown:
            raise ParameterError(f"chunks dims must be 'y' and/or 'x', got {unknown}")
        spec = dict(chunks)
    elif np.ndim(chunks) == 0:
        spec = {"y": chunks, "x": chunks}
    elif isinstance(chunks, tuple | list) and len(chunks) == 2:
        spec = {"y": chunks[0], "x": chunks[1]}
    else:
        raise ParameterError(f"chunks must be an int, an (ny, nx) pair or a dict, got {chunks!r}")
    return {dim: integer(f"chunk size along {dim}", size, low=1) for dim, size in spec.items()}


def _tiles(data: xr.Dataset, spec: dict[str, int] | None) -> tuple[int, int, int] | None:
    """(number of tiles, largest tile's ny, nx) of ``data`` cut by ``spec`` (`_chunk_spec`),
    or of a dask-backed ``data`` as it is chunked; None for an in-memory run."""
    ny, nx = data.sizes["y"], data.sizes["x"]
    if spec is not None:
        cy, cx = min(spec.get("y", ny), ny), min(spec.get("x", nx), nx)
        return math.ceil(ny / cy) * math.ceil(nx / cx), cy, cx
    chunks = data.chunks if _is_lazy(data) else None
    if not chunks:
        return None
    ys, xs = chunks.get("y", (ny,)), chunks.get("x", (nx,))
    return len(ys) * len(xs), max(ys), max(xs)


class _InMemoryStep:
    """One iteration on whole-map numpy arrays; kernel and input spectra are kept across calls."""

    def __init__(self, settings: Settings, data: xr.Dataset, wrap: bool) -> None:
        self.settings = settings
        self.wrap = wrap
        self.counts = np.asarray(data["counts"].values, dtype=settings.dtype)
        self.background = np.asarray(data["background"].values, dtype=settings.dtype)
        workers = settings.fft_workers
        grid = core.fft_shape(self.counts.shape, settings.kernels.halo, periodic=(False, wrap))
        self.spectra = core.kernel_spectra(settings.kernels, grid, settings.dtype)
        self.const = core.image_spectra(self.counts, self.background, shape=grid, workers=workers)
        self.approx_bkg = core.convolve_approx(self.background, self.spectra, workers=workers)
        self.approx_bkg.flags.writeable = False  # constant: a store writes it once

    def tile_work(self, align: tuple[int, int]) -> None:
        """None: the whole map is one numpy array, there are no tiles to compute apart."""
        return None

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

    def start(
        self, state: xr.Dataset, *, checks: dict[str, Any] | None = None
    ) -> tuple[xr.Dataset, list[IterationInfo]]:
        """The state to start from and the iterations already done (none in memory);
        ``checks`` (`cwtflow.maps.pixel_checks` of a lazy input) are computed with the persist
        of the initial state, which reads the inputs, and raise `InputError` on bad pixels."""
        if _is_lazy(state):
            state, checks = dask.persist(state, checks)
        if checks is not None:
            (values,) = dask.compute(checks)
            raise_pixel_errors(state, values)
        if self.keep:
            self.history.append(state)
        return state, []

    def write(self, k: int, state: xr.Dataset, moments: Any) -> tuple[xr.Dataset, np.ndarray]:
        """Materialise iteration ``k`` and its ``moments`` (`core.residual_moments`, of the
        map or per tile); returns the state to continue from and the moments as numpy."""
        if _is_lazy(state):
            state, moments = dask.persist(state, moments)
        return state, np.asarray(dask.compute(moments)[0])

    def close(self) -> None:
        """Nothing to release in memory."""

    def complete(self, k: int, state: xr.Dataset, info: IterationInfo) -> xr.Dataset:
        """Mark iteration ``k`` done: its attrs record ``info``."""
        state.attrs.update(info.attrs())
        if self.keep:
            self.history.append(state)
        return state

    def finish(self, state: xr.Dataset) -> xr.Dataset:
        """The final state: ``state`` itself."""
        return state
