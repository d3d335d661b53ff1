"""Source catalog from a CWT result: islands of the support, deblended, measured, written out.

`find_sources` turns a state Dataset (numpy- or dask-backed) into an astropy Table with one row
per source (written out by `cwtflow.catalog_files`).
The per-island numerics are the pure-numpy functions of `cwtflow.peaks`; this module gathers the
island cut-outs (only those pixels are read from a lazy state), converts pixels to the sky and
assembles the table.

Definitions (pixel coordinates are 0-based, pixel centres on integers, x along longitude;
"the region" of a source is the set of island pixels its watershed component holds; M, C, B,
A, T_i, E_i are the state's model, counts, background, approximation, transform and error):

- *island*: a connected component (4-connectivity, like the CWT's own support cleaning) of the
  2-D support ``any_i S_i``; on an all-sky map (`cwtflow.maps.is_allsky`) islands touching
  across the longitude seam are one island.
- *source*: a deblended component of an island (`cwtflow.peaks`): a watershed region of M
  whose peak is neither a shoulder of a higher peak (``contrast``) nor closer than
  ``min_separation`` to one, and whose ``significance`` reaches ``min_significance``.
- ``significance``: Poisson likelihood-ratio test of a source on top of the null background
  b (B, or ``max(B + A, 0)`` with ``approx_in_null``), ``TS = 2 max_a sum(C ln(1 + a m / b) -
  a m)`` over the amplitude ``a >= 0`` of a source template m (Cash 1979; for one pixel this is
  Li & Ma 1983 eq. 17 with a perfectly known background), ``significance = sqrt(TS)``. The
  template is the source's own model (M on its region; only the region's pixels count) or,
  when ``psf_sigma`` is given, a point source: a unit-integral Gaussian of that sigma at the
  centroid over a window of 4 sigma, with the model of every other source added to b there.
  B alone is the default null because A = conv(C - M - B, G) still holds the part of every
  source that the model has not yet absorbed (the model grows by a fraction of the excess per
  iteration), so B + A takes a large share of a faint source's counts into the null.
- ``source_counts``: the fitted source counts, ``a* sum(m)`` (model template; counts inside the
  region) or ``a*`` (point source); ``model_counts``: ``sum(M)`` over the region (smaller when
  the iteration stopped before the model took all the excess); ``counts`` and
  ``background``: sums of C and of b over the region.
- ``x``, ``y``: centroid of M over the region.
- ``pos_err``: per-axis 1-sigma position error, the Cramér-Rao bound of the fitted source
  (template m, amplitude a*) over b: ``var(x) = 1 / sum((a* dm/dx)^2 / (b + a* m))``, the same
  for y, ``pos_err = sqrt((var(x) dx^2 + var(y) dy^2) / 2)`` with the pixel sizes dx, dy in
  deg (for a Gaussian of sigma s without background: ``s / sqrt(counts)``). A lower bound:
  the model centroid is not the maximum-likelihood position.
- ``peak_significance``, ``peak_scale``: at the peak pixel of M in the region, the maximum over
  scales of ``(T_i + conv(M_src, K_i)) / E_i`` — the state's transform of the residual with the
  source's own model ``M_src`` (M on the region) added back, over its Gaussian error — and the
  scale (pixels) where it peaks.
- ``extent``: ``sqrt((l1 + l2) / 2)`` of the eigenvalues l1 >= l2 of the second-moment matrix
  of M over the region (deg; for a circular Gaussian blob its sigma, PSF included);
  ``extent_major`` / ``extent_minor`` are ``sqrt(l1)``, ``sqrt(l2)``.
- ``flux``: ``source_counts`` over the M-weighted mean exposure of the region (cm-2 s-1 for an
  exposure in cm2 s); NaN without an exposure map.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import dask
import numpy as np
import xarray as xr
from astropy import units as u
from astropy.table import Table
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy import ndimage

from . import core, peaks
from .checks import flag, number
from .errors import InputError, ParameterError
from .kernels import CWTKernels
from .maps import is_allsky, wcs_from_attrs

__all__ = ["CATALOG_COLUMNS", "find_sources"]

#: name -> (dtype, unit, description) of every catalog column, in table order.
CATALOG_COLUMNS: dict[str, tuple[type, str | None, str]] = {
    "id": (np.int64, None, "source number, 1 = most significant"),
    "island": (np.int64, None, "support island the source belongs to"),
    "x": (np.float64, "pix", "model-weighted centroid, 0-based pixel x"),
    "y": (np.float64, "pix", "model-weighted centroid, 0-based pixel y"),
    "lon": (np.float64, "deg", "centroid longitude in the map frame"),
    "lat": (np.float64, "deg", "centroid latitude in the map frame"),
    "ra": (np.float64, "deg", "centroid right ascension (ICRS)"),
    "dec": (np.float64, "deg", "centroid declination (ICRS)"),
    "pos_err": (np.float64, "deg", "per-axis 1-sigma position error (Cramer-Rao bound)"),
    "peak_significance": (
        np.float64,
        None,
        "max over scales of (T_i + conv(M_src, K_i)) / E_i at the model peak",
    ),
    "peak_scale": (np.float64, "pix", "wavelet scale of the peak significance"),
    "extent": (np.float64, "deg", "rms radius of the model: sqrt((l1 + l2) / 2)"),
    "extent_major": (np.float64, "deg", "model rms along the major axis"),
    "extent_minor": (np.float64, "deg", "model rms along the minor axis"),
    "npix": (np.int64, None, "pixels in the source's region"),
    "model_counts": (np.float64, "ct", "sum of the model over the source's region"),
    "source_counts": (
        np.float64,
        "ct",
        "maximum-likelihood source counts (model-shaped or point-source template)",
    ),
    "counts": (np.float64, "ct", "observed counts in the source's region"),
    "background": (np.float64, "ct", "null-hypothesis background counts in the region"),
    "significance": (
        np.float64,
        None,
        "Poisson likelihood-ratio significance of the source over the background",
    ),
    "flux": (np.float64, "cm-2 s-1", "source counts / model-weighted mean exposure"),
}

_REQUIRED = ("support", "model", "transform_3d", "error", "counts", "background", "approx")


def _run_kernels(result: xr.Dataset, kernels: CWTKernels | None) -> CWTKernels:
    """The wavelets of the run: given, from ``attrs['parameters']`` or from the scale coord."""
    scales = np.asarray(result["scale"].values, dtype=np.float64)
    if kernels is None:
        params = result.attrs.get("parameters")
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except ValueError:
                params = None
        if isinstance(params, Mapping) and {"n_scale", "min_scale", "step_scale"} <= set(params):
            kernels = CWTKernels.from_dict(params)
        elif scales.size >= 2 and scales[0] > 0:
            kernels = CWTKernels(scales.size, float(scales[0]), float(scales[1] / scales[0]))
        else:
            raise InputError(
                "cannot tell the run's kernels: no attrs['parameters'] and fewer than two "
                "scales; pass kernels="
            )
    elif not isinstance(kernels, CWTKernels):
        raise InputError(f"kernels must be a CWTKernels, got {type(kernels).__name__}")
    if kernels.scales.shape != scales.shape or not np.allclose(
        kernels.scales, scales, rtol=1e-9, atol=0
    ):
        raise InputError(
            f"kernels scales {list(kernels.scales)} do not match the result's scales {list(scales)}"
        )
    return kernels


def _check_result(result: xr.Dataset) -> tuple[int, int]:
    if not isinstance(result, xr.Dataset):
        raise InputError(f"expected a CWT result (xarray.Dataset), got {type(result).__name__}")
    missing = [name for name in _REQUIRED if name not in result]
    if missing:
        raise InputError(f"result is not a CWT state: missing {', '.join(missing)}")
    if "scale" not in result.coords:
        raise InputError("result has no 'scale' coordinate")
    for name in _REQUIRED:
        dims = result[name].dims
        expected = ("scale", "y", "x") if name in ("support", "transform_3d", "error") else None
        if expected is not None and set(dims) != set(expected):
            raise InputError(f"'{name}' must have dims {expected}, got {dims}")
        if expected is None and set(dims) != {"y", "x"}:
            raise InputError(f"'{name}' must have dims ('y', 'x'), got {dims}")
    shape = (result.sizes["y"], result.sizes["x"])
    if 0 in shape:
        raise InputError(f"empty result: shape {shape}")
    return shape


def _exposure_array(
    result: xr.Dataset, exposure: Any, shape: tuple[int, int]
) -> xr.DataArray | None:
    if exposure is None:
        if "exposure" not in result:
            return None
        exposure = result["exposure"]
    if isinstance(exposure, xr.DataArray):
        if set(exposure.dims) != {"y", "x"}:
            raise InputError(f"exposure must have dims ('y', 'x'), got {exposure.dims}")
        exposure = exposure.transpose("y", "x").variable.data
    else:
        exposure = exposure if hasattr(exposure, "compute") else np.asarray(exposure)
    if tuple(exposure.shape) != shape:
        raise InputError(f"exposure shape {tuple(exposure.shape)} differs from the map's {shape}")
    bad = dask.compute(((exposure < 0) | ~np.isfinite(exposure)).any())[0]
    if bool(bad):
        raise InputError("exposure contains negative, NaN or infinite pixels")
    return exposure


def _island_columns(labels: np.ndarray, n: int, wrap: bool) -> list[tuple[int, int, int, int]]:
    """Bounding box ``(y0, y1, x0, x1)`` of every island; on a wrapping map ``x1`` may exceed
    the map width (the box continues across the seam) for islands that cross it."""
    nx = labels.shape[1]
    boxes = []
    for label, sl in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if wrap and x0 == 0 and x1 == nx:
            cols = np.flatnonzero((labels[y0:y1] == label).any(axis=0))
            gaps = np.diff(np.append(cols, cols[0] + nx))
            widest = int(np.argmax(gaps))
            if gaps[widest] > 1:
                # the box starts after the widest empty run of columns
                x0 = int(cols[(widest + 1) % cols.size])
                x1 = int(cols[widest]) + 1 + (nx if x0 > cols[widest] else 0)
            else:
                # a ring all around the sky: cut it where it is thinnest
                thin = int(np.argmin((labels[y0:y1] == label).sum(axis=0)))
                x0, x1 = thin + 1, thin + 1 + nx
        boxes.append((y0, y1, x0, x1))
    return boxes


def _with_margin(
    box: tuple[int, int, int, int], margin: int, shape: tuple[int, int], wrap: bool
) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` pixels: clipped at the map's edges, except along a
    wrapping x axis where it continues across the seam (never wider than the map)."""
    y0, y1, x0, x1 = box
    ny, nx = shape
    y0, y1 = max(0, y0 - margin), min(ny, y1 + margin)
    if not wrap:
        return y0, y1, max(0, x0 - margin), min(nx, x1 + margin)
    if (x1 - x0) + 2 * margin >= nx:
        start = x0 - (nx - (x1 - x0)) // 2
        return y0, y1, start, start + nx
    return y0, y1, x0 - margin, x1 + margin


def _take(array: Any, box: tuple[int, int, int, int], nx: int) -> Any:
    """``array[..., y0:y1, x0:x1]`` with x continued periodically outside ``0 .. nx``."""
    y0, y1, x0, x1 = box
    if 0 <= x0 and x1 <= nx:
        return array[..., y0:y1, x0:x1]
    return array[..., y0:y1, :][..., np.arange(x0, x1) % nx]


def _data(result: xr.Dataset, name: str) -> Any:
    var = result[name]
    dims = ("scale", "y", "x") if "scale" in var.dims else ("y", "x")
    return var.transpose(*dims).variable.data


def _empty_table() -> Table:
    table = Table()
    for name, (dtype, unit, description) in CATALOG_COLUMNS.items():
        table[name] = np.zeros(0, dtype=dtype)
        table[name].unit = unit
        table[name].description = description
    return table


def find_sources(
    result: xr.Dataset,
    *,
    exposure: Any = None,
    min_significance: float = 5.0,
    deblend: bool = True,
    contrast: float = 0.2,
    min_separation: float | None = None,
    approx_in_null: bool = False,
    psf_sigma: float | u.Quantity | None = None,
    kernels: CWTKernels | None = None,
) -> Table:
    """Catalog of the sources in a CWT result.

    Parameters
    ----------
    result : xarray.Dataset
        A CWT state (`CWT.analyze`'s return value, a state read back from FITS or zarr);
        numpy- or dask-backed. Only the 2-D support is read whole; every other variable is
        read on the islands' bounding boxes only.
    exposure : xarray.DataArray or array-like, shape (ny, nx), optional
        Exposure in cm2 s for the ``flux`` column. Defaults to ``result["exposure"]`` when the
        result carries one; without either, ``flux`` is NaN.
    min_significance : float
        Sources whose Poisson ``significance`` is below this are dropped.
    deblend : bool
        Split islands with several peaks into several sources (else one source per island).
    contrast : float
        A secondary model peak is its own source only if it rises at least this fraction of
        its height above the saddle joining it to a higher peak (0 <= contrast < 1).
    min_separation : float, optional
        Peaks closer than this (pixels) are one source. Default: the width of the smallest
        wavelet, ``min_scale * step_scale``.
    approx_in_null : bool
        Use ``max(B + A, 0)`` instead of B as the background of the likelihood test.
    psf_sigma : float or astropy Quantity, optional
        Sigma of a Gaussian approximation of the PSF (pixels, or an angle). When given, the
        ``significance``, ``source_counts`` and ``pos_err`` are those of a point source at the
        centroid (see the module docstring) instead of a source with the model's shape.
    kernels : CWTKernels, optional
        The run's kernels, when the result's attrs do not record them (they must match the
        result's ``scale`` coordinate).

    Returns
    -------
    astropy.table.Table
        One row per source, columns `CATALOG_COLUMNS` (defined in this module's docstring),
        ordered by decreasing ``significance``; ``meta`` records the settings and the
        frame. No source: the same columns with no rows, and a `UserWarning`.
    """
    shape = _check_result(result)
    min_significance = number("min_significance", min_significance)
    if not (_is_real(contrast) and 0 <= contrast < 1):
        raise ParameterError(f"contrast must be in [0, 1), got {contrast!r}")
    deblend = flag("deblend", deblend)
    approx_in_null = flag("approx_in_null", approx_in_null)
    kernels = _run_kernels(result, kernels)
    if min_separation is None:
        min_separation = kernels.min_scale * kernels.step_scale
    if not (_is_real(min_separation) and np.isfinite(min_separation) and min_separation >= 0):
        raise ParameterError(
            f"min_separation must be a non-negative number, got {min_separation!r}"
        )
    wcs = wcs_from_attrs(result.attrs).celestial
    pixel_size = float(np.mean(proj_plane_pixel_scales(wcs)))
    psf_pix = _psf_pixels(psf_sigma, pixel_size)
    exposure_data = _exposure_array(result, exposure, shape)
    wrap = is_allsky(wcs, shape)
    margin = 0 if psf_pix is None else math.ceil(peaks.PSF_WINDOW * psf_pix) + 1

    support_2d = np.asarray(dask.compute(_data(result, "support").any(axis=0))[0], dtype=bool)
    labels, n = core.label(support_2d, wrap_x=wrap)
    boxes = [_with_margin(b, margin, shape, wrap) for b in _island_columns(labels, n, wrap)]

    names2 = ["model", "counts", "background", "approx"]
    arrays = {name: _data(result, name) for name in (*names2, "transform_3d", "error")}
    if exposure_data is not None:
        arrays["exposure"] = exposure_data
    lazy = [{name: _take(a, box, shape[1]) for name, a in arrays.items()} for box in boxes]
    if any(not isinstance(a, np.ndarray) for a in arrays.values()):
        cutouts = dask.compute(*lazy)  # one graph: every island's boxes in one pass
    else:
        cutouts = tuple(lazy)

    found: list[tuple[int, tuple[int, int, int, int], peaks.IslandSources]] = []
    for label, (box, cut) in enumerate(zip(boxes, cutouts, strict=True), start=1):
        mask = _take(labels, box, shape[1]) == label
        sources = peaks.island_sources(
            mask,
            np.asarray(cut["model"], dtype=np.float64),
            np.asarray(cut["transform_3d"], dtype=np.float64),
            np.asarray(cut["error"], dtype=np.float64),
            np.asarray(cut["counts"], dtype=np.float64),
            np.asarray(cut["background"], dtype=np.float64),
            np.asarray(cut["approx"], dtype=np.float64),
            np.asarray(cut["exposure"], dtype=np.float64) if "exposure" in cut else None,
            kernels.wavelets,
            min_significance=float(min_significance),
            deblend=bool(deblend),
            contrast=float(contrast),
            min_separation=float(min_separation),
            approx_in_null=bool(approx_in_null),
            psf_sigma=psf_pix,
        )
        if sources.x.size:
            found.append((label, box, sources))

    table = _assemble(found, wcs, shape, kernels)
    table.meta.update(
        {
            "FRAME": _frame(wcs),
            "MINSIG": float(min_significance),
            "DEBLEND": bool(deblend),
            "CONTRAST": float(contrast),
            "MINSEP": float(min_separation),
            "NSCALE": kernels.n_scale,
            "MINSCALE": kernels.min_scale,
            "STEPSCAL": kernels.step_scale,
            "PIXSIZE": pixel_size,
            "PSFSIGMA": 0.0 if psf_pix is None else psf_pix * pixel_size,  # deg; 0: none
            "NULL": "B+A" if approx_in_null else "B",
            "NISLAND": int(n),
        }
    )
    if len(table) == 0:
        warnings.warn(
            f"no sources found: {n} support islands, no component with a significance of at "
            f"least {min_significance:g}",
            UserWarning,
            stacklevel=2,
        )
    return table


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _psf_pixels(psf_sigma: Any, pixel_size: float) -> float | None:
    """``psf_sigma`` in pixels (a plain number already is; an angle is divided by the pixel
    size in deg)."""
    if psf_sigma is None:
        return None
    if isinstance(psf_sigma, u.Quantity):
        try:
            value = psf_sigma.to_value(u.deg) / pixel_size
        except u.UnitsError:
            raise InputError(f"psf_sigma must be an angle or pixels, got {psf_sigma!r}") from None
    else:
        value = psf_sigma
    if not _is_real(value) or not (np.isfinite(value) and value > 0):
        raise ParameterError(f"psf_sigma must be a positive number, got {psf_sigma!r}")
    return float(value)


def _frame(wcs: Any) -> str:
    from astropy.wcs.utils import wcs_to_celestial_frame

    return str(wcs_to_celestial_frame(wcs).name)


def _assemble(
    found: list[tuple[int, tuple[int, int, int, int], peaks.IslandSources]],
    wcs: Any,
    shape: tuple[int, int],
    kernels: CWTKernels,
) -> Table:
    """The catalog table from the per-island results (cut-out frames shifted to the map)."""
    table = _empty_table()
    if not found:
        return table
    fields = peaks.IslandSources._fields[:-1]
    cols = {f: np.concatenate([s._asdict()[f] for _, _, s in found]) for f in fields}
    island = np.concatenate([np.full(s.x.size, label) for label, _, s in found])
    y0 = np.concatenate([np.full(s.x.size, box[0]) for _, box, s in found])
    x0 = np.concatenate([np.full(s.x.size, box[2]) for _, box, s in found])
    nx = shape[1]
    x = cols["x"] + x0
    # centroids past the seam (all-sky boxes continue across it) come back onto the map
    x = np.where((x < -0.5) | (x >= nx - 0.5), (x + 0.5) % nx - 0.5, x)
    y = cols["y"] + y0
    sx, sy = proj_plane_pixel_scales(wcs)[:2]
    sky = wcs.pixel_to_world(x, y)
    sph = sky.spherical
    icrs = sky.icrs
    mxx, myy, mxy = (
        cols["moment_xx"] * sx**2,
        cols["moment_yy"] * sy**2,
        cols["moment_xy"] * sx * sy,
    )
    half_trace = (mxx + myy) / 2
    root = np.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
    major = np.sqrt(np.maximum(half_trace + root, 0.0))
    minor = np.sqrt(np.maximum(half_trace - root, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = cols["source_counts"] / cols["mean_exposure"]
    values = {
        "island": island,
        "x": x,
        "y": y,
        "lon": np.asarray(sph.lon.deg, dtype=np.float64),
        "lat": np.asarray(sph.lat.deg, dtype=np.float64),
        "ra": np.asarray(icrs.ra.deg, dtype=np.float64),
        "dec": np.asarray(icrs.dec.deg, dtype=np.float64),
        "pos_err": np.sqrt((cols["x_var"] * sx**2 + cols["y_var"] * sy**2) / 2),
        "peak_significance": cols["peak_significance"],
        "peak_scale": kernels.scales[cols["peak_scale"]],
        "extent": np.sqrt(np.maximum(half_trace, 0.0)),
        "extent_major": major,
        "extent_minor": minor,
        "npix": cols["npix"],
        "model_counts": cols["model_counts"],
        "source_counts": cols["source_counts"],
        "counts": cols["counts"],
        "background": cols["background"],
        "significance": cols["significance"],
        "flux": np.where(np.isfinite(flux), flux, np.nan),
    }
    order = np.lexsort((x, y, -values["significance"]))
    out = Table()
    for name, (dtype, unit, description) in CATALOG_COLUMNS.items():
        data = np.arange(1, order.size + 1) if name == "id" else values[name][order]
        out[name] = np.asarray(data, dtype=dtype)
        out[name].unit = unit
        out[name].description = description
    return out
