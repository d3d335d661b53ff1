"""The catalog's columns and the assembly of the `cwtflow.find_sources` table (astropy QTable).

Every numeric column carries a unit (``pix``, ``deg``, ``ct``, ``cm-2 s-1``, or dimensionless
for TS and significances); ``sky_centroid`` is a `SkyCoord` in the map's frame, beside
``lon``/``lat`` (that frame) and ``ra``/``dec`` (ICRS). Definitions: ``cwtflow.catalog``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable

from .psf import R68_PER_SIGMA, R95_PER_SIGMA

__all__ = ["CATALOG_COLUMNS", "assemble_table", "empty_table"]

_DIMLESS = ""
#: name -> (dtype, unit, description) of every catalog column but ``sky_centroid``, in order.
CATALOG_COLUMNS: dict[str, tuple[type, str | None, str]] = {
    "id": (np.int64, None, "source number, 1 = highest TS"),
    "island": (np.int64, None, "support island of the source's seed"),
    "x": (np.float64, "pix", "maximum-likelihood position, 0-based pixel x"),
    "y": (np.float64, "pix", "maximum-likelihood position, 0-based pixel y"),
    "x_err": (np.float64, "pix", "1-sigma error of x (inverse Fisher information)"),
    "y_err": (np.float64, "pix", "1-sigma error of y (inverse Fisher information)"),
    "lon": (np.float64, "deg", "longitude in the map frame"),
    "lat": (np.float64, "deg", "latitude in the map frame"),
    "ra": (np.float64, "deg", "right ascension (ICRS)"),
    "dec": (np.float64, "deg", "declination (ICRS)"),
    "pos_err": (np.float64, "deg", "per-axis 1-sigma position error"),
    "pos_err_68": (np.float64, "deg", "radius of the 68 % position error circle"),
    "pos_err_95": (np.float64, "deg", "radius of the 95 % position error circle"),
    "source_counts": (np.float64, "ct", "fitted expected counts of the source"),
    "source_counts_err": (np.float64, "ct", "1-sigma error of source_counts"),
    "flux": (np.float64, "cm-2 s-1", "photon flux: source_counts / exposure at the source"),
    "flux_err": (np.float64, "cm-2 s-1", "1-sigma error of flux"),
    "ts": (np.float64, _DIMLESS, "point-source test statistic 2 (log L - log L0)"),
    "significance": (np.float64, _DIMLESS, "sqrt(ts)"),
    "extension": (np.float64, "deg", "fitted intrinsic Gaussian sigma (0: point-like)"),
    "extension_err": (np.float64, "deg", "1-sigma error of extension"),
    "ts_ext": (np.float64, _DIMLESS, "2 (log L_extended - log L_point)"),
    "extended": (bool, None, "ts_ext >= the extension threshold (meta TSEXT)"),
    "peak_significance": (
        np.float64,
        _DIMLESS,
        "max over scales of (T_i + conv(M_src, K_i)) / E_i at the seed's model peak",
    ),
    "peak_scale": (np.float64, "pix", "wavelet scale of the peak significance"),
    "npix": (np.int64, None, "pixels in the seed's support region"),
    "model_counts": (np.float64, "ct", "sum of the CWT model over the seed's region"),
    "counts": (np.float64, "ct", "observed counts in the seed's region"),
    "background": (np.float64, "ct", "background counts in the seed's region"),
}


def _column(data: Any, dtype: type, unit: str | None) -> Any:
    data = np.asarray(data, dtype=dtype)
    if unit is None:
        return data
    return u.Quantity(data, unit, dtype=dtype)


def empty_table(frame: str = "galactic") -> QTable:
    """The catalog's columns with no rows."""
    return _table({name: np.zeros(0) for name in CATALOG_COLUMNS}, frame)


def _table(values: dict[str, np.ndarray], frame: str) -> QTable:
    out = QTable()
    for name, (dtype, unit, description) in CATALOG_COLUMNS.items():
        out[name] = _column(values[name], dtype, unit)
        out[name].info.description = description
        if name == "dec":
            out["sky_centroid"] = SkyCoord(
                np.asarray(values["lon"], dtype=np.float64) * u.deg,
                np.asarray(values["lat"], dtype=np.float64) * u.deg,
                frame=frame,
            )
            out["sky_centroid"].info.description = "position as a SkyCoord (map frame)"
    return out


def assemble_table(values: dict[str, np.ndarray], wcs: Any, frame: str) -> QTable:
    """The catalog from per-source arrays (map pixel frame; errors and extension in pixels).

    ``values`` holds ``x``, ``y``, ``x_err``, ``y_err``, ``extension``, ``extension_err`` in
    pixels, the other columns of `CATALOG_COLUMNS` (but ``id``, the sky columns and the
    position-error radii, computed here) and ``exposure`` (cm2 s at the source, NaN without).
    Rows are ordered by decreasing TS.
    """
    from astropy.wcs.utils import proj_plane_pixel_scales

    x, y = values["x"], values["y"]
    sx, sy = proj_plane_pixel_scales(wcs)[:2]
    if x.size:
        sky = wcs.pixel_to_world(x, y)
        sph, icrs = sky.spherical, sky.icrs
        lon, lat = np.asarray(sph.lon.deg), np.asarray(sph.lat.deg)
        ra, dec = np.asarray(icrs.ra.deg), np.asarray(icrs.dec.deg)
    else:
        lon = lat = ra = dec = np.zeros(0)
    sigma = np.sqrt((values["x_err"] ** 2 * sx**2 + values["y_err"] ** 2 * sy**2) / 2)
    scale = np.sqrt(sx * sy)
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = values["source_counts"] / values["exposure"]
        flux_err = values["source_counts_err"] / values["exposure"]
    full = {
        **values,
        "lon": lon,
        "lat": lat,
        "ra": ra,
        "dec": dec,
        "pos_err": sigma,
        "pos_err_68": R68_PER_SIGMA * sigma,
        "pos_err_95": R95_PER_SIGMA * sigma,
        "flux": np.where(np.isfinite(flux), flux, np.nan),
        "flux_err": np.where(np.isfinite(flux_err), flux_err, np.nan),
        "significance": np.sqrt(np.maximum(values["ts"], 0.0)),
        "extension": values["extension"] * scale,
        "extension_err": values["extension_err"] * scale,
    }
    order = np.lexsort((x, y, -full["ts"]))
    full = {name: np.asarray(v)[order] for name, v in full.items() if name != "id"}
    full["id"] = np.arange(1, order.size + 1)
    return _table(full, frame)
