"""Source catalog from a CWT result: candidates from the support's islands, refined by a Poisson
likelihood fit with the instrument's PSF.

`find_sources` turns a state Dataset (numpy- or dask-backed) into an astropy `QTable` with one
row per source (written out by `cwtflow.catalog_files`). The candidates are the deblended
components of the support's islands (`cwtflow.peaks`); each is then fitted on the counts by
`cwtflow.refine` / `cwtflow.likelihood`, and sources larger than the extension model are
merged by `cwtflow.merge`; this module gathers the island cut-outs and fit windows
(`cwtflow.cutouts`: only those pixels are read from a lazy state), converts pixels to the sky
and assembles the table (`cwtflow.catalog_table`).

Definitions (pixel coordinates are 0-based, pixel centres on integers, x along longitude;
M, C, B, A, T_i, E_i are the state's model, counts, background, approximation, transform and
error; sigma_psf is the PSF's Gaussian sigma):

- *PSF*: given (``psf``), else the one the run recorded (``attrs["parameters"]
  ["psf_sigma_deg"]``, written by ``CWT(psf=...)``), else the one the rule of
  ``docs/psf_rule.md`` assigns to the run's kernels (``min_scale / MIN_SCALE_PER_SIGMA``);
  ``meta["PSFFROM"]`` says which.
- *island*: a connected component (4-connectivity, like the CWT's own support cleaning) of the
  2-D support ``any_i S_i``; on an all-sky map (`cwtflow.maps.is_allsky`) islands touching
  across the longitude seam are one island.
- *candidate*: a deblended component of an island (`cwtflow.peaks`): a watershed region of M
  whose peak is neither a shoulder of a higher peak (``contrast``) nor closer than
  ``min_separation`` to one, and whose point-source significance at the model centroid
  (Cash 1979 likelihood ratio of a Gaussian PSF of fixed position over B) reaches
  ``min_significance - 1.5``; it seeds the fit with its centroid and counts.
- *fit* (`cwtflow.likelihood`, `cwtflow.refine`): on a window of the map around the candidate
  (5 PSF sigmas), ``mu = beta B + (other sources) + a G``, G a pixel-integrated Gaussian of
  sigma ``sqrt(sigma_psf^2 + extension^2)``; position, expected counts ``a`` (and extension)
  maximise the Poisson likelihood with the other sources fixed, in sweeps; ``beta`` is the
  background model's local normalisation: 1 (default; the background model as given) or
  fitted on each window (``fit_background``).
  Candidates converging within ``min_separation`` of a higher-TS one are dropped.
- ``ts``: ``2 (log L - log L0)`` of the point-source fit against ``mu0 = beta0 B + (other
  sources)``, ``beta0`` 1 or, with ``fit_background``, refitted without the source (the
  detection test, for extended sources too); ``significance``: ``sqrt(ts)``.
  Sources below ``min_significance`` are dropped.
- ``x_err``, ``y_err``, ``source_counts_err``, ``extension_err``: from the inverse Fisher
  information at the maximum; ``pos_err``: ``sqrt((x_err^2 dx^2 + y_err^2 dy^2) / 2)`` (deg)
  and ``pos_err_68``/``pos_err_95`` the radii of the 68 % / 95 % circles of a circular 2-D
  Gaussian error of that sigma (1.515 and 2.448 times it).
- ``extension``: intrinsic Gaussian sigma of the extended fit; ``ts_ext`` ``2 (log L_ext -
  log L_point)``; ``extended``: ``ts_ext >= cwtflow.psf.EXTENDED_TS`` (16); an extended
  source's position and counts are those of its extended fit (its TS is about ``ts +
  ts_ext``).
- *larger sources* (`cwtflow.merge`): a source whose extension reaches the cap is tried as part
  of a Gaussian of up to ``LARGE_EXTENSION_PER_SIGMA`` (8) PSF sigmas that replaces it and the
  sources in its footprint (those still significant on top of it stay, as point sources) when
  Akaike's criterion prefers it, its extension is beyond the cap by more than its error and
  below the larger cap, and it stays detected; its ``ts`` is the point-source test at its
  position, like every source's.
- ``flux``: ``source_counts`` over the exposure averaged with the source's shape (cm-2 s-1 for
  an exposure in cm2 s); NaN without an exposure map.
- ``peak_significance``, ``peak_scale``: at the candidate's peak pixel of M, the maximum over
  scales of ``(T_i + conv(M_src, K_i)) / E_i`` and the scale (pixels) where it peaks;
  ``npix``, ``model_counts``, ``counts``, ``background``: the candidate's support region, its
  pixel count and sums of M, C and B over it.
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
from astropy.table import QTable
from astropy.wcs.utils import proj_plane_pixel_scales

from . import core, peaks
from .catalog_table import CATALOG_COLUMNS, assemble_table, empty_table
from .checks import flag, number
from .cutouts import fit_window, grow_box, island_boxes, stack_windows, take_box, windows_at
from .errors import InputError, ParameterError
from .kernels import CWTKernels
from .maps import is_allsky, wcs_from_attrs
from .merge import AT_CAP, large_window_half, merge_large
from .psf import (
    EXTENDED_TS,
    LARGE_EXTENSION_PER_SIGMA,
    MAX_EXTENSION_PER_SIGMA,
    MIN_SCALE_PER_SIGMA,
    MIN_SEPARATION_PER_SIGMA,
    PSF,
    as_angle,
    as_psf,
)
from .refine import max_point_shift, refine

__all__ = ["CATALOG_COLUMNS", "find_sources"]

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


def _data(result: xr.Dataset, name: str) -> Any:
    var = result[name]
    dims = ("scale", "y", "x") if "scale" in var.dims else ("y", "x")
    return var.transpose(*dims).variable.data


def _run_psf(result: xr.Dataset, psf: Any, kernels: CWTKernels) -> tuple[PSF | None, str]:
    """The PSF (or None: from the kernels, in pixels) and where it came from."""
    if psf is not None:
        return as_psf(psf), "given"
    params = _parameters(result)
    recorded = params.get("psf_sigma_deg") if params else None
    if recorded:
        return PSF(float(recorded) * u.deg), "run"
    return None, "kernels"


def _parameters(result: xr.Dataset) -> Mapping[str, Any]:
    params = result.attrs.get("parameters")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            params = None
    return params if isinstance(params, Mapping) else {}


#: Seeds are kept down to this much below ``min_significance`` (the fit usually gains).
SEED_MARGIN = 1.5


def find_sources(
    result: xr.Dataset,
    *,
    psf: Any = None,
    exposure: Any = None,
    min_significance: float = 5.0,
    deblend: bool = True,
    contrast: float = 0.2,
    min_separation: u.Quantity | None = None,
    fit_extension: bool = True,
    fit_background: bool = False,
    kernels: CWTKernels | None = None,
) -> QTable:
    """Catalog of the sources in a CWT result, refined by a Poisson likelihood fit.

    Parameters
    ----------
    result : xarray.Dataset
        A CWT state (`CWT.analyze`'s return value, a state read back from FITS or zarr);
        numpy- or dask-backed. Only the 2-D support is read whole; every other variable is
        read on the islands' bounding boxes (with a margin for the fit windows) only.
    psf : astropy Quantity or cwtflow.psf.PSF, optional
        The instrument's PSF: a Gaussian sigma as an angle (``0.15 * u.deg``) or a
        `cwtflow.psf.PSF`. Default: the PSF the run recorded (``CWT(psf=...)``), else the one
        the PSF rule gives the run's kernels (see the module docstring).
    exposure : xarray.DataArray or array-like, shape (ny, nx), optional
        Exposure in cm2 s for the ``flux`` columns. Defaults to ``result["exposure"]`` when
        the result carries one; without either, ``flux`` is NaN.
    min_significance : float
        Sources whose fitted ``significance`` (``sqrt(ts)``) is below this are dropped.
    deblend : bool
        Split islands with several peaks into several candidates.
    contrast : float
        A secondary model peak is its own candidate only if it rises at least this fraction
        of its height above the saddle joining it to a higher peak (0 <= contrast < 1).
    min_separation : astropy Quantity, optional
        Peaks (and fitted sources) closer than this angle are one source. Default:
        ``MIN_SEPARATION_PER_SIGMA`` (2) PSF sigmas.
    fit_extension : bool
        Also fit a Gaussian extension (``extension``, ``ts_ext``, ``extended``).
    fit_background : bool
        Let the background model's normalisation float on each fit window, with and without
        the source. Off by default: on simulations (``docs/psf_rule.md``) the floating
        normalisation absorbs part of a faint source's counts and finds fewer sources at the
        same false-detection rate, with the background model exact or off by 10-20 %.
    kernels : CWTKernels, optional
        The run's kernels, when the result's attrs do not record them (they must match the
        result's ``scale`` coordinate).

    Returns
    -------
    astropy.table.QTable
        One row per source, columns `CATALOG_COLUMNS` and ``sky_centroid`` (defined in this
        module's docstring), ordered by decreasing ``ts``; ``meta`` records the settings and
        the frame. No source: the same columns with no rows, and a `UserWarning`.
    """
    shape = _check_result(result)
    min_significance = number("min_significance", min_significance)
    if not (_is_real(contrast) and 0 <= contrast < 1):
        raise ParameterError(f"contrast must be in [0, 1), got {contrast!r}")
    deblend = flag("deblend", deblend)
    kernels = _run_kernels(result, kernels)
    wcs = wcs_from_attrs(result.attrs).celestial
    pixel_size = float(np.mean(proj_plane_pixel_scales(wcs)))
    psf_obj, psf_from = _run_psf(result, psf, kernels)
    if psf_obj is None:
        psf_pix = kernels.min_scale / MIN_SCALE_PER_SIGMA
    else:
        psf_pix = psf_obj.sigma_pixels(pixel_size * u.deg)
    if min_separation is None:
        sep_pix = MIN_SEPARATION_PER_SIGMA * psf_pix
    else:
        sep = min_separation
        if isinstance(sep, u.Quantity) and sep.unit.is_equivalent(u.deg) and sep.value == 0:
            sep_pix = 0.0
        else:
            sep_pix = float(as_angle(sep, "min_separation", example="0.3 * u.deg").value)
            sep_pix /= pixel_size
    exposure_data = _exposure_array(result, exposure, shape)
    wrap = is_allsky(wcs, shape)
    max_extension = MAX_EXTENSION_PER_SIGMA * psf_pix
    half = math.ceil(4 * math.hypot(psf_pix, max_extension))
    margin = half + 2

    support_2d = np.asarray(dask.compute(_data(result, "support").any(axis=0))[0], dtype=bool)
    labels, n = core.label(support_2d, wrap_x=wrap)
    boxes = [grow_box(b, margin, shape, wrap) for b in island_boxes(labels, n, wrap)]

    names2 = ["model", "counts", "background", "approx"]
    arrays = {name: _data(result, name) for name in (*names2, "transform_3d", "error")}
    if exposure_data is not None:
        arrays["exposure"] = exposure_data
    lazy = [{name: take_box(a, box, shape[1]) for name, a in arrays.items()} for box in boxes]
    if any(not isinstance(a, np.ndarray) for a in arrays.values()):
        cutouts = dask.compute(*lazy)  # one graph: every island's boxes in one pass
    else:
        cutouts = tuple(lazy)

    seeds, windows = [], []
    for label, (box, cut) in enumerate(zip(boxes, cutouts, strict=True), start=1):
        cut = {k: np.asarray(v, dtype=np.float64) for k, v in cut.items()}
        mask = take_box(labels, box, shape[1]) == label
        sources = peaks.island_sources(
            mask,
            cut["model"],
            cut["transform_3d"],
            cut["error"],
            cut["counts"],
            cut["background"],
            cut["approx"],
            None,
            kernels.wavelets,
            min_significance=float(min_significance) - SEED_MARGIN,
            deblend=bool(deblend),
            contrast=float(contrast),
            min_separation=float(sep_pix),
            psf_sigma=psf_pix,
        )
        for i in range(sources.x.size):
            seeds.append((label, box, sources, i))
            windows.append(fit_window(cut, box, sources.x[i], sources.y[i], half))

    table = _refined_table(
        seeds,
        windows,
        psf_pix,
        sep_pix,
        max_extension,
        (fit_extension, fit_background),
        wrap,
        shape,
        wcs,
        kernels,
        float(min_significance),
        arrays,
    )
    table.meta.update(
        {
            "FRAME": _frame(wcs),
            "MINSIG": float(min_significance),
            "DEBLEND": bool(deblend),
            "CONTRAST": float(contrast),
            "MINSEP": float(sep_pix * pixel_size),  # deg
            "NSCALE": kernels.n_scale,
            "MINSCALE": kernels.min_scale,
            "STEPSCAL": kernels.step_scale,
            "PIXSIZE": pixel_size,
            "PSFSIGMA": float(psf_pix * pixel_size),  # deg
            "PSFFROM": psf_from,
            "FITEXT": bool(fit_extension),
            "FITBKG": bool(fit_background),
            "TSEXT": EXTENDED_TS,
            "NISLAND": int(n),
            "NCAND": len(seeds),
        }
    )
    if len(table) == 0:
        warnings.warn(
            f"no sources found: {n} support islands, {len(seeds)} candidates, none with a "
            f"significance of at least {min_significance:g}",
            UserWarning,
            stacklevel=2,
        )
    return table


def _refined_table(
    seeds,
    windows,
    psf_pix,
    sep_pix,
    max_extension,
    fits,
    wrap,
    shape,
    wcs,
    kernels,
    min_significance,
    arrays,
) -> QTable:
    fit_extension, fit_background = fits
    frame = _frame(wcs)
    if not seeds:
        return empty_table(frame)
    wins = stack_windows(windows)
    start = np.array(
        [
            (
                max(s.source_counts[i], 1.0),
                s.x[i] + box[2],
                s.y[i] + box[0],
            )
            for _, box, s, i in seeds
        ]
    )
    fit = refine(
        wins,
        start,
        psf_pix,
        min_separation=sep_pix,
        max_extension=max_extension,
        fit_extension=fit_extension,
        fit_background=fit_background,
        period=shape[1] if wrap else None,
    )
    capped = fit.keep & (fit.extension >= AT_CAP * max_extension)
    if fit_extension and capped.any():
        rows = np.flatnonzero(capped)
        rows = rows[np.argsort(-fit.ts[rows], kind="stable")]
        large_extension = LARGE_EXTENSION_PER_SIGMA * psf_pix
        half = large_window_half(psf_pix, large_extension)
        fit = merge_large(
            fit,
            wins,
            windows_at(arrays, fit.x[rows], fit.y[rows], half, shape, wrap),
            rows,
            psf_pix,
            large_extension=large_extension,
            min_extension=max_extension,
            min_ts=min_significance**2,
            max_shift=max_point_shift(psf_pix),
            fit_background=fit_background,
            period=shape[1] if wrap else None,
        )
    keep = fit.keep & (np.sqrt(fit.ts) >= min_significance) & np.isfinite(fit.x_err)
    sel = np.flatnonzero(keep)

    def seed_column(field: str) -> np.ndarray:
        return np.array([getattr(seeds[i][2], field)[seeds[i][3]] for i in sel])

    x = fit.x[sel]
    x = np.where((x < -0.5) | (x >= shape[1] - 0.5), (x + 0.5) % shape[1] - 0.5, x)
    values = {
        "island": np.array([seeds[i][0] for i in sel]),
        "x": x,
        "y": fit.y[sel],
        "x_err": fit.x_err[sel],
        "y_err": fit.y_err[sel],
        "source_counts": fit.counts[sel],
        "source_counts_err": fit.counts_err[sel],
        "exposure": fit.exposure[sel],
        "ts": fit.ts[sel],
        "extension": fit.extension[sel],
        "extension_err": fit.extension_err[sel],
        "ts_ext": fit.ts_ext[sel],
        "extended": fit.extended[sel],
        "peak_significance": seed_column("peak_significance") if sel.size else np.zeros(0),
        "peak_scale": (
            kernels.scales[seed_column("peak_scale").astype(int)] if sel.size else np.zeros(0)
        ),
        "npix": seed_column("npix") if sel.size else np.zeros(0),
        "model_counts": seed_column("model_counts") if sel.size else np.zeros(0),
        "counts": seed_column("counts") if sel.size else np.zeros(0),
        "background": seed_column("background") if sel.size else np.zeros(0),
    }
    return assemble_table(values, wcs, frame)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _frame(wcs: Any) -> str:
    from astropy.wcs.utils import wcs_to_celestial_frame

    return str(wcs_to_celestial_frame(wcs).name)
